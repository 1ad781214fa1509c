"""Muddlers and arg parsers: the two plug-in files a run may name besides the config.

* An **arg parser** (``-a FILE`` with ``--extra-args "…"``) defines
  ``parse_args(extra_args, ssh_user)``; whatever it returns is visible to the
  config and the muddler as ``extra_options``. It gets the extra arguments as the
  single string SPAR passed (a token list from the CLI is joined with
  ``shlex.join`` first, so values starting with ``-`` survive). SPAR silently
  ignored ``-a`` without ``--extra-args``; here that logs a WARNING and runs
  the parser with empty extra args, so ``extra_options`` is what the parser's
  defaults make it (configs that read it still work).
* A **muddler** (``-m FILE``) defines ``muddle(config)`` or, like SPAR's TA3
  muddlers, ``muddle(config, options)``; the signature is checked once and the
  right form is called. It runs after the config and before validation, in the
  config's directory, with ``Component``, ``util``, ``options`` and
  ``extra_options`` as globals. It changes ``config`` in place (SPAR's contract);
  returning a :class:`~remote_runner.config.Config` or a list of Components
  replaces the components instead.

Any mistake (missing function, wrong signature, an exception inside) is a
:class:`ConfigError` naming the plug-in file and, where known, its line.
"""

from __future__ import annotations

import inspect
import logging
import shlex
from typing import Any, Callable, Dict, Optional, Sequence, Union

from remote_runner import util
from remote_runner.config import LOCAL_HOST, Component, Config
from remote_runner.usercode import compile_user_file, resolve_user_file, user_code, user_namespace
from remote_runner.errors import ConfigError

LOG = logging.getLogger(__name__)

MUDDLER_MODULE_NAME = "remote_runner_muddler"
ARG_PARSER_MODULE_NAME = "remote_runner_arg_parser"


def load_extra_options(arg_parser_file: Optional[str], extra_args: Union[str, Sequence[str], None],
                       ssh_user: Optional[str], dialect: Optional[str] = None) -> Any:
    """Run ``parse_args(extra_args, ssh_user)`` from *arg_parser_file*; None if neither is given."""
    if arg_parser_file is None and extra_args is None:
        return None
    if arg_parser_file is None:
        raise ConfigError("--extra-args needs an arg parser file (-a/--arg-parser FILE)")
    if extra_args is None:
        LOG.warning("%s: an arg parser (-a) was given without --extra-args; running "
                    "parse_args with empty extra args", arg_parser_file)
        extra_args = ""
    if not isinstance(extra_args, str):
        extra_args = shlex.join([str(token) for token in extra_args])
    path = resolve_user_file(arg_parser_file, "arg parser")
    namespace = _run_plugin(path, "arg parser", {"__name__": ARG_PARSER_MODULE_NAME}, cwd=None,
                            dialect=dialect)
    parse_args = _plugin_function(namespace, "parse_args", path, "arg parser")
    if _positional_arity(parse_args, path, "parse_args", wanted=2) != 2:
        raise ConfigError("parse_args must accept two arguments (extra_args, ssh_user)",
                          file=path, line=_def_line(parse_args))
    with user_code(path, "arg parser"):
        return parse_args(extra_args, ssh_user)


def apply_muddler(muddler_file: str, config: Config, options: Any, extra_options: Any,
                  config_dir: str, dialect: Optional[str] = None) -> Config:
    """Run the muddler file on *config* (in *config_dir*) and return the resulting config."""
    path = resolve_user_file(muddler_file, "muddler")
    namespace = _run_plugin(path, "muddler", {
        "__name__": MUDDLER_MODULE_NAME,
        "Component": Component,
        "util": util,
        "options": options,
        "extra_options": extra_options,
        "localhost": LOCAL_HOST,
    }, cwd=config_dir, dialect=dialect)
    muddle = _plugin_function(namespace, "muddle", path, "muddler")
    arity = _positional_arity(muddle, path, "muddle", wanted=2)
    with user_code(path, "muddler", cwd=config_dir, dialect=dialect):
        result = muddle(config, options) if arity == 2 else muddle(config)
        return _muddled_config(result, config, path)


def _muddled_config(result: Any, config: Config, path: str) -> Config:
    """Interpret what muddle() returned: None (changed in place), a Config, or Components."""
    if result is None:
        return config
    if isinstance(result, Config):
        return result
    if isinstance(result, (list, tuple)) and all(isinstance(c, Component) for c in result):
        config.clear_components()
        for component in result:
            config.add_component(component)
        return config
    raise ConfigError(f"muddle() returned a {type(result).__name__}; return None (after changing "
                      "config in place), the config, or a list of Components", file=path)


def _run_plugin(path: str, role: str, globals_: Dict[str, Any], cwd: Optional[str],
                dialect: Optional[str] = None) -> Dict[str, Any]:
    """Execute a plug-in file (Python 3, or Python 2 translated) and return its globals."""
    compiled = compile_user_file(path, role, dialect)
    namespace = user_namespace(compiled, {**globals_, "__file__": path})
    with user_code(path, role, cwd=cwd, dialect=dialect):
        exec(compiled.code, namespace)
    return namespace


def _plugin_function(namespace: Dict[str, Any], name: str, path: str, role: str) -> Callable:
    """Return the callable *name* the plug-in must define."""
    func = namespace.get(name)
    if func is None:
        raise ConfigError(f"the {role} file does not define {name}()", file=path)
    if not callable(func):
        raise ConfigError(f"{name} in the {role} file is a {type(func).__name__}, not a function",
                          file=path)
    return func


def _positional_arity(func: Callable, path: str, name: str, wanted: int) -> int:
    """Return how many positional arguments (1..wanted) to pass *func*, or raise ConfigError."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return wanted
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    kw_required = [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if kw_required or len(required) > wanted or (not positional and not varargs):
        raise ConfigError(f"{name}{signature} has an unsupported signature; "
                          f"expected {_expected(name)}",
                          file=path, line=_def_line(func))
    return wanted if (varargs or len(positional) >= wanted) else len(positional)


def _expected(name: str) -> str:
    """Describe the accepted signatures of plug-in function *name*."""
    return "muddle(config) or muddle(config, options)" if name == "muddle" else \
        "parse_args(extra_args, ssh_user)"


def _def_line(func: Callable) -> Optional[int]:
    """Return the line where *func* is defined, if known."""
    code = getattr(func, "__code__", None)
    return code.co_firstlineno if code is not None else None
