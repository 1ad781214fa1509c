"""The end of a run: wait for the ``wait`` components, then stop the rest (``-t``).

Starting is one command per host per wave; waiting is the opposite shape, a
loop of bounded polls (one command per host per round, at most
:data:`POLL_SLICE` seconds each), so a dead link raises instead of hanging and
Ctrl-C is seen between rounds. A launcher that vanished without writing a
status is a failure too. Terminating signals each window's process group
(TERM, then KILL after the grace), so a program's children go with it.

Kept apart from :mod:`remote_runner.runner`, which builds and starts a run:
:class:`RunEnd` is the part of the :class:`~remote_runner.runner.Runner` that
runs after the last wave, using its placements, report, record and shells.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from remote_runner import events as ev
from remote_runner import hostops
from remote_runner import screen as scr
from remote_runner.errors import HostError
from remote_runner.runrecord import utc_now

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.runmodel import Placement, RunOptions, RunReport
    from remote_runner.runrecord import ComponentRecord
    from remote_runner.shell import Shell

LOG = logging.getLogger(__name__)

#: Longest single poll of a host while waiting (seconds): one bounded command per round.
POLL_SLICE = 15.0
#: Polls in a row that may say nothing about the waited components before the host is given up.
BLANK_POLLS = 5


class RunEnd:
    """Waiting for and stopping a run's components (mixed into the runner)."""

    options: "RunOptions"
    report: "RunReport"
    placements: Dict[str, List["Placement"]]
    shells: Dict[str, "Shell"]
    events: Any

    if TYPE_CHECKING:  # pragma: no cover - the runner provides these
        def _say(self, kind: str, host: Optional[str], message: str = "",
                 level: int = logging.INFO, component: Optional[str] = None,
                 **data: Any) -> None: ...

        def _component_record(self, host: str, place: "Placement") -> "ComponentRecord": ...

        def _parallel(self, func: Any, hosts: Any, doing: str = "",
                      places: Any = None) -> None: ...

    def wait_all(self) -> None:
        """Block until every wait (and mirrored) component has exited, or the wait timeout."""
        waited = self._waited()
        if not waited:
            return
        deadline = (None if self.options.wait_timeout is None
                    else time.monotonic() + self.options.wait_timeout)
        for host, places in waited.items():
            for place in places:
                self._say(ev.KIND_COMPONENT_WAITING, host, component=place.spec.name,
                          level=logging.DEBUG, log_file=place.window.log_file)
        self._say(ev.KIND_NOTE, None, "waiting for " + ", ".join(
            f"{p.spec.host}:{p.spec.name}" for ps in waited.values() for p in ps))
        from remote_runner.tails import LogTailer
        tailer = LogTailer(self.shells, waited, self.events, self.options.tail_logs)
        try:
            self._parallel(lambda host: self._wait_on_host(host, waited[host], deadline),
                           list(waited), "waiting", waited)
        finally:
            tailer.stop()

    def terminate(self) -> None:
        """Stop every non-wait component, and waited ones still running (timeout, Ctrl-C).

        Each is stopped by signalling its window's process group.
        """
        targets = {host: [p for p in places
                          if (not p.spec.wait and not p.spec.mirror)
                          or (self.report.components[p.spec.key].status is None
                              and self.report.components[p.spec.key].pid is not None)]
                   for host, places in self.placements.items()}
        targets = {h: ps for h, ps in targets.items() if ps}
        if not any(p.spec.wait for ps in self.placements.values() for p in ps):
            LOG.warning("--terminate: no component has wait=True, so nothing marks the end of "
                        "the run; leaving components running")
            return
        if targets:
            self._parallel(lambda host: self._terminate_on_host(host, targets[host]),
                           list(targets), "stopping", targets)

    # -- per host -----------------------------------------------------------

    def _wait_on_host(self, host: str, places: List[Placement], deadline: Optional[float]) -> None:
        """Poll *host* until every component in *places* has a status (or the deadline)."""
        pending = {p.window.stem: p for p in places}
        blank = 0  # polls in a row that answered for none of the pending windows
        while pending:
            slice_ = POLL_SLICE
            if deadline is not None:
                slice_ = min(slice_, max(0.0, deadline - time.monotonic()))
            states = self._poll_status(host, list(pending.values()), slice_)
            if not any(stem in pending for stem in states):
                # the host ran something else than our poll (its login shell changed, a
                # ForceCommand) or answered garbage: never a tight loop of execs, never for ever
                blank += 1
                if blank >= BLANK_POLLS:
                    raise HostError(host, f"{blank} polls of the waited components in a row "
                                          "answered nothing about them",
                                    "check that the login shell still runs commands "
                                    "(`ssh HOST true`), then `remote-runner status`")
                time.sleep(min(2.0, 0.1 * 2 ** blank))
                continue
            blank = 0
            for stem, (state, value) in states.items():
                place = pending.get(stem)
                if place is None or state == "RUNNING":
                    continue
                self._record_end(host, place, state, value)
                del pending[stem]
            if pending and deadline is not None and time.monotonic() >= deadline:
                for place in pending.values():
                    result = self.report.components[place.spec.key]
                    result.failure = (f"still running after --wait-timeout "
                                      f"{self.options.wait_timeout:g} s")
                    self._say(ev.KIND_COMPONENT_ENDED, host,
                              f"{place.spec.name} {result.failure}", level=logging.ERROR,
                              component=place.spec.name, status=None, failure=result.failure,
                              waited=True)
                return

    def _record_end(self, host: str, place: Placement, state: str, value: str) -> None:
        """Store and log how one waited component ended."""
        result = self.report.components[place.spec.key]
        rec = self._component_record(host, place)
        rec.ended = utc_now()
        if state == "DONE":
            result.status = int(value) if value.lstrip("-").isdigit() else None
            rec.exit_status = result.status
            rec.state = ("exited ?" if result.status is None
                         else hostops.describe_status(result.status))
        else:
            rec.state = "missing"
        if state == "DONE":
            if result.status == 0:
                self._say(ev.KIND_COMPONENT_ENDED, host, f"{place.spec.name} exited with status 0",
                          component=place.spec.name, status=0, failure=None,
                          waited=place.spec.wait)
                return
            failure = f"exited with status {value}" + (
                " (command not found)" if result.status == 127 else "")
        else:
            failure = "its window ended without recording an exit status"
        if place.spec.wait:
            result.failure = failure
        self._say(ev.KIND_COMPONENT_ENDED, host, f"{place.spec.name} {failure}",
                  level=logging.ERROR if place.spec.wait else logging.WARNING,
                  component=place.spec.name, status=result.status, failure=failure,
                  waited=place.spec.wait)

    def _poll_status(self, host: str, places: List[Placement], seconds: float
                     ) -> Dict[str, Tuple[str, str]]:
        """Run one bounded poll on *host*; return stem -> (DONE|GONE|RUNNING, value)."""
        return scr.poll_windows(self.shells[host], [p.window for p in places], seconds)

    def _terminate_on_host(self, host: str, places: List[Placement]) -> None:
        """Stop the windows of *places* by process group (TERM, then KILL after the grace)."""
        stopped = scr.stop_windows(self.shells[host], [p.window for p in places],
                                   self.options.terminate_grace)
        for place in places:
            if place.window.stem not in stopped.signalled:
                continue  # it had ended by itself: not terminated by us
            self.report.components[place.spec.key].terminated = True
            rec = self._component_record(host, place)
            if rec.ended is None:
                rec.state, rec.ended = "stopped", utc_now()
            self._say(ev.KIND_COMPONENT_TERMINATED, host, f"terminated {place.spec.name}",
                      component=place.spec.name)
        if stopped.killed:
            self._say(ev.KIND_NOTE, host,
                      f"{', '.join(stopped.killed)} ignored SIGTERM and got SIGKILL",
                      level=logging.WARNING)

    def _waited(self) -> Dict[str, List[Placement]]:
        """Return, per host, the components a run waits for (wait=True or mirrored)."""
        waited = {host: [p for p in places if p.spec.wait or p.spec.mirror]
                  for host, places in self.placements.items()}
        return {h: ps for h, ps in waited.items() if ps}
