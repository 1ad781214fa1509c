"""How many times a run talked to each host: exec channels, steps, SFTP sessions and requests.

Wall time on a fast lab link hides what a slow link punishes: every exec
channel costs a channel open, an exec request and the command's own reply
(two to three round trips before any work), every SFTP session a channel
and a version exchange, every SFTP request at least one reply. Counting them
per connection makes "nothing changed costs one round trip per host" a
property a test can assert, and lets ``-v``, ``--json`` and the bench show it.

The counts are honest about what they are: *execs* are exec channels
opened (every script, lock, status poll), *steps* are scripts run on the
session lock's open shell (:mod:`remote_runner.sessionlock`: one round trip
each, no channel), *sftp_sessions* are SFTP
subsystems started, *sftp_requests* are SFTP requests sent (a pipelined
write of a large file is many requests in few round trips). Keepalive
probes are not counted: they are not work the run asked for.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Dict

import paramiko


@dataclass
class Traffic:
    """What one connection did (thread-safe counters)."""

    execs: int = 0
    steps: int = 0
    sftp_sessions: int = 0
    sftp_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, what: str, n: int = 1) -> None:
        """Add *n* to the counter *what* (``execs``, ``steps``, ``sftp_sessions``, ``sftp_requests``)."""
        with self._lock:
            setattr(self, what, getattr(self, what) + n)

    def snapshot(self) -> Dict[str, int]:
        """The counts now, as a plain dict (what ``--json`` and the report carry)."""
        with self._lock:
            return {"execs": self.execs, "steps": self.steps, "sftp_sessions": self.sftp_sessions,
                    "sftp_requests": self.sftp_requests}


def describe(counts: Dict[str, int]) -> str:
    """``3 execs, 1 step, 1 sftp session, 12 sftp requests`` for a :meth:`Traffic.snapshot`."""
    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"
    return ", ".join([plural(counts.get("execs", 0), "exec"), plural(counts.get("steps", 0), "step"),
                      plural(counts.get("sftp_sessions", 0), "sftp session"),
                      plural(counts.get("sftp_requests", 0), "sftp request")])


class CountingSFTPClient(paramiko.SFTPClient):
    """An SFTP client that counts the requests it sends into a :class:`Traffic`."""

    traffic: "Traffic | None" = None

    def _async_request(self, fileobj: Any, t: int, *args: Any) -> Any:
        if self.traffic is not None:
            self.traffic.count("sftp_requests")
        return super()._async_request(fileobj, t, *args)


def open_sftp(transport: paramiko.Transport, traffic: Traffic) -> paramiko.SFTPClient:
    """Start an SFTP session on *transport* whose requests are counted in *traffic*.

    No step waits for ever on a host that stalls (an sftp-server stuck on a hung
    home directory): the session's open has a deadline, the subsystem request a
    watchdog that closes the channel (paramiko waits for its answer unbounded),
    and every later answer or window :data:`~remote_runner.channelio.IDLE_TIMEOUT`.
    """
    from remote_runner.channelio import IDLE_TIMEOUT, open_session
    channel = open_session(transport, IDLE_TIMEOUT)
    channel.settimeout(IDLE_TIMEOUT)
    watchdog = threading.Timer(IDLE_TIMEOUT, channel.close)
    watchdog.daemon = True
    watchdog.start()
    try:
        channel.invoke_subsystem("sftp")  # paramiko: SSHException when refused or closed
    finally:
        watchdog.cancel()
    client = CountingSFTPClient(channel)
    client.traffic = traffic
    traffic.count("sftp_sessions")
    return client
