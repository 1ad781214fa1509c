"""The run record: what one run started where, kept on this machine as JSON.

Every command after ``run`` (``status``, ``logs``, ``stop``, ``restart``,
``fetch``, ``attach``) works from this record rather than from the config, for
two reasons: evaluating a config runs user code and a muddler that may give a
different answer today (other hosts, other ports), and the questions those
commands answer are about *what was started*, not what the config says now.

Where records live
------------------
``$REMOTE_RUNNER_RUNS`` if set, else ``$XDG_STATE_HOME/remote-runner/runs``
(``~/.local/state/remote-runner/runs``). One directory per run::

    runs/
      latest -> 20261201-134501-3fa2       (symlink to the newest run)
      20261201-134501-3fa2/
        record.json                        (this module's schema, below)
        h1/server/…                        (``remote-runner fetch``: results and log)

Run ids are ``YYYYMMDD-HHMMSS-xxxx`` (UTC time, 4 random hex digits), so they
sort by start time and two runs started in the same second still differ.

Schema (``"schema": 1``)
------------------------
``run_id``, ``created`` / ``finished`` (ISO 8601 UTC), ``runner`` (``pid``,
``host`` of this machine), ``config`` / ``muddler`` (``path``, ``sha1``),
``options`` (the command line's options; passwords replaced by ``"***"``),
``screen`` (session name), ``ssh`` (``config_file``, ``user``), ``hosts`` (per
host alias: ``target`` ``user@address:port``, ``jump`` chain, ``state_dir``,
``run_dir``, ``session`` id) and ``components`` (a list of
:class:`ComponentRecord` fields: host, name, stem, base_dir, executable, args,
env, files, results, ready, ready_timeout, settle, temp_base, start_index, wait,
mirror, pid, state, exit_status, started, ended).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from remote_runner.errors import ConfigError, RunnerError

SCHEMA = 1
RECORD_FILE = "record.json"
LATEST = "latest"
#: Option names whose values never reach a record.
SECRET_OPTIONS = ("ssh_pass", "password")


class RecordError(RunnerError):
    """No usable run record (none yet, unknown id, damaged file)."""

    exit_code = 2


def new_run_id(now: Optional[_dt.datetime] = None) -> str:
    """Return a sortable run id such as ``20261201-134501-3fa2``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def utc_now() -> str:
    """Return the current time as ISO 8601 UTC (seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def runs_dir() -> str:
    """Return the directory holding every run record on this machine."""
    explicit = os.environ.get("REMOTE_RUNNER_RUNS")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "remote-runner", "runs")


def mask_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """Return JSON-friendly *options* with secrets replaced by ``***``."""
    out: Dict[str, Any] = {}
    for key, value in sorted(options.items()):
        if key in SECRET_OPTIONS or key == "func":
            if key != "func" and value:
                out[key] = "***"
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = [str(v) for v in value]
        else:
            out[key] = str(value)
    return out


@dataclass
class HostRecord:
    """One host as the run reached it."""

    alias: str
    target: str = ""
    jump: List[str] = field(default_factory=list)
    state_dir: str = ""
    run_dir: str = ""
    session: str = ""


@dataclass
class ComponentRecord:
    """One component as it was started (and, once known, how it ended)."""

    host: str
    name: str
    stem: str
    base_dir: str
    executable: str
    args: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)
    files: List[List[Any]] = field(default_factory=list)
    results: List[str] = field(default_factory=list)
    ready: Optional[str] = None
    ready_timeout: float = 60.0
    settle: Optional[float] = None  # the component's own; None: the run's --settle
    temp_base: bool = False  # base_dir made by the run (mktemp); `clean` removes it
    start_index: float = 0
    wait: bool = False
    mirror: bool = False
    pid: Optional[int] = None
    state: str = "planned"
    exit_status: Optional[int] = None
    started: Optional[str] = None
    ended: Optional[str] = None

    @property
    def label(self) -> str:
        """``host/name``, as commands print it."""
        return f"{self.host}/{self.name}"


@dataclass
class RunRecord:
    """Everything the lifecycle commands need to know about one run."""

    run_id: str
    created: str = field(default_factory=utc_now)
    finished: Optional[str] = None
    runner: Dict[str, Any] = field(default_factory=lambda: {"pid": os.getpid(),
                                                            "host": socket.gethostname()})
    config: Dict[str, Optional[str]] = field(default_factory=dict)
    muddler: Optional[Dict[str, Optional[str]]] = None
    options: Dict[str, Any] = field(default_factory=dict)
    screen: str = "runner"
    ssh: Dict[str, Optional[str]] = field(default_factory=dict)
    hosts: Dict[str, HostRecord] = field(default_factory=dict)
    components: List[ComponentRecord] = field(default_factory=list)
    directory: Optional[str] = field(default=None, compare=False)

    # -- lookup ---------------------------------------------------------------

    def component(self, host: str, name: str) -> ComponentRecord:
        """Return the record of component *name* on *host*."""
        for comp in self.components:
            if comp.host == host and comp.name == name:
                return comp
        raise KeyError((host, name))

    def select(self, names: Optional[List[str]] = None,
               hosts: Optional[List[str]] = None) -> List[ComponentRecord]:
        """Return the components matching *names* (``name`` or ``host/name``) and *hosts*.

        Raises :class:`ConfigError` naming what matched nothing, and the choices.
        """
        chosen = list(self.components)
        if hosts:
            unknown = [h for h in hosts if h not in {c.host for c in self.components}]
            if unknown:
                raise ConfigError(f"run {self.run_id} has no host {', '.join(unknown)} "
                                  f"(hosts: {', '.join(sorted(self.hosts)) or 'none'})",
                                  field="--host")
            chosen = [c for c in chosen if c.host in hosts]
        if names:
            picked: List[ComponentRecord] = []
            for wanted in names:
                hits = [c for c in chosen if wanted in (c.name, c.label)]
                if not hits:
                    raise ConfigError(f"run {self.run_id} has no component {wanted!r} "
                                      f"(components: {', '.join(c.label for c in self.components)})",
                                      field="COMPONENT")
                picked.extend(h for h in hits if h not in picked)
            chosen = picked
        return chosen

    # -- storage ---------------------------------------------------------------

    @property
    def path(self) -> str:
        """Return the record file's path."""
        return os.path.join(self.directory or os.path.join(runs_dir(), self.run_id), RECORD_FILE)

    def to_json(self) -> Dict[str, Any]:
        """Return the record as the documented JSON object."""
        data = _plain(self)
        data.pop("directory", None)
        return {"schema": SCHEMA, **data}

    def save(self) -> str:
        """Write the record (temporary file + rename) and point ``latest`` at it."""
        directory = self.directory or os.path.join(runs_dir(), self.run_id)
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        tmp = self.path + ".tmp"
        # Compact, in one piece: the standard library encodes that in C, whereas an
        # indented or streamed dump runs in Python (a run copying thousands of files
        # is saved twice, and paid ~50 ms for each).
        text = json.dumps(self.to_json(), separators=(",", ":"))
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text + "\n")
        os.replace(tmp, self.path)
        _point_latest(os.path.dirname(directory), os.path.basename(directory))
        return self.path

    @classmethod
    def from_json(cls, data: Dict[str, Any], directory: Optional[str] = None) -> "RunRecord":
        """Build a record from its JSON object."""
        if data.get("schema") != SCHEMA:
            raise RecordError(f"run record schema {data.get('schema')!r} is not {SCHEMA}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields and k not in ("hosts", "components")}
        record = cls(**kwargs)
        known_h = {f.name for f in dataclasses.fields(HostRecord)}
        record.hosts = {alias: HostRecord(**{k: v for k, v in h.items() if k in known_h})
                        for alias, h in data.get("hosts", {}).items()}
        known_c = {f.name for f in dataclasses.fields(ComponentRecord)}
        record.components = [ComponentRecord(**{k: v for k, v in c.items() if k in known_c})
                             for c in data.get("components", [])]
        record.directory = directory
        return record


def host_record(host: str, connection: Any, state_dir: str, run_dir: str) -> HostRecord:
    """Describe how *host* was reached (``user@address:port``, ProxyJump chain)."""
    if connection is None:
        return HostRecord(host, "localhost", [], state_dir, run_dir)
    jump = (getattr(connection, "config", None) or {}).get("proxyjump") or ""
    hops = [] if jump.strip().lower() in ("", "none") else [
        j.strip() for j in jump.split(",") if j.strip()]
    target = (f"{getattr(connection, 'username', '?')}@{getattr(connection, 'hostname', host)}"
              f":{getattr(connection, 'port', 22)}")
    return HostRecord(host, target, hops, state_dir, run_dir)


def component_record(record: "RunRecord", host: str, spec: Any, stem: str,
                     base_dir: str, temp_base: bool = False) -> ComponentRecord:
    """Return *record*'s entry for component *spec* on *host*, adding it on first use."""
    for rec in record.components:
        if rec.host == host and rec.name == spec.name:
            return rec
    rec = ComponentRecord(
        host=host, name=spec.name, stem=stem, base_dir=base_dir, executable=spec.executable,
        args=list(spec.args), env=dict(spec.env),
        files=PlainRows([f.src, f.dest, f.is_dir] for f in spec.files), results=list(spec.results),
        ready=spec.ready, ready_timeout=spec.ready_timeout, settle=spec.settle,
        temp_base=temp_base,
        start_index=spec.start_index,
        wait=spec.wait, mirror=spec.mirror)
    record.components.append(rec)
    return rec


class PlainRows(list):
    """Rows made only of JSON scalars (a component's files: [src, dest, is_dir] each), built
    once when the component enters the record and never changed: written as they are."""


def _plain(value: Any) -> Any:
    """*value* as JSON types: ``dataclasses.asdict`` without its deep copy of every leaf.

    A record is written before and after every start (``status`` reads it while
    the run goes on); asdict's copying was most of that write's cost, then looking
    at each of a thousand-file component's rows (~1 ms per 1,000 on each write).
    """
    kind = type(value)
    if kind in _SCALARS:  # most of a record (its files' names): checked first, and cheaply
        return value
    if kind is PlainRows:
        return value
    if kind is list or kind is tuple:
        if all(type(v) in _SCALARS for v in value):  # a file's [src, dest, is_dir]: no call per leaf
            return list(value)
        return [_plain(v) for v in value]
    if kind is dict:
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_SCALARS = frozenset((str, int, float, bool, type(None)))


def _point_latest(parent: str, run_id: str) -> None:
    """Make ``parent/latest`` a symlink to *run_id* (replaced atomically)."""
    link = os.path.join(parent, LATEST)
    tmp = f"{link}.{os.getpid()}.tmp"
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(run_id, tmp)
        os.replace(tmp, link)
    except OSError:
        pass  # a missing `latest` only makes --run necessary


def load(run_id: Optional[str] = None) -> RunRecord:
    """Return the record of *run_id*, or of the newest run when it is None or ``latest``."""
    base = runs_dir()
    if run_id in (None, "", LATEST):
        link = os.path.join(base, LATEST)
        if not os.path.exists(link):
            raise RecordError(f"no run recorded yet in {base}: start one with "
                              "`remote-runner run -c CONFIG` (or set $REMOTE_RUNNER_RUNS)")
        run_id = os.path.basename(os.path.realpath(link))
    assert run_id is not None
    if os.sep in run_id or run_id.startswith("."):
        raise RecordError(f"run id {run_id!r} is not a run id (like 20261201-134501-3fa2)")
    directory = os.path.join(base, run_id)
    path = os.path.join(directory, RECORD_FILE)
    try:
        with open(path, encoding="utf-8") as src:
            data = json.load(src)
    except FileNotFoundError:
        known = sorted(d for d in _listdir(base) if d != LATEST)[-5:]
        raise RecordError(f"no run {run_id!r} in {base}"
                          + (f" (latest runs: {', '.join(known)})" if known else "")) from None
    except (OSError, ValueError) as exc:
        raise RecordError(f"run record {path} is unreadable: {exc}") from exc
    return RunRecord.from_json(data, directory)


def _listdir(path: str) -> List[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def file_sha1(path: Optional[str]) -> Optional[str]:
    """Return the SHA-1 of the file at *path* (None when there is none)."""
    if not path:
        return None
    import hashlib
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as src:
            for block in iter(lambda: src.read(1 << 16), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()
