"""Starting a run's components: one confirmed wave per ``start_index``, one command per host each.

Why apart: this is the step where a run replaces the last good experiment,
so its rule is the one users rely on: nothing on a host changes until every
host is prepared and every copy is complete. A host's *first* start command
then does, in one exec step, what the start needs: it renames the files sent
ahead with the change check into place (:mod:`remote_runner.precheck`),
writes the launchers of all the host's waves (:mod:`remote_runner.hostsetup`),
quits (or, with ``--no-kill``, adopts) the previous screen session, opens the
wave's windows and confirms each healthy (alive after ``--settle``, or
``ready``); the next ``start_index`` begins only when every window of this
one is confirmed on every host. A run that fails before its start removes the
files it sent ahead, leaving every destination as it was.

:class:`Starting` is that part of the :class:`~remote_runner.runner.Runner`.
"""

from __future__ import annotations

import logging
import shlex
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from remote_runner import events as ev
from remote_runner import hostops
from remote_runner import screen as scr
from remote_runner.runmodel import Placement
from remote_runner.runrecord import utc_now

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.mirror.session import MirrorSession
    from remote_runner.precheck import EarlyCheck
    from remote_runner.runmodel import MirrorFactory, RunOptions, RunReport
    from remote_runner.runrecord import ComponentRecord, RunRecord
    from remote_runner.shell import Shell
    from remote_runner.ssh import Connection

LOG = logging.getLogger(__name__)


class Starting:
    """Writing launchers and starting the waves (mixed into the runner)."""

    options: "RunOptions"
    report: "RunReport"
    record: "RunRecord"
    connections: Dict[str, "Connection"]
    shells: Dict[str, "Shell"]
    screens: Dict[str, scr.Screen]
    placements: Dict[str, List[Placement]]
    host_of: Dict[str, str]
    sent_ahead: Dict[str, Dict[str, str]]
    early: Dict[str, "EarlyCheck"]
    mirror: Optional["MirrorSession"]
    mirror_factory: "MirrorFactory"
    _setup: Dict[str, str]

    if TYPE_CHECKING:  # pragma: no cover - the runner provides these
        def _say(self, kind: str, host: Optional[str], message: str = "",
                 level: int = logging.INFO, component: Optional[str] = None,
                 **data: Any) -> None: ...

        def _parallel(self, func: Any, hosts: Any, doing: str = "",
                      places: Any = None) -> None: ...

        def _group_of(self, spec: Any) -> str: ...

        def _component_record(self, host: str, place: Placement) -> "ComponentRecord": ...

        def _launcher_setup(self, host: str) -> str: ...

    def write_launchers(self) -> None:
        """Build every component's launcher; they are written by each host's first start command."""
        mirrored = [p.spec for places in self.placements.values() for p in places if p.spec.mirror]
        if mirrored:
            by_name = {name: self.connections[group] for name, group in self.host_of.items()
                       if group in self.connections}
            self.mirror = self.mirror_factory({**by_name, **self.connections}, mirrored)
        self._setup = {host: self._placing(host) + self._launcher_setup(host)
                       for host in self.placements}

    def _placing(self, host: str) -> str:
        """Shell text renaming the files *host* staged into place (and removing the rest)."""
        temps = self.sent_ahead.get(host)
        if not temps:
            return ""
        done = self.report.sync.get(host)
        placed = set(done.placed) if done is not None else set()
        q = shlex.quote
        lines = []
        for dest, temp in sorted(temps.items()):
            if dest in placed:
                lines.append(f"mv -f -- {q(temp)} {q(dest)} {scr.placing_failed(dest)}\n")
            else:
                lines.append(f"rm -f -- {q(temp)}\n")
        check = self.early.get(host)
        before, after = check.refresh(placed) if check is not None else ("", "")
        return before + "".join(lines) + after

    def _drop_sent_ahead(self) -> None:
        """Remove the temporaries of hosts whose start never put them in place (a failed run)."""
        for host, temps in self.sent_ahead.items():
            shell = self.shells.get(host)
            if not temps or shell is None:
                continue
            try:
                shell.script("rm -f -- " + " ".join(shlex.quote(t) for t in temps.values()),
                             timeout=30)
            except Exception as exc:  # noqa: BLE001 - the stale sweep of a later run removes them
                LOG.debug("%s: could not remove the files staged ahead: %s", host, exc)
        self.sent_ahead = {}

    def start_all(self) -> None:
        """Start components by start_index, one confirmed wave at a time: one command per host.

        A host's first command also writes the launchers of all its waves and
        replaces the previous session (or adopts it with ``--no-kill``) — only
        now, once every host is prepared and every copy is complete, so a run
        that cannot start leaves the last good experiment running. Hosts with
        nothing in the first wave do that in parallel with it.
        """
        waves: Dict[Any, List[Placement]] = {}
        for places in self.placements.values():
            for place in places:
                waves.setdefault(place.spec.start_index, []).append(place)
        pending = set(self.placements)  # hosts whose session is not replaced yet
        for index in sorted(waves):
            by_host: Dict[str, List[Placement]] = {host: [] for host in pending}
            for place in waves[index]:
                by_host.setdefault(self._group_of(place.spec), []).append(place)
            self._say(ev.KIND_NOTE, None, f"starting index {index}: " + ", ".join(
                f"{p.spec.host}:{p.spec.name}" for p in waves[index]))
            first = set(pending)
            pending = set()
            self._parallel(lambda host: self._start_on_host(host, by_host[host], host in first),
                           list(by_host), f"starting index {index}", by_host)

    # -- per host -----------------------------------------------------------

    def _start_on_host(self, host: str, places: List[Placement], first: bool) -> None:
        """Open the windows of *places* on *host*, confirm them healthy, record their pids.

        One command: on the host's *first* one, the launchers are written and
        the previous session replaced before the windows open.
        """
        session = self.screens[host]
        checks = [hostops.HealthCheck(p.window, p.base_dir, p.spec.ready, p.spec.ready_timeout,
                                      p.spec.wait or p.spec.mirror, p.spec.settle) for p in places]
        replace = None
        if first:
            replace = "kill" if self.options.kill_first else "adopt"
        wave = session.start_wave([p.window for p in places],
                                  setup=self._setup.get(host, "") if first else "",
                                  replace=replace,
                                  health=hostops.health_script(checks, self.options.settle)
                                  if checks else "",
                                  grace=self.options.terminate_grace,
                                  extra_time=hostops.health_time(checks, self.options.settle))
        if first:
            self.sent_ahead.pop(host, None)  # in place (or removed) by this command's setup
        for old in wave.quit:
            self._say(ev.KIND_NOTE, host, f"quit previous screen session {old}")
        if wave.adopted:
            self._say(ev.KIND_NOTE, host,
                      f"adding windows to existing screen session {session.session_id}")
        self.report.session[host] = session.session_id or ""
        self.record.hosts[host].session = session.session_id or ""
        if not places:
            return
        for place in places:
            result = self.report.components[place.spec.key]
            result.pid = wave.pids[place.window.stem]
            self._component_record(host, place).started = utc_now()
        self._judge(host, places, hostops.parse_health(wave.stdout, checks))
        for place in places:
            result = self.report.components[place.spec.key]
            self._say(ev.KIND_COMPONENT_STARTED, host,
                      f"started {place.spec.name} (pid {result.pid}) in screen session "
                      f"{session.session_id}", component=place.spec.name, pid=result.pid,
                      start_index=place.spec.start_index, session=session.session_id)

    def _judge(self, host: str, places: List[Placement], health: Dict[str, hostops.Health]) -> None:
        """Record the health verdicts of *places*; raise ComponentUnhealthy for the first failure."""
        records = [self._component_record(host, p) for p in places]
        failures = hostops.judge(host, records, health)
        by_name = {p.spec.name: p for p in places}
        for failure in failures:
            result = self.report.components[by_name[failure.component].spec.key]
            result.status = self.record.component(host, failure.component).exit_status
            result.failure = failure.reason
        if failures:
            for extra in failures[1:]:
                LOG.error("%s", extra)
            raise failures[0]
