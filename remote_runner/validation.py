"""Validation: from the mutable components a config built to frozen, checked specs.

Configs and muddlers may set anything on a :class:`~remote_runner.config.Component`
(any type, in any order, several times); the runner needs one checked value per
field. Every field is checked here, and a bad one is reported at the line that
last set it, naming the component and the field. Local paths are resolved and
local sources checked too, so a missing file stops the run before any host is
touched.
"""

from __future__ import annotations

import functools
import math
import os
import posixpath
import re
import stat
from typing import Any, Dict, List, Optional, Tuple, Union

from remote_runner.config import (LOCAL_HOST, REQUIRED_FIELDS, Component, ComponentSpec, Config,
                                  Experiment, FileSpec, SourceError, parse_ready)
from remote_runner.errors import ConfigError, control_characters, shown
from remote_runner.names import bad_name_reason


def build_experiment(config: Config, config_path: str, extra_options: Any = None) -> Experiment:
    """Validate every component of *config* and return the frozen :class:`Experiment`."""
    config_dir = os.path.dirname(config_path)
    if not len(config):
        raise ConfigError("the config added no components (use config.add_component(c))",
                          file=config_path)
    specs: List[ComponentSpec] = []
    seen: Dict[Tuple[str, str], ComponentSpec] = {}
    modes: Dict[str, int] = {}  # local sources stat'ed so far: components often share them
    files: Dict[Any, Tuple[FileSpec, ...]] = {}  # files dicts checked so far (by content)
    for component in config.all_components():
        spec = _Validator(component, config_dir, modes, files).spec()
        if spec.key in seen:
            first = seen[spec.key]
            # one entry that made both (YAML's count or on, a loop's one add_component line)
            hint = ("; give each copy its own name ({index} or {host} in YAML, the loop's "
                    "variable in Python)" if first.origin == spec.origin else "")
            raise ConfigError(f"a component with this name already exists on host {spec.host!r} "
                              f"(added at {first.origin}); names must be unique per host{hint}",
                              file=spec.origin.file, line=spec.origin.line,
                              component=spec.name, field="name")
        seen[spec.key] = spec
        specs.append(spec)
    _one_scratch_per_host(specs)
    return Experiment(config_file=config_path, config_dir=config_dir, components=tuple(specs),
                      extra_options=extra_options)


def _one_scratch_per_host(specs: List[ComponentSpec]) -> None:
    """Refuse mirrored components of one host that disagree on ``private_tmp``: they share one mirror."""
    first: Dict[str, ComponentSpec] = {}
    for spec in specs:
        if not spec.mirror:
            continue
        other = first.setdefault(spec.host, spec)
        if other.private_tmp != spec.private_tmp:
            where = spec.origin_of("private_tmp")
            raise ConfigError(f"private_tmp={spec.private_tmp} but component {other.name!r} on the same "
                              f"host has private_tmp={other.private_tmp} (added at {other.origin}); the "
                              "mirrored components of one host share one mirror, so they must agree",
                              file=where.file, line=where.line, component=spec.name, field="private_tmp")


@functools.lru_cache(maxsize=256)
def _bad_regex(pattern: str) -> str:
    """What this machine's ``grep -E`` says of *pattern* ('' if it takes it, or cannot tell):
    the hosts run it to look for a ``log:`` readiness line, so a typo fails here, not there."""
    import subprocess
    try:
        done = subprocess.run(["grep", "-E", "-e", pattern, "/dev/null"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    if done.returncode != 2:
        return ""
    said = done.stderr.strip().splitlines()
    return said[-1].split(": ", 1)[-1] if said else "grep refused it"


class _Validator:
    """Check one Component field by field and build its :class:`ComponentSpec`."""

    def __init__(self, component: Component, config_dir: str,
                 modes: Optional[Dict[str, int]] = None,
                 files: Optional[Dict[Any, Tuple[FileSpec, ...]]] = None) -> None:
        self.c = component
        self.values = component.__dict__
        self.config_dir = config_dir
        self.name = component._known_name()
        #: mode of each local source already stat'ed (by normalised path), shared by components
        self.modes: Dict[str, int] = {} if modes is None else modes
        #: the file specs of each files dict already checked (by its items), shared by components:
        #: twenty clients copying one tree check its thousand files once, not twenty times
        self.checked_files: Dict[Any, Tuple[FileSpec, ...]] = {} if files is None else files

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
        self._one_program(executable)
        if local and not os.path.isabs(executable):
            executable = os.path.normpath(os.path.join(self.config_dir, executable))
        origins = self.c._origins
        return ComponentSpec(
            name=name, host=host, executable=executable, args=self._args(),
            files=self._files(local), base_dir=self._base_dir(),
            start_index=self._start_index(), wait=self._bool("wait"), mirror=mirror,
            num_cores=self._num_cores(), origin=self.c._added or self.c._created,
            field_origins=tuple(sorted(origins.items())), export=self._export(mirror),
            private_tmp=self._private_tmp(mirror),
            ready=self._ready(), ready_timeout=self._ready_timeout(), settle=self._settle(),
            results=self._results(),
            env=self._env())

    def _one_host(self, host: str) -> None:
        """Refuse a node set (``client[1-8]``) as a host: one component runs on one host."""
        from remote_runner import hostsets
        if "[" not in host and "," not in host:
            return
        try:
            many = hostsets.expand(host)
        except hostsets.HostSetError as exc:
            if re.fullmatch(r"(?:[^@\[\]]+@)?\[[0-9A-Fa-f:.%\w]+\](?::\d+)?", host):
                return  # an IPv6 address in brackets ([::1], user@[fe80::1%eth0]:22)
            raise self.fail("host", f"host {host!r} is neither a host name nor a host set: "
                                    f"{exc}") from None
        if len(many) > 1:
            raise self.fail("host", f"host {host!r} is a set of {len(many)} hosts, but a "
                                    "component runs on one host; add one component per host, "
                                    "e.g. `for h in hosts[\"clients\"]:` with --hosts-from, or "
                                    f"a loop over {many[:2] + ['...']!r} (YAML: `on: {host}`)")

    def _one_program(self, executable: str) -> None:
        """Refuse ``"python3 prog.sh"``: the executable is one program, its words go in args (a
        relative name with a space that no file copied is called is that mistake, not a name)."""
        if os.path.isabs(executable) or not re.search(r"\s", executable):
            return
        files = self.values.get("files")
        dests = {os.path.normpath(d) for d in files.values() if isinstance(d, str)} \
            if isinstance(files, dict) else set()
        if os.path.normpath(executable) in dests:
            return
        program, _, rest = executable.strip().partition(" ")
        raise self.fail("executable", f"executable {executable!r} is one program, not a command "
                                      f"line; write executable={program!r} and put "
                                      f"{rest.split()!r} in args")

    def _name(self) -> str:
        name = self._plain_string("name")
        if "/" in name or any(ord(ch) < 32 for ch in name):
            raise self.fail("name", f"name {name!r} must not contain '/' or control characters")
        return name

    def _plain_string(self, field_name: str) -> str:
        value = self.values[field_name]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field_name, f"{field_name} must be a non-empty string, got {shown(value)}")
        return self._no_controls(field_name, value)

    def _no_controls(self, field_name: str, value: str, what: str = "") -> str:
        """Refuse control characters (NUL, newline, ESC, ...) in a name or path.

        They would end up in shell scripts, screen commands and the lines the
        tool reads back from hosts, where a newline can forge a line and an
        escape sequence can rewrite the user's terminal.
        """
        bad = control_characters(value)
        if bad:
            raise self.fail(field_name, f"{what or field_name} {shown(value)} contains control "
                                        f"character(s) {bad}; names and paths may not")
        return value

    def _bool(self, field_name: str) -> bool:
        value = self.values[field_name]
        if not isinstance(value, bool):
            raise self.fail(field_name, f"{field_name} must be True or False, got {shown(value)}")
        return value

    def _args(self) -> Tuple[str, ...]:
        value = self.values["args"]
        if not isinstance(value, (list, tuple)):
            raise self.fail("args", f"args must be a list of strings, got {type(value).__name__}")
        out = []
        for index, arg in enumerate(value):
            if isinstance(arg, bool) or not isinstance(arg, (str, int, float)):
                raise self.fail("args", f"args must be a list of str/int/float; args[{index}] is "
                                        f"{shown(arg)} ({type(arg).__name__}); convert it explicitly")
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
            raise self.fail("base_dir", f"base_dir must be None or an absolute path, got {shown(value)}")
        if not value.startswith("/"):
            raise self.fail("base_dir", f"base_dir {shown(value)} is relative; use an absolute path "
                                        "(or None for a fresh temporary directory on the host)")
        return self._no_controls("base_dir", value)

    def _start_index(self) -> Union[int, float]:
        value = self.values["start_index"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise self.fail("start_index", f"start_index must be a number, got {shown(value)}")
        return value

    def _export(self, mirror: bool) -> Tuple[str, ...]:
        """``export``: local paths (absolute, or relative to the config) the mirror also serves."""
        value = self.values["export"]
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise self.fail("export", f"export must be a list of local paths, got {shown(value)}")
        if value and not mirror:
            raise self.fail("export", "export only applies to mirror=True components")
        out = []
        for item in value:
            if not isinstance(item, str) or not item:
                raise self.fail("export", f"export entries must be non-empty strings, got {shown(item)}")
            self._no_controls("export", item)
            path = os.path.expanduser(item)
            out.append(path if os.path.isabs(path) else os.path.join(self.config_dir, path))
        return tuple(out)

    def _private_tmp(self, mirror: bool) -> bool:
        """``private_tmp``: the mirror gives the host's own scratch trees (mirror=True only)."""
        value = self._bool("private_tmp")
        if value and not mirror:
            raise self.fail("private_tmp", "private_tmp only applies to mirror=True components")
        return value

    def _ready(self) -> Optional[str]:
        value = self.values.get("ready")
        try:
            parsed = parse_ready(value)
        except ConfigError as exc:
            raise self.fail("ready", exc.message) from None
        if parsed is not None and parsed[0] == "log":
            problem = _bad_regex(parsed[1])
            if problem:
                raise self.fail("ready", f"{value!r}: not an extended regex grep takes "
                                         f"({problem})")
        return value

    def _ready_timeout(self) -> float:
        value = self.values.get("ready_timeout", 60.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or not math.isfinite(value):
            raise self.fail("ready_timeout", f"ready_timeout must be a positive number of "
                                             f"seconds, got {shown(value)}")
        return float(value)

    def _settle(self) -> Optional[float]:
        value = self.values.get("settle")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 <= value < float("inf"):
            raise self.fail("settle", f"settle must be 0 or more seconds (or None for the run's "
                                      f"--settle), got {shown(value)}")
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
                                           f"got {shown(pattern)}")
            parts = pattern.split("/")
            if pattern.startswith("/") or ".." in parts or "\n" in pattern:
                raise self.fail("results", f"results[{index}] {shown(pattern)} must be relative to "
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
                raise self.fail("env", f"env[{name!r}] must be a str/int/float, got {shown(text)}")
            if "\0" in str(text):
                raise self.fail("env", f"env[{name!r}] contains a NUL character")
            out.append((name, str(text)))
        return tuple(out)

    def _num_cores(self) -> Optional[int]:
        value = self.values["num_cores"]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail("num_cores", f"num_cores must be None or a positive int, got {shown(value)}")
        return value

    def _files(self, local: bool) -> Tuple[FileSpec, ...]:
        value = self.values["files"]
        if not isinstance(value, dict):
            raise self.fail("files", f"files must be a dict of local source -> destination, "
                                     f"got {type(value).__name__}")
        if value and local:
            raise self.fail("files", "a localhost component cannot have files (nothing is copied "
                                     "locally); use absolute paths or paths relative to the config")
        try:
            items: Any = tuple(value.items())
            known = self.checked_files.get(items)
        except TypeError:  # something unhashable in it: refused below, with its field
            items = known = None
        if known is not None:
            return known
        by_dest: Dict[str, FileSpec] = {}
        for src, dest in value.items():
            for what, text in (("source", src), ("destination", dest)):
                if not isinstance(text, str) or not text:
                    raise self.fail("files", f"files {what} must be a non-empty string, got {shown(text)}")
                self._no_controls("files", text, f"files {what}")
            spec = self._file_spec(src, dest)
            key = os.path.normpath(dest)
            if key in by_dest and by_dest[key].src != spec.src:
                raise self.fail("files", f"two sources go to destination {dest!r}: "
                                         f"{by_dest[key].src!r} and {spec.src!r}")
            by_dest.setdefault(key, spec)
        specs = tuple(by_dest.values())
        if items is not None:
            self.checked_files[items] = specs
        return specs

    def _file_spec(self, src: str, dest: str) -> FileSpec:
        path = os.path.normpath(os.path.join(self.config_dir, os.path.expanduser(src)))
        mode = self.modes.get(path)
        try:
            if mode is None:  # one stat per file: a config may list thousands, for many hosts
                mode = self.modes[path] = os.stat(path).st_mode
        except OSError:
            where = self.c._origin_of("files")
            raise SourceError(f"local source {src!r} does not exist (looked for {path})",
                              path=path, file=where.file, line=where.line, component=self.name) from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            where = self.c._origin_of("files")
            raise SourceError(f"local source {src!r} is neither a regular file nor a directory",
                              path=path, file=where.file, line=where.line, component=self.name)
        if stat.S_ISREG(mode) and (dest.endswith("/") or os.path.normpath(dest) in (".", "/")):
            # (not cp's "into this directory": a destination names the file itself)
            raise self.fail("files", f"files destination {dest!r} of the file {src!r} names a "
                                     f"directory; give the file's own path, e.g. "
                                     f"{posixpath.normpath(posixpath.join(dest, os.path.basename(path)))!r}")
        return FileSpec(src=path, dest=dest, is_dir=stat.S_ISDIR(mode))
