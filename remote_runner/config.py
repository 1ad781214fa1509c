"""Experiment configs: the objects a user's config fills and the frozen specs the runner uses.

A config is a Python file (SPAR's format) that fills ``config`` with mutable
:class:`Component` objects. Two layers keep that flexible *and* safe:

* :class:`Component` / :class:`Config` are what configs and muddlers touch.
  A Component accepts only its legal attributes and fails **at the line** that
  sets anything else; every assignment remembers its ``file:line`` (and
  ``add_component`` remembers where each copy was added), so errors found later,
  in validation, still point at the user's line.
* :class:`ComponentSpec` / :class:`Experiment` are frozen, type-checked views the
  runner uses, built by :mod:`remote_runner.validation`, which resolves local
  paths and checks local sources before anything touches a host.

Running the user's files (and blaming their lines for what goes wrong) is
:mod:`remote_runner.usercode`; the order arg parser, config, muddler,
validation is :mod:`remote_runner.loader`.

Decisions that differ from SPAR (see docs/notes): ``wait`` defaults to False;
``mirror`` and the legacy ``num_cores`` are accepted; names are unique per
``(host, name)``; a relative ``base_dir`` is an error (SPAR handed it to screen's
``chdir``, so it resolved against whatever directory the session happened to
have); ``files`` on a ``localhost`` component is an error.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from remote_runner.errors import ConfigError, CopyError, located

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
    "private_tmp": lambda: False,
    "ready": lambda: None,
    "ready_timeout": lambda: 60.0,
    "settle": lambda: None,
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
    #: seconds alive after its start that make it started (None: the run's ``--settle``)
    settle: Optional[float] = None
    results: Tuple[str, ...] = ()
    env: Tuple[Tuple[str, str], ...] = ()
    field_origins: Tuple[Tuple[str, Origin], ...] = field(default=(), compare=False, repr=False)
    #: mirror=True: local paths served to the host besides the defaults (``PATH`` or ``PATH:ro``).
    export: Tuple[str, ...] = ()
    #: mirror=True: the host's own /tmp and /var/tmp (``exec --private-tmp``), shared by the
    #: mirrored components of one host.
    private_tmp: bool = False

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


#: Values a component copy may share with the original: nothing can change them.
_SHARED = (str, int, float, bool, bytes, type(None), Origin)


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

    def __deepcopy__(self, memo: Dict[int, Any]) -> "Component":
        """A copy for :meth:`Config.add_component`: values deep-copied, origins kept as they are.

        Strings, numbers and origins are immutable and shared; only containers
        (args, files, env ...) are copied. Generic deepcopy took about 1 ms a
        component, a third of a second for a 400-component config.
        """
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_origins":
                value = dict(value)
            elif type(value) is dict and all(type(k) is str and type(v) is str for k, v in value.items()):
                value = dict(value)  # files, env: strings only (a 1,000-file tree: 4 ms -> 0.1 ms)
            elif not isinstance(value, _SHARED):
                value = copy.deepcopy(value, memo)
            object.__setattr__(new, key, value)
        return new


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
    import difflib  # (here: only a mistake needs it)
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
