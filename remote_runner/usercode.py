"""Running the user's own files (configs, muddlers, argument parsers) and blaming the right line.

A config, a muddler and an argument parser are Python the user wrote, often years
ago for Python 2. What goes wrong inside them must read as the user's mistake at
the user's line (file, line, source text), never as a traceback through this
package. This module compiles such a file (translating Python 2 in memory when it
needs that), gives it the globals it expects, runs it in its own directory with
that directory importable, and turns whatever it raises into a located
:class:`~remote_runner.errors.ConfigError`. It knows nothing about components:
:mod:`remote_runner.loader` decides what the files are for.
"""

from __future__ import annotations

import contextlib
import linecache
import logging
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

from remote_runner.config import Origin, SourceError
from remote_runner.errors import ConfigError, CopyError, RunnerError

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.python2 import CompiledFile

LOG = logging.getLogger(__name__)


def resolve_user_file(path: str, role: str) -> str:
    """Expand ``~``/``$VARS`` in *path*, make it absolute and check it is a file."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"no {role} file given")
    resolved = os.path.realpath(os.path.expanduser(os.path.expandvars(path)))
    if not os.path.isfile(resolved):
        what = "is not a file" if os.path.exists(resolved) else "does not exist"
        raise ConfigError(f"{role} file {what}", file=resolved)
    return resolved


def compile_user_file(path: str, role: str, dialect: Optional[str] = None) -> "CompiledFile":
    """Compile a user's file, as Python 2 when it needs that; report syntax errors at their line.

    *dialect* (``"2"``/``"3"``, from ``--python2``/``--python3``) forces one
    reading; by default a file that does not compile as Python 3, or uses
    names only Python 2 has, is translated in memory (see :mod:`remote_runner.python2`).
    """
    from remote_runner.python2 import compile_file

    try:
        with open(path, "rb") as handle:
            source = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {role} file: {exc.strerror}", file=path) from exc
    try:
        compiled = compile_file(source, path, dialect)
    except SyntaxError as exc:
        text = (exc.text or linecache.getline(path, exc.lineno or 0) or "").rstrip("\n")
        shown = f"\n    {text.strip()}" if text.strip() else ""
        raise ConfigError(f"SyntaxError in {role}: {exc.msg}{shown}", file=path,
                          line=exc.lineno) from None
    except ValueError as exc:  # e.g. source with NUL bytes
        raise ConfigError(f"cannot compile {role}: {exc}", file=path) from None
    if compiled.python2:
        LOG.info("%s: %s read as Python 2 (%s), translated in memory", path, role, compiled.reason)
    return compiled


def user_namespace(compiled: "CompiledFile", names: Dict[str, Any]) -> Dict[str, Any]:
    """Return the globals a user's file runs in: *names*, plus Python 2 builtins if it needs them."""
    from remote_runner.python2 import builtins_for

    namespace = dict(names)
    extra = builtins_for(compiled)
    if extra is not None:
        namespace["__builtins__"] = extra
    return namespace


@contextlib.contextmanager
def user_code(path: str, role: str, cwd: Optional[str] = None,
              dialect: Optional[str] = None) -> Iterator[None]:
    """Run a block of user code in *cwd* and report its errors at the user's line.

    *cwd* (the config's directory) is also put first on ``sys.path`` meanwhile, so a
    config or muddler can import helper modules that sit next to the config; those
    are read like the config itself (Python 2 ones translated; *dialect* forces).
    """
    from remote_runner.python2.imports import importing_from

    old_cwd = os.getcwd() if cwd else None
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as exc:
            raise ConfigError(f"cannot enter the config directory: {exc.strerror}", file=path) from None
        sys.path.insert(0, cwd)
    try:
        with (importing_from(cwd, dialect) if cwd else contextlib.nullcontext()):
            yield
    except RunnerError as exc:
        raise _locate_runner_error(exc, path) from None
    except SystemExit as exc:
        where = _user_frame(exc, path)
        raise ConfigError(f"{role} called sys.exit({exc.code!r})" + _source(where),
                          file=path, line=where.line if where else None) from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # GeneratorExit or a user's BaseException subclass too
        where = _user_frame(exc, path)
        message = f"{type(exc).__name__} in {role}: {exc}" + _source(where)
        if (isinstance(exc, AttributeError) and str(exc).startswith("'NoneType' object")
                and "extra_options" in _source(where)):
            message += ("\n    (extra_options is None: no -a/--extra-args was given, or the "
                        "arg parser returned None)")
        deepest = [(f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__)[-1:]]
        if isinstance(exc, SyntaxError) and exc.filename and exc.filename != path:
            deepest = [(exc.filename, exc.lineno)]  # in a module the user's file imported
        if deepest and where and deepest[0][0] != path:
            message += f"\n    (raised in {deepest[0][0]}:{deepest[0][1]})"
        raise ConfigError(message, file=path, line=where.line if where else None) from exc
    finally:
        if old_cwd is not None:
            os.chdir(old_cwd)
            if cwd in sys.path:
                sys.path.remove(cwd)


def _user_frame(exc: BaseException, path: str) -> Optional[Origin]:
    """Return the innermost traceback frame of *exc* that lies in the user's file *path*."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == path:
            found = Origin(path, frame.lineno or 0)
    if found is None and isinstance(exc, SyntaxError) and exc.filename == path:
        found = Origin(path, exc.lineno or 0)
    return found


def _source(where: Optional[Origin]) -> str:
    """Return the user's source line at *where*, indented on its own line (or '')."""
    if where is None:
        return ""
    text = linecache.getline(where.file, where.line).strip()
    return f"\n    {text}" if text else ""


def _locate_runner_error(exc: RunnerError, path: str) -> RunnerError:
    """Give an error raised inside user code the user's file and line, if it lacks them."""
    where = _user_frame(exc, path)
    if where is None:
        return exc
    if isinstance(exc, ConfigError) and exc.file is None:
        return ConfigError(exc.message + _source(where), file=path, line=where.line,
                           component=exc.component, field=exc.field)
    if isinstance(exc, CopyError) and not isinstance(exc, SourceError):
        return SourceError(exc.message + _source(where), path=exc.path, file=path,
                           line=where.line, component=exc.component, field=None)
    return exc
