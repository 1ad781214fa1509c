"""The end of a run: what happened per host and per component, as a table or as JSON.

Ansible's PLAY RECAP and pssh's ``[SUCCESS]`` lines answer "did it work, and where not?" in one
glance; scripts want the same answer as data. :class:`Recorder` listens to the run's events
(connections, copies, starts, ends, with their times), and :meth:`Recorder.summary` joins them
with the runner's report into a :class:`RunSummary`, which renders as

* a rich table (terminal) or aligned plain text (anything else) — :func:`render_text`;
* one JSON document — :meth:`RunSummary.to_dict`, schema ``remote-runner/run/1``
  (:data:`remote_runner.schemas.RUN_SCHEMA`, documented in the README; ``run_id`` is null
  where the run has no record id).

Both are built even when the run failed half-way, so the recap says how far it got.
"""

from __future__ import annotations

import datetime
import os
import shlex
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from remote_runner import events as ev
from remote_runner.errors import EXIT_PARTIAL

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import ComponentSpec, Experiment
    from remote_runner.runner import RunReport

RUN_SCHEMA_ID = "remote-runner/run/1"
#: Above this many hosts the recap (and the plain lines) aggregate: counts, then only the hosts
#: with a problem and the slowest ones.
MANY_HOSTS = 20
SLOWEST = 5


@dataclass
class HostOutcome:
    """One host's row of the recap."""

    host: str
    connected: Optional[bool] = None   # None: never tried (an earlier step failed), or local
    error: Optional[str] = None
    session: Optional[str] = None
    state_dir: Optional[str] = None
    files_copied: int = 0
    files_unchanged: int = 0
    bytes_copied: int = 0
    started: int = 0
    ready: int = 0
    failed: int = 0
    #: seconds from the run's start until its last component started (None: none started)
    seconds: Optional[float] = None
    #: exec channels, steps on the lock's shell, SFTP sessions and SFTP requests the run
    #: made on it (None: no connection)
    execs: Optional[int] = None
    steps: Optional[int] = None
    sftp_sessions: Optional[int] = None
    sftp_requests: Optional[int] = None


@dataclass
class ComponentOutcome:
    """One component's fate."""

    host: str
    name: str
    start_index: Any
    wait: bool
    mirror: bool
    base_dir: Optional[str] = None
    pid: Optional[int] = None
    exit_status: Optional[int] = None
    failure: Optional[str] = None
    terminated: bool = False
    outcome: str = "not started"   # not started | skipped | running | exited | failed | terminated
    started_at: Optional[str] = None
    ended_at: Optional[str] = None
    seconds: Optional[float] = None
    last_log_line: Optional[str] = None


@dataclass
class RunSummary:
    """Everything the recap and ``--json`` say about a run."""

    run_id: Optional[str]
    config_file: str
    screen: str
    ok: bool
    exit_code: int
    error: Optional[str]
    started_at: str
    finished_at: str
    seconds: float
    phases: Dict[str, float] = field(default_factory=dict)
    hosts: List[HostOutcome] = field(default_factory=list)
    components: List[ComponentOutcome] = field(default_factory=list)
    #: the run's ``-F`` file and ``-u`` user, so the attach hints work when pasted (not in the JSON)
    ssh_config: Optional[str] = None
    ssh_user: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """Return the ``--json`` document (stable keys, see the README's schema)."""
        return {
            "schema": RUN_SCHEMA_ID,
            "run_id": self.run_id,
            "config_file": self.config_file,
            "screen": self.screen,
            "result": "ok" if self.ok else "partial" if self.exit_code == EXIT_PARTIAL else "failed",
            "exit_code": self.exit_code,
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "seconds": round(self.seconds, 3),
            "phases": [{"name": name, "seconds": round(secs, 3)}
                       for name, secs in self.phases.items()],
            "hosts": [asdict(h) for h in self.hosts],
            "components": [asdict(c) for c in self.components],
        }


def _iso(stamp: Optional[float]) -> Optional[str]:
    if stamp is None:
        return None
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


class Recorder:
    """Collect the events of one run (thread-safe) for the recap and the JSON result."""

    def __init__(self) -> None:
        self.began = time.time()
        self._lock = threading.Lock()
        self.connected: Dict[str, Optional[str]] = {}     # host -> None (ok) or error
        self.phases: Dict[str, float] = {}
        self.started: Dict[Tuple[str, str], float] = {}
        self.ended: Dict[Tuple[str, str], float] = {}
        self.lines: Dict[Tuple[str, str], str] = {}

    def emit(self, event: ev.Event) -> None:
        key = (event.host or "", event.component or "")
        with self._lock:
            if event.kind == ev.KIND_HOST_CONNECTED and event.host:
                self.connected[event.host] = None
            elif event.kind == ev.KIND_HOST_FAILED and event.host:
                self.connected[event.host] = str(event.data.get("error", "failed"))
            elif event.kind == ev.KIND_PHASE_END and event.phase:
                self.phases[event.phase] = float(event.data.get("seconds", 0.0))
            elif event.kind == ev.KIND_COMPONENT_STARTED:
                self.started[key] = event.time
            elif event.kind in (ev.KIND_COMPONENT_ENDED, ev.KIND_COMPONENT_TERMINATED):
                self.ended.setdefault(key, event.time)
            elif event.kind == ev.KIND_COMPONENT_LOG:
                self.lines[key] = str(event.data.get("line", ""))

    def summary(self, experiment: "Experiment", screen: str, report: "RunReport",
                error: Optional[BaseException], exit_code: int,
                run_id: Optional[str] = None, ssh_config: Optional[str] = None,
                ssh_user: Optional[str] = None) -> RunSummary:
        """Join what was recorded with the runner's report."""
        finished = time.time()
        # Names that reach one login are one host (one connection, one session): one row,
        # under the name the run used for it, and skipped together.
        host_of = dict(getattr(report, "host_of", {}) or {})

        def group(spec: "ComponentSpec") -> str:
            return host_of.get(spec.host, spec.host)

        hosts: Dict[str, HostOutcome] = {}
        for spec in experiment.components:
            hosts.setdefault(group(spec), HostOutcome(group(spec)))
        components: List[ComponentOutcome] = []
        with self._lock:
            for host, outcome in hosts.items():
                if host in self.connected:
                    outcome.connected = self.connected[host] is None
                    outcome.error = self.connected[host]
                outcome.session = report.session.get(host)
                outcome.state_dir = report.state_dirs.get(host)
                copied = report.sync.get(host)
                if copied is not None:
                    outcome.files_copied = len(copied.copied)
                    outcome.files_unchanged = len(copied.skipped)
                    outcome.bytes_copied = copied.bytes
                traffic = getattr(report, "traffic", {}).get(host)
                if traffic is not None:
                    outcome.execs = traffic.get("execs")
                    outcome.steps = traffic.get("steps")
                    outcome.sftp_sessions = traffic.get("sftp_sessions")
                    outcome.sftp_requests = traffic.get("sftp_requests")
            for spec in sorted(experiment.components, key=lambda s: (s.host, s.start_index, s.name)):
                key = spec.key
                result = report.components.get(key)
                item = ComponentOutcome(host=spec.host, name=spec.name,
                                        start_index=spec.start_index, wait=spec.wait,
                                        mirror=spec.mirror)
                if result is not None:
                    item.base_dir = result.base_dir
                    item.pid, item.exit_status = result.pid, result.status
                    item.failure, item.terminated = result.failure, result.terminated
                item.outcome = _outcome(item)
                if group(spec) in getattr(report, "skipped", {}) and item.pid is None:
                    item.outcome = "skipped"
                begin, end = self.started.get(key), self.ended.get(key)
                item.started_at, item.ended_at = _iso(begin), _iso(end)
                if begin is not None:
                    item.seconds = round((end or finished) - begin, 3)
                item.last_log_line = self.lines.get(key)
                components.append(item)
                row = hosts[group(spec)]
                row.started += item.pid is not None
                row.failed += item.outcome == "failed"
                row.ready += item.outcome in ("running", "exited", "terminated")
                if begin is not None:
                    row.seconds = max(row.seconds or 0.0, round(begin - self.began, 3))
            phases = dict(self.phases)
        return RunSummary(run_id=run_id, config_file=experiment.config_file, screen=screen,
                          ok=error is None, exit_code=exit_code,
                          error=None if error is None else str(error),
                          started_at=_iso(self.began) or "", finished_at=_iso(finished) or "",
                          seconds=finished - self.began, phases=phases,
                          hosts=[hosts[h] for h in sorted(hosts)], components=components,
                          ssh_config=os.path.abspath(ssh_config) if ssh_config else None,
                          ssh_user=ssh_user)


def _outcome(item: ComponentOutcome) -> str:
    if item.failure is not None or (item.exit_status not in (None, 0)):
        return "failed"
    if item.terminated:
        return "terminated"
    if item.exit_status == 0:
        return "exited"
    return "running" if item.pid is not None else "not started"


# --------------------------------------------------------------------------- rendering

def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


HEADERS = ("host", "connected", "copied", "unchanged", "bytes", "started", "ready", "failed",
           "attach")


def shown_hosts(summary: RunSummary, limit: int = MANY_HOSTS) -> List[HostOutcome]:
    """All hosts when few; else those with a problem, then the slowest (``SLOWEST``)."""
    if len(summary.hosts) <= limit:
        return list(summary.hosts)
    trouble = [h for h in summary.hosts if h.connected is False or h.failed
               or (h.host != "localhost" and h.connected and h.started == 0)]
    rest = sorted((h for h in summary.hosts if h not in trouble and h.seconds is not None),
                  key=lambda h: -(h.seconds or 0.0))
    return trouble[:limit] + rest[:SLOWEST]


def counts_line(summary: RunSummary) -> str:
    """One line of totals over every host (the head of an aggregated recap)."""
    hosts = summary.hosts
    connected = sum(1 for h in hosts if h.connected)
    unreachable = sum(1 for h in hosts if h.connected is False)
    outcomes: Dict[str, int] = {}
    for c in summary.components:
        outcomes[c.outcome] = outcomes.get(c.outcome, 0) + 1
    copied = sum(h.files_copied for h in hosts)
    same = sum(h.files_unchanged for h in hosts)
    size = _size(sum(h.bytes_copied for h in hosts))
    parts = ", ".join(f"{n} {name}" for name, n in sorted(outcomes.items()))
    return (f"{len(hosts)} hosts: {connected} connected, {unreachable} unreachable; files: "
            f"{copied} copied ({size}), {same} unchanged; {len(summary.components)} "
            f"components: {parts}")


def rows(summary: RunSummary, limit: int = MANY_HOSTS) -> List[Tuple[str, ...]]:
    """The recap table's rows, as strings (aggregated above *limit* hosts)."""
    out = []
    for h in shown_hosts(summary, limit):
        connected = ("local" if h.host == "localhost" else
                     "-" if h.connected is None else "yes" if h.connected else "FAILED")
        config = f"-F {shlex.quote(summary.ssh_config)} " if summary.ssh_config else ""
        if summary.ssh_user and "@" not in h.host:  # (the run's -u, as its connection used it)
            config += f"-l {shlex.quote(summary.ssh_user)} "
        attach = (f"screen -r {h.session}" if h.host == "localhost" and h.session else
                  f"ssh -t {config}{shlex.quote(h.host)} screen -r {h.session}" if h.session
                  else "-")
        out.append((h.host, connected, str(h.files_copied), str(h.files_unchanged),
                    _size(h.bytes_copied), str(h.started), str(h.ready), str(h.failed), attach))
    return out


def _first(names: List[str], limit: int = 10) -> str:
    """*names* joined, at most *limit* of them (``… and N more``)."""
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def result_line(summary: RunSummary) -> str:
    """The last line of the recap."""
    started = sum(h.started for h in summary.hosts)
    failed = [f"{c.host}:{c.name}" for c in summary.components if c.outcome == "failed"]
    verdict = ("ok" if summary.ok else "PARTIAL" if summary.exit_code == EXIT_PARTIAL
               else "FAILED")
    text = (f"result: {verdict} (exit {summary.exit_code}) — "
            f"{len(summary.hosts)} host(s), {started}/{len(summary.components)} component(s) "
            f"started, {summary.seconds:.1f} s")
    if failed:
        text += "; failed: " + _first(failed)
    unreachable = [h.host for h in summary.hosts if h.connected is False]
    if unreachable:
        text += "; unreachable: " + _first(unreachable)
    skipped = sum(1 for c in summary.components if c.outcome == "skipped")
    if skipped:
        text += f"; {skipped} component(s) skipped"
    return text


def render_text(summary: RunSummary) -> str:
    """The recap as aligned plain text (pipes, logs)."""
    table = [HEADERS] + rows(summary)
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
    lines = ["RECAP"]
    if len(summary.hosts) > MANY_HOSTS:
        lines += [counts_line(summary), f"hosts with a problem, then the {SLOWEST} slowest "
                  f"(all {len(summary.hosts)} in --json):"]
    for row in table:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    lines.append(result_line(summary))
    return "\n".join(lines) + "\n"


def render_rich(summary: RunSummary) -> Any:
    """The recap as a rich renderable (terminals)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title="recap", title_justify="left", expand=False)
    for header in HEADERS:
        table.add_column(header, justify="right" if header in (
            "copied", "unchanged", "bytes", "started", "ready", "failed") else "left",
            no_wrap=header != "attach", overflow="fold")
    for row in rows(summary):
        styled = list(row)
        table.add_row(*[Text(cell, style="bold red" if cell == "FAILED" or (
            HEADERS[i] == "failed" and cell != "0") else "") for i, cell in enumerate(styled)])
    verdict = Text(result_line(summary), style="bold green" if summary.ok else "bold red")
    if len(summary.hosts) > MANY_HOSTS:
        table.caption = (f"{counts_line(summary)}\nshown: hosts with a problem, then the "
                         f"{SLOWEST} slowest (all in --json)")
    return Group(table, verdict)
