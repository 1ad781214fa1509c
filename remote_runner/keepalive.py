"""Notice servers that stop answering — with one thread for all connections, not one each.

A connection whose server froze (a stopped sshd, a cut link with no RST) would otherwise block
the run forever. OpenSSH's answer is ``ServerAliveInterval`` × ``ServerAliveCountMax``: probe
with a request that needs a reply and give up when none comes. We do the same, but a thread per
connection doing it meant that 500 hosts kept 500 extra threads asleep for the whole run (on
top of paramiko's own transport thread each). So one monitor thread keeps every watch and its
schedule; a probe (``keepalive@openssh.com`` with want-reply, which blocks until the reply) runs
in a short-lived thread that lives one round trip when the server is well. Only a silent server
keeps its probe thread until the monitor gives up on it and closes the transport, which also
ends the probe.

The deadline counts from when the probe was sent, so a slow start of a probe thread cannot
close a healthy connection.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import paramiko

log = logging.getLogger(__name__)

#: Longest the monitor sleeps between looks at its watches.
TICK = 0.5


@dataclass(eq=False)
class Watch:
    """One transport under watch; ``reason`` says why the monitor closed it (else '')."""

    host: str
    transport: paramiko.Transport
    interval: float
    count_max: int
    reason: str = ""
    next_probe: float = 0.0
    sent: Optional[float] = None            # when the outstanding probe went out
    stopped: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def stop(self) -> None:
        """Stop watching (the connection is being closed on purpose)."""
        self.stopped = True


class Monitor:
    """The one thread that probes every watched transport on its own schedule."""

    def __init__(self) -> None:
        self._watches: List[Watch] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def watch(self, host: str, transport: paramiko.Transport, interval: float,
              count_max: int) -> Watch:
        """Start watching *transport*: probe every *interval* s, close after *count_max* misses."""
        item = Watch(host, transport, interval, max(1, count_max),
                     next_probe=time.monotonic() + interval)
        with self._lock:
            self._watches.append(item)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ssh-keepalive",
                                                daemon=True)
                self._thread.start()
        self._wake.set()
        return item

    def count(self) -> int:
        """How many transports are watched."""
        with self._lock:
            return len(self._watches)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._watches = [w for w in self._watches
                                 if not w.stopped and w.transport.is_active()]
                watches = list(self._watches)
                if not watches:
                    self._thread = None
                    return
            now = time.monotonic()
            for item in watches:
                self._check(item, now)
            soonest = min((w.next_probe if w.sent is None else w.sent + w.interval * w.count_max)
                          for w in watches)
            self._wake.wait(max(0.05, min(TICK, soonest - time.monotonic())))
            self._wake.clear()

    def _check(self, item: Watch, now: float) -> None:
        with item._lock:
            if item.sent is None:
                if now >= item.next_probe:
                    item.sent = now
                    threading.Thread(target=self._probe, args=(item,), daemon=True,
                                     name=f"ssh-probe-{item.host}").start()
                return
            limit = item.interval * item.count_max
            if now - item.sent < limit or item.stopped:
                return
            item.reason = f" (the server did not answer for {limit:g} s)"
            item.stopped = True
        log.warning("host %s: server not answering for %g s, closing the connection",
                    item.host, limit)
        try:
            item.transport.close()
        except Exception as exc:  # noqa: BLE001 - closing a dead transport may fail
            log.debug("%s: closing after keepalive: %s", item.host, exc)

    @staticmethod
    def _probe(item: Watch) -> None:
        """Send a keepalive that needs a reply; reschedule when it comes."""
        try:
            item.transport.global_request("keepalive@openssh.com", wait=True)
        except Exception as exc:  # noqa: BLE001 - transport closing under us
            log.debug("%s: keepalive probe failed: %s", item.host, exc)
            return
        if item.transport.is_active():
            with item._lock:
                item.sent = None
                item.next_probe = time.monotonic() + item.interval


#: The monitor every Connection registers with.
MONITOR = Monitor()
