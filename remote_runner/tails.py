"""The last log line of each waited component, read while the run waits, for live views.

While a run waits (for a benchmark, a checker, a long job) a user wants to see that it is alive
and what it is doing, without attaching to screen. Each component's launcher already writes
``<stem>.log`` on its host, so one short command per host every few seconds reads the last
line of each waited component's log, and a ``component.log`` event carries it when it changed.

This runs only when asked (``RunOptions.tail_logs`` > 0: the live view on a terminal), on its
own threads, one per host, and never fails the run: a host that does not answer in time is
simply asked again later. The host is not trusted: lines are cut to :data:`MAX_LINE` characters
and stripped of control characters (escape sequences could rewrite the user's terminal).
"""

from __future__ import annotations

import logging
import re
import shlex
import threading
from typing import TYPE_CHECKING, Dict, List, Optional

from remote_runner import events as ev

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.runner import Placement
    from remote_runner.shell import Shell

LOG = logging.getLogger(__name__)

MAX_LINE = 200
MARK = "@@RR-TAIL "
_CONTROL = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|"
                      r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def strip_controls(text: str) -> str:
    """*text* without escape sequences and control characters other than tab."""
    return _CONTROL.sub("", text)


def clean_line(raw: str) -> str:
    """Return what a terminal should show of a log line: last \\r segment, no control codes."""
    segments = [p for p in raw.rstrip("\n").split("\r") if p.strip()]
    text = segments[-1] if segments else ""
    text = strip_controls(text).replace("\t", " ")
    return text[:MAX_LINE]


def tail_script(places: List["Placement"]) -> str:
    """One command printing a marker and the last line of each component's log."""
    lines = []
    for place in places:
        lines.append(f"printf '%s\\n' {shlex.quote(MARK + place.window.stem)}; "
                     f"tail -n 1 -- {shlex.quote(place.window.log_file)} 2>/dev/null "
                     f"| head -c 4096; echo")
    return "\n".join(lines) + "\n"


def parse_tails(stdout: str) -> Dict[str, str]:
    """Parse :func:`tail_script` output into stem -> cleaned last line."""
    found: Dict[str, str] = {}
    current: Optional[str] = None
    for line in stdout.split("\n"):
        if line.startswith(MARK):
            current = line[len(MARK):]
            found[current] = ""
        elif current is not None and line and not found[current]:
            found[current] = clean_line(line)
    return found


class LogTailer:
    """Read the waited components' last log lines every *interval* seconds (0: do nothing)."""

    def __init__(self, shells: Dict[str, "Shell"], waited: Dict[str, List["Placement"]],
                 reporter: ev.Reporter, interval: float) -> None:
        self.reporter = reporter
        self.interval = interval
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        if interval <= 0:
            return
        for host, places in waited.items():
            thread = threading.Thread(target=self._watch, args=(shells[host], host, places),
                                      name=f"tail-{host}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _watch(self, shell: "Shell", host: str, places: List["Placement"]) -> None:
        names = {p.window.stem: p.spec.name for p in places}
        last: Dict[str, str] = {}
        script = tail_script(places)
        while not self._stop.wait(self.interval):
            try:
                result = shell.script(script, timeout=max(5.0, self.interval * 3))
            except Exception as exc:  # noqa: BLE001 - a missed look is harmless
                LOG.debug("%s: reading log tails failed: %s", host, exc)
                continue
            for stem, line in parse_tails(result.stdout).items():
                if stem in names and line and line != last.get(stem):
                    last[stem] = line
                    self.reporter.emit(ev.Event(ev.KIND_COMPONENT_LOG, host=host,
                                                component=names[stem], level=logging.DEBUG,
                                                data={"line": line}))

    def stop(self) -> None:
        """Stop reading (threads end within one interval; they are daemons)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=1.0)
