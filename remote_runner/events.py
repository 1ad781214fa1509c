"""What happens during a run, as events: the runner says what it did, reporters show it.

The runner is orchestration; how a run *looks* depends on where it is watched: a live view on
a terminal, grep-able ``HH:MM:SS LEVEL: host: message`` lines in a pipe or a CI log, a recap
table, a JSON document for scripts. So the runner (and any other library code: the mirror,
run records, future subcommands) only emits :class:`Event` objects to a :class:`Reporter`, and
the command line decides which reporters listen (:mod:`remote_runner.console`).

An event is small and typed: a ``kind`` (see the ``KIND_*`` constants), the host and component
it concerns, a human message (what a plain log line says), a level, and ``data`` with the
numbers a live view or a recap needs. Reporters are called from worker threads and must be
thread-safe and quick.

Log lines also name their host when they come from code that does not know it: each per-host
job runs inside :func:`host_context`, and :class:`HostFilter` prefixes ``host: `` to records
made there (and to paramiko's, whose logger name carries the host) that lack it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, TypeVar

LOG = logging.getLogger("remote_runner.events")

# Phases of a run, in order.
PHASES = ("connect", "prepare", "copy", "start", "wait", "terminate")

KIND_PHASE_BEGIN = "phase.begin"          # data: total (hosts or components in the phase)
KIND_PHASE_END = "phase.end"              # data: ok (bool), seconds
KIND_HOST_CONNECTED = "host.connected"
KIND_HOST_FAILED = "host.failed"          # data: error
KIND_HOST_SESSION = "host.session"        # data: session, state_dir
KIND_COPY_PLANNED = "copy.planned"        # data: files, bytes (what will really be uploaded)
KIND_COPY_PROGRESS = "copy.progress"      # data: bytes (delta)
KIND_COPY_DONE = "copy.done"              # data: copied, unchanged, bytes
KIND_COMPONENT_STARTED = "component.started"    # data: pid, start_index, session
KIND_COMPONENT_WAITING = "component.waiting"    # data: log_file
KIND_COMPONENT_LOG = "component.log"            # data: line (its last log line)
KIND_COMPONENT_ENDED = "component.ended"        # data: status, failure, waited
KIND_COMPONENT_TERMINATED = "component.terminated"
KIND_NOTE = "note"                        # anything else worth a line

T = TypeVar("T")


@dataclass(frozen=True)
class Event:
    """One thing that happened during a run."""

    kind: str
    message: str = ""
    host: Optional[str] = None
    component: Optional[str] = None
    phase: Optional[str] = None
    level: int = logging.INFO
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def line(self) -> str:
        """The plain-text form: ``host: message`` (or the message alone)."""
        return f"{self.host}: {self.message}" if self.host else self.message


class Reporter(Protocol):
    """Anything that wants to know what a run does."""

    def emit(self, event: Event) -> None:
        """Take one event (called from any thread; must not block)."""


class NullReporter:
    """Ignore every event."""

    def emit(self, event: Event) -> None:
        return None


class LogReporter:
    """Turn every event that has a message into a log record at its level.

    This is the default, so library users and the plain (non-terminal) output get the same
    ``host: message`` lines; progress events carry no message and are not logged.
    """

    def __init__(self, logger: logging.Logger = LOG, min_level: int = logging.NOTSET,
                 host_min_level: int = logging.NOTSET) -> None:
        self.logger = logger
        self.min_level = min_level
        #: with hundreds of hosts, per-host lines below this level are left to the recap
        #: (phase summaries, warnings and errors still show)
        self.host_min_level = host_min_level

    def emit(self, event: Event) -> None:
        if event.host and event.level < self.host_min_level:
            return
        if event.message and event.level >= self.min_level:
            self.logger.log(event.level, "%s", event.line())


class Fanout:
    """Pass every event to several reporters; one that fails does not stop the others."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters: List[Reporter] = list(reporters)

    def emit(self, event: Event) -> None:
        for reporter in self.reporters:
            try:
                reporter.emit(event)
            except Exception:  # noqa: BLE001 - a display bug must not break the run
                logging.getLogger(__name__).debug("reporter %r failed", reporter, exc_info=True)


@contextlib.contextmanager
def phase(reporter: Reporter, name: str, total: int, message: str = "") -> Iterator[Dict[str, Any]]:
    """Emit phase begin/end around a block; the block may put a summary in ``info['message']``."""
    started = time.monotonic()
    info: Dict[str, Any] = {"message": ""}
    reporter.emit(Event(KIND_PHASE_BEGIN, message, phase=name, level=logging.DEBUG,
                        data={"total": total}))
    ok = False
    try:
        yield info
        ok = True
    finally:
        seconds = time.monotonic() - started
        reporter.emit(Event(KIND_PHASE_END, info["message"] if ok else "", phase=name,
                            data={"ok": ok, "seconds": seconds}))


# --------------------------------------------------------------------------- host context

_current_host: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "remote_runner_host", default=None)


@contextlib.contextmanager
def host_context(host: Optional[str]) -> Iterator[None]:
    """Mark log records made in this block (this thread) as concerning *host*."""
    token = _current_host.set(host)
    try:
        yield
    finally:
        _current_host.reset(token)


def for_host(host: str, func: Callable[..., T]) -> Callable[..., T]:
    """Wrap *func* so it runs inside ``host_context(host)`` (for thread pools)."""
    def run(*args: Any, **kwargs: Any) -> T:
        with host_context(host):
            return func(*args, **kwargs)
    return run


PARAMIKO_CHANNEL = "paramiko.transport.host."


class HostFilter(logging.Filter):
    """Prefix ``host: `` to records that concern a host but do not name it first."""

    def filter(self, record: logging.LogRecord) -> bool:
        host = _current_host.get()
        if record.name.startswith(PARAMIKO_CHANNEL):
            host = record.name[len(PARAMIKO_CHANNEL):].split(".")[0] or host
        if host:
            message = record.getMessage()
            if not (message.startswith(host + ": ") or message.startswith(f"host {host}")):
                record.msg = f"{host}: {message}"
                record.args = ()
        return True


