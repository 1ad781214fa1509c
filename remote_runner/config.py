"""Experiment configs: run the user's Python config and turn it into validated specs.

A config is a Python file (SPAR's format) that fills ``config`` with mutable
:class:`Component` objects. Two layers keep that flexible *and* safe:

* :class:`Component` / :class:`Config` are what configs and muddlers touch.
  A Component accepts only its legal attributes and fails **at the line** that
  sets anything else; every assignment remembers its ``file:line`` (and
  ``add_component`` remembers where each copy was added), so errors found later,
  in validation, still point at the user's line.
* :class:`ComponentSpec` / :class:`Experiment` are frozen, type-checked views the
  runner uses. Local paths are resolved and local sources checked here, before
  anything touches a host.

Errors raised by Python itself inside a config (``NameError``, ``SyntaxError``…)
are reported with the config's own file, line and source text, not our
internals. The config runs with its own directory as the cwd, restored
afterwards even when it fails.

Decisions that differ from SPAR (see docs/notes): ``wait`` defaults to False;
``mirror`` and the legacy ``num_cores`` are accepted; names are unique per
``(host, name)``; a relative ``base_dir`` is an error (SPAR handed it to screen's
``chdir``, so it resolved against whatever directory the session happened to
have); ``files`` on a ``localhost`` component is an error.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import linecache
import logging
import math
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

from remote_runner import util
from remote_runner.errors import ConfigError, CopyError, RunnerError, control_characters, located
from remote_runner.names import bad_name_reason

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.inventory import HostGroups
    from remote_runner.python2 import CompiledFile

LOG = logging.getLogger(__name__)

LOCAL_HOST = "localhost"

REQUIRED_FIELDS = ("name", "host", "executable", "start_index")
_DEFAULTS = {
    "args": list,
    "files": dict,
    "base_dir": lambda: None,
    "wait": lambda: False,
    "mirror": lambda: False,
    "num_cores": lambda: None,
    "export": list,
    "ready": lambda: None,
    "ready_timeout": lambda: 60.0,
    "results": list,
    "env": dict,
}
LEGAL_FIELDS = REQUIRED_FIELDS + tuple(_DEFAULTS)

#: ``component.ready``: ``tcp:PORT`` listening on the host, ``log:REGEX`` in its log,
#: ``file:PATH`` existing (relative to base_dir).
READY_RE = re.compile(r"^(tcp|log|file):(.+)$", re.S)

CONFIG_MODULE_NAME = "remote_runner_config"
_INTERNAL_MODULES = ("remote_runner", "copy")


def parse_ready(value: Optional[str], where: str = "ready") -> Optional[Tuple[str, str]]:
    """Split a ``ready`` value into (kind, argument); raise ConfigError when malformed."""
    if value is None:
        return None
    match = READY_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise ConfigError(f"ready must be 'tcp:PORT', 'log:REGEX' or 'file:PATH', got {value!r}",
                          field=where)
    kind, arg = match.group(1), match.group(2)
    if kind == "tcp" and not (arg.isdigit() and 0 < int(arg) < 65536):
        raise ConfigError(f"ready 'tcp:PORT' needs a port number 1-65535, got {arg!r}",
                          field=where)
    if "\0" in arg or "\n" in arg:
        raise ConfigError("ready must not contain NUL or newline characters", field=where)
    return kind, arg


@dataclass(frozen=True)
class Origin:
    """A place in a user's file."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class FileSpec:
    """One local source (absolute) to copy to *dest* (absolute, or relative to base_dir)."""

    src: str
    dest: str
    is_dir: bool


@dataclass(frozen=True)
class ComponentSpec:
    """A validated, immutable component: what the runner starts."""

    name: str
    host: str
    executable: str
    args: Tuple[str, ...]
    files: Tuple[FileSpec, ...]
    base_dir: Optional[str]
    start_index: Union[int, float]
    wait: bool
    mirror: bool
    num_cores: Optional[int]
    origin: Origin
    ready: Optional[str] = None
    ready_timeout: float = 60.0
    results: Tuple[str, ...] = ()
    env: Tuple[Tuple[str, str], ...] = ()
    field_origins: Tuple[Tuple[str, Origin], ...] = field(default=(), compare=False, repr=False)
    #: mirror=True: local paths served to the host besides the defaults (``PATH`` or ``PATH:ro``).
    export: Tuple[str, ...] = ()

    @property
    def is_local(self) -> bool:
        """Tell whether this component runs on the local machine (host ``localhost``)."""
        return self.host == LOCAL_HOST

    @property
    def key(self) -> Tuple[str, str]:
        """Return the ``(host, name)`` pair that identifies this component."""
        return (self.host, self.name)

    def origin_of(self, field_name: str) -> Origin:
        """Return where *field_name* was last set (or where the component was added)."""
        return dict(self.field_origins).get(field_name, self.origin)


@dataclass(frozen=True)
class Experiment:
    """Everything a run needs from the config: validated components and where they came from."""

    config_file: str
    config_dir: str
    components: Tuple[ComponentSpec, ...]
    extra_options: Any = field(default=None, compare=False, repr=False)

    def hosts(self) -> List[str]:
        """Return the remote hosts, sorted (``localhost`` excluded)."""
        return sorted({c.host for c in self.components if not c.is_local})


class SourceError(CopyError):
    """A local ``files`` source named by a config is missing or unusable (found at load)."""

    def __init__(self, message: str, *, path: Optional[str] = None, file: Optional[str] = None,
                 line: Optional[int] = None, component: Optional[str] = None,
                 field: Optional[str] = "files") -> None:
        self.file = file
        self.line = line
        self.field = field
        super().__init__(message, path=path, component=component)

    def __str__(self) -> str:
        return located(self.message, self.file, self.line, self.component, self.field)


def caller_origin() -> Origin:
    """Return the innermost calling place outside remote_runner's own modules."""
    frame = sys._getframe(1)
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if module.split(".")[0] not in _INTERNAL_MODULES:
            return Origin(frame.f_code.co_filename, frame.f_lineno)
        frame = frame.f_back
    return Origin("<unknown>", 0)


class Component:
    """One program on one host, as configs write it (SPAR's mutable, typo-proof object).

    Only the names in :data:`LEGAL_FIELDS` can be set; anything else raises
    :class:`ConfigError` at the assigning line, suggesting the closest legal name.
    Keyword arguments are a shorthand for setting attributes one by one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        here = caller_origin()
        object.__setattr__(self, "_created", here)
        object.__setattr__(self, "_origins", {})
        object.__setattr__(self, "_added", None)
        if args:
            raise ConfigError("Component() takes no positional arguments; set attributes by name",
                              file=here.file, line=here.line)
        for name, make in _DEFAULTS.items():
            object.__setattr__(self, name, make())
        for name, value in kwargs.items():
            setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        here = caller_origin()
        if name not in LEGAL_FIELDS:
            raise ConfigError(_unknown_field_message(name), file=here.file, line=here.line,
                              component=self._known_name(), field=name)
        object.__setattr__(self, name, value)
        self._origins[name] = here

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes that are not set: a required field read too early.
        if name in REQUIRED_FIELDS:
            raise AttributeError(f"Component attribute {name!r} has not been set yet")
        raise AttributeError(f"Component has no attribute {name!r}")

    def _known_name(self) -> Optional[str]:
        """Return the component's name if it is already set to a string."""
        name = self.__dict__.get("name")
        return name if isinstance(name, str) and name else None

    def _origin_of(self, name: str) -> Origin:
        """Return where field *name* was set, else where the component was added or created."""
        return self._origins.get(name) or self._added or self._created

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={self.__dict__[k]!r}" for k in LEGAL_FIELDS if k in self.__dict__)
        return f"Component({shown})"


def set_field_at(component: Component, name: str, value: Any, origin: Origin) -> None:
    """Set a field as if the line at *origin* had set it (configs written in YAML)."""
    if name not in LEGAL_FIELDS:
        raise ConfigError(_unknown_field_message(name), file=origin.file, line=origin.line,
                          component=component._known_name(), field=name)
    object.__setattr__(component, name, value)
    component._origins[name] = origin


def component_at(origin: Origin) -> Component:
    """Return a new Component whose errors point at *origin* (configs written in YAML)."""
    component = Component()
    object.__setattr__(component, "_created", origin)
    return component


def _unknown_field_message(name: str) -> str:
    """Explain that *name* is not a Component attribute, suggesting the closest one."""
    close = difflib.get_close_matches(name, LEGAL_FIELDS, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"unknown Component attribute {name!r}{hint}; legal attributes: "
            + ", ".join(sorted(LEGAL_FIELDS)))


class Config:
    """The list of components a config builds (SPAR's ``config`` object)."""

    LOCAL_HOST = LOCAL_HOST

    def __init__(self) -> None:
        self._components: List[Component] = []

    def add_component(self, component: Component) -> None:
        """Add a deep copy of *component*, so a template can be changed and added again."""
        here = caller_origin()
        if not isinstance(component, Component):
            raise ConfigError(f"add_component() needs a Component, got {type(component).__name__}",
                              file=here.file, line=here.line)
        stored = copy.deepcopy(component)
        object.__setattr__(stored, "_added", here)
        self._components.append(stored)

    def add_component_at(self, component: Component, origin: Origin) -> None:
        """Add a deep copy of *component* as added at *origin* (configs written in YAML)."""
        stored = copy.deepcopy(component)
        object.__setattr__(stored, "_added", origin)
        self._components.append(stored)

    def clear_components(self) -> None:
        """Remove every component (muddlers rebuild the list this way)."""
        self._components.clear()

    def remove_component(self, component: Component) -> None:
        """Remove one stored component (by identity)."""
        self._components[:] = [c for c in self._components if c is not component]

    def all_components(self) -> Iterator[Component]:
        """Iterate over the stored components themselves (changing them changes the config)."""
        return iter(list(self._components))

    def all_remote_components(self) -> Iterator[Component]:
        """Iterate over the components whose host is not ``localhost``."""
        return (c for c in self.all_components() if c.__dict__.get("host") != LOCAL_HOST)

    def all_local_components(self) -> Iterator[Component]:
        """Iterate over the ``localhost`` components."""
        return (c for c in self.all_components() if c.__dict__.get("host") == LOCAL_HOST)

    def all_hosts(self) -> set:
        """Return every host named, ``localhost`` included (as SPAR did)."""
        return {c.__dict__.get("host") for c in self._components if "host" in c.__dict__}

    def __len__(self) -> int:
        return len(self._components)


# --------------------------------------------------------------------------- running user files

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


# --------------------------------------------------------------------------- loading

def run_config(config_path: str, options: Any, extra_options: Any,
               dialect: Optional[str] = None) -> Config:
    """Execute the config file in its own directory and return the ``config`` it filled."""
    compiled = compile_user_file(config_path, "config", dialect)
    namespace = user_namespace(compiled, {
        "__file__": config_path,
        "__name__": CONFIG_MODULE_NAME,
        "config": Config(),
        "Component": Component,
        "util": util,
        "options": options,
        "extra_options": extra_options,
        "localhost": LOCAL_HOST,
        "hosts": _host_groups(options),
    })
    with user_code(config_path, "config", cwd=os.path.dirname(config_path), dialect=dialect):
        exec(compiled.code, namespace)
    config = namespace.get("config")
    if not isinstance(config, Config):
        raise ConfigError(f"the name 'config' was rebound to a {type(config).__name__}; "
                          "add components with config.add_component(...)", file=config_path)
    return config


def _host_groups(options: Any) -> "HostGroups":
    """The ``--hosts-from`` groups the command line read (empty without the flag)."""
    from remote_runner.inventory import HostGroups
    groups = getattr(options, "host_groups", None)
    return groups if isinstance(groups, HostGroups) else HostGroups()


def load_experiment(config_file: str, options: Optional[argparse.Namespace],
                    muddler_file: Optional[str] = None, arg_parser_file: Optional[str] = None,
                    extra_args: Union[str, List[str], None] = None) -> Experiment:
    """Run arg parser, config and muddler (in that order) and validate the result.

    Raises :class:`ConfigError` for mistakes in any of the files and
    :class:`CopyError` for a missing local source, before any host is touched.
    """
    from remote_runner import muddle  # muddle builds on this module

    if options is None:
        options = argparse.Namespace(ssh_user=None)
    config_path = resolve_user_file(config_file, "config")
    muddler_path = resolve_user_file(muddler_file, "muddler") if muddler_file else None
    dialect = getattr(options, "python", None)
    extra_options = muddle.load_extra_options(arg_parser_file, extra_args,
                                              getattr(options, "ssh_user", None), dialect)
    if config_path.endswith((".yaml", ".yml")):
        from remote_runner import yamlconfig
        config = yamlconfig.load_config(config_path, extra_options,
                                        _host_groups(options).as_dict())
    else:
        config = run_config(config_path, options, extra_options, dialect)
    config_dir = os.path.dirname(config_path)
    if muddler_path:
        config = muddle.apply_muddler(muddler_path, config, options, extra_options, config_dir,
                                      dialect)
    return build_experiment(config, config_path, extra_options)


# --------------------------------------------------------------------------- validation

def build_experiment(config: Config, config_path: str, extra_options: Any = None) -> Experiment:
    """Validate every component of *config* and return the frozen :class:`Experiment`."""
    config_dir = os.path.dirname(config_path)
    if not len(config):
        raise ConfigError("the config added no components (use config.add_component(c))",
                          file=config_path)
    specs: List[ComponentSpec] = []
    seen: Dict[Tuple[str, str], ComponentSpec] = {}
    for component in config.all_components():
        spec = _Validator(component, config_dir).spec()
        if spec.key in seen:
            first = seen[spec.key]
            raise ConfigError(f"a component with this name already exists on host {spec.host!r} "
                              f"(added at {first.origin}); names must be unique per host",
                              file=spec.origin.file, line=spec.origin.line,
                              component=spec.name, field="name")
        seen[spec.key] = spec
        specs.append(spec)
    return Experiment(config_file=config_path, config_dir=config_dir, components=tuple(specs),
                      extra_options=extra_options)


class _Validator:
    """Check one Component field by field and build its :class:`ComponentSpec`."""

    def __init__(self, component: Component, config_dir: str) -> None:
        self.c = component
        self.values = component.__dict__
        self.config_dir = config_dir
        self.name = component._known_name()

    def fail(self, field_name: str, message: str) -> ConfigError:
        """Build the error for *field_name*, located where that field was set."""
        where = self.c._origin_of(field_name)
        return ConfigError(message, file=where.file, line=where.line, component=self.name,
                           field=field_name)

    def spec(self) -> ComponentSpec:
        """Return the validated spec (raises on the first problem)."""
        for name in REQUIRED_FIELDS:
            if name not in self.values:
                raise self.fail(name, f"{name} is required but was never set")
        name = self._name()
        host = self._plain_string("host")
        reason = bad_name_reason(host.rpartition("@")[2]) or bad_name_reason(host.rpartition("@")[0])
        if reason:
            raise self.fail("host", f"host {host!r} {reason}")
        self._one_host(host)
        local = host == LOCAL_HOST
        mirror = self._bool("mirror")
        if local and mirror:
            raise self.fail("mirror", "mirror=True makes no sense on a localhost component")
        executable = self._plain_string("executable")
        if local and not os.path.isabs(executable):
            executable = os.path.normpath(os.path.join(self.config_dir, executable))
        origins = self.c._origins
        return ComponentSpec(
            name=name, host=host, executable=executable, args=self._args(),
            files=self._files(local), base_dir=self._base_dir(),
            start_index=self._start_index(), wait=self._bool("wait"), mirror=mirror,
            num_cores=self._num_cores(), origin=self.c._added or self.c._created,
            field_origins=tuple(sorted(origins.items())), export=self._export(mirror),
            ready=self._ready(), ready_timeout=self._ready_timeout(), results=self._results(),
            env=self._env())

    def _one_host(self, host: str) -> None:
        """Refuse a node set (``client[1-8]``) as a host: one component runs on one host."""
        from remote_runner import hostsets
        if "[" not in host and "," not in host:
            return
        try:
            many = hostsets.expand(host)
        except hostsets.HostSetError:
            return  # e.g. an IPv6 address in brackets; connecting reports real problems
        if len(many) > 1:
            raise self.fail("host", f"host {host!r} is a set of {len(many)} hosts, but a "
                                    "component runs on one host; add one component per host, "
                                    "e.g. `for h in hosts[\"clients\"]:` with --hosts-from, or "
                                    f"a loop over {many[:2] + ['...']!r} (YAML: `on: {host}`)")

    def _name(self) -> str:
        name = self._plain_string("name")
        if "/" in name or any(ord(ch) < 32 for ch in name):
            raise self.fail("name", f"name {name!r} must not contain '/' or control characters")
        return name

    def _plain_string(self, field_name: str) -> str:
        value = self.values[field_name]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field_name, f"{field_name} must be a non-empty string, got {value!r}")
        return self._no_controls(field_name, value)

    def _no_controls(self, field_name: str, value: str, what: str = "") -> str:
        """Refuse control characters (NUL, newline, ESC, ...) in a name or path.

        They would end up in shell scripts, screen commands and the lines the
        tool reads back from hosts, where a newline can forge a line and an
        escape sequence can rewrite the user's terminal.
        """
        bad = control_characters(value)
        if bad:
            raise self.fail(field_name, f"{what or field_name} {value!r} contains control "
                                        f"character(s) {bad}; names and paths may not")
        return value

    def _bool(self, field_name: str) -> bool:
        value = self.values[field_name]
        if not isinstance(value, bool):
            raise self.fail(field_name, f"{field_name} must be True or False, got {value!r}")
        return value

    def _args(self) -> Tuple[str, ...]:
        value = self.values["args"]
        if not isinstance(value, (list, tuple)):
            raise self.fail("args", f"args must be a list of strings, got {type(value).__name__}")
        out = []
        for index, arg in enumerate(value):
            if isinstance(arg, bool) or not isinstance(arg, (str, int, float)):
                raise self.fail("args", f"args must be a list of str/int/float; args[{index}] is "
                                        f"{arg!r} ({type(arg).__name__}); convert it explicitly")
            text = str(arg)
            if "\0" in text:
                raise self.fail("args", f"args[{index}] contains a NUL character")
            out.append(text)
        return tuple(out)

    def _base_dir(self) -> Optional[str]:
        value = self.values["base_dir"]
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail("base_dir", f"base_dir must be None or an absolute path, got {value!r}")
        if not value.startswith("/"):
            raise self.fail("base_dir", f"base_dir {value!r} is relative; use an absolute path "
                                        "(or None for a fresh temporary directory on the host)")
        return self._no_controls("base_dir", value)

    def _start_index(self) -> Union[int, float]:
        value = self.values["start_index"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and math.isnan(value)):
            raise self.fail("start_index", f"start_index must be a number, got {value!r}")
        return value

    def _export(self, mirror: bool) -> Tuple[str, ...]:
        """``export``: local paths (absolute, or relative to the config) the mirror also serves."""
        value = self.values["export"]
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise self.fail("export", f"export must be a list of local paths, got {value!r}")
        if value and not mirror:
            raise self.fail("export", "export only applies to mirror=True components")
        out = []
        for item in value:
            if not isinstance(item, str) or not item:
                raise self.fail("export", f"export entries must be non-empty strings, got {item!r}")
            self._no_controls("export", item)
            path = os.path.expanduser(item)
            out.append(path if os.path.isabs(path) else os.path.join(self.config_dir, path))
        return tuple(out)

    def _ready(self) -> Optional[str]:
        value = self.values.get("ready")
        try:
            parse_ready(value)
        except ConfigError as exc:
            raise self.fail("ready", exc.message) from None
        return value

    def _ready_timeout(self) -> float:
        value = self.values.get("ready_timeout", 60.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise self.fail("ready_timeout", f"ready_timeout must be a positive number of "
                                             f"seconds, got {value!r}")
        return float(value)

    def _results(self) -> Tuple[str, ...]:
        value = self.values.get("results", [])
        if not isinstance(value, (list, tuple)):
            raise self.fail("results", f"results must be a list of glob patterns relative to "
                                       f"base_dir, got {type(value).__name__}")
        out = []
        for index, pattern in enumerate(value):
            if not isinstance(pattern, str) or not pattern.strip() or "\0" in pattern:
                raise self.fail("results", f"results[{index}] must be a non-empty string, "
                                           f"got {pattern!r}")
            parts = pattern.split("/")
            if pattern.startswith("/") or ".." in parts or "\n" in pattern:
                raise self.fail("results", f"results[{index}] {pattern!r} must be relative to "
                                           "base_dir, without '..' or newlines")
            out.append(pattern)
        return tuple(out)

    def _env(self) -> Tuple[Tuple[str, str], ...]:
        value = self.values.get("env", {})
        if not isinstance(value, dict):
            raise self.fail("env", f"env must be a dict of NAME -> value, got "
                                   f"{type(value).__name__}")
        out = []
        for name, text in value.items():
            if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise self.fail("env", f"env name {name!r} is not a valid variable name")
            if isinstance(text, bool) or not isinstance(text, (str, int, float)):
                raise self.fail("env", f"env[{name!r}] must be a str/int/float, got {text!r}")
            if "\0" in str(text):
                raise self.fail("env", f"env[{name!r}] contains a NUL character")
            out.append((name, str(text)))
        return tuple(out)

    def _num_cores(self) -> Optional[int]:
        value = self.values["num_cores"]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail("num_cores", f"num_cores must be None or a positive int, got {value!r}")
        return value

    def _files(self, local: bool) -> Tuple[FileSpec, ...]:
        value = self.values["files"]
        if not isinstance(value, dict):
            raise self.fail("files", f"files must be a dict of local source -> destination, "
                                     f"got {type(value).__name__}")
        if value and local:
            raise self.fail("files", "a localhost component cannot have files (nothing is copied "
                                     "locally); use absolute paths or paths relative to the config")
        by_dest: Dict[str, FileSpec] = {}
        for src, dest in value.items():
            for what, text in (("source", src), ("destination", dest)):
                if not isinstance(text, str) or not text:
                    raise self.fail("files", f"files {what} must be a non-empty string, got {text!r}")
                self._no_controls("files", text, f"files {what}")
            spec = self._file_spec(src, dest)
            key = os.path.normpath(dest)
            if key in by_dest and by_dest[key].src != spec.src:
                raise self.fail("files", f"two sources go to destination {dest!r}: "
                                         f"{by_dest[key].src!r} and {spec.src!r}")
            by_dest.setdefault(key, spec)
        return tuple(by_dest.values())

    def _file_spec(self, src: str, dest: str) -> FileSpec:
        path = os.path.normpath(os.path.join(self.config_dir, os.path.expanduser(src)))
        if not os.path.exists(path):
            where = self.c._origin_of("files")
            raise SourceError(f"local source {src!r} does not exist (looked for {path})",
                              path=path, file=where.file, line=where.line, component=self.name)
        if not (os.path.isfile(path) or os.path.isdir(path)):
            where = self.c._origin_of("files")
            raise SourceError(f"local source {src!r} is neither a regular file nor a directory",
                              path=path, file=where.file, line=where.line, component=self.name)
        return FileSpec(src=path, dest=dest, is_dir=os.path.isdir(path))
