"""Writes without a round trip each: sent at once, their errors reported at close at the latest.

Why: writing a new file through the mirror (a ``.pyc``, an object file, a
test's temporary file) used to wait for this machine on every ``write``,
``flush`` and ``release``. As on NFS, a program only needs to learn of a
failed write when it closes the file or asks for durability:

* (agent) :class:`PendingWrites` sends each write without waiting and keeps
  its reply slot; ``flush`` (every ``close``), ``fsync``, a read or size
  change through the same handle first wait for the handle's writes and
  report the first error (``ENOSPC``, ``EROFS``, ``EIO``...). ``release``
  needs no answer at all. A handle opened ``O_SYNC``/``O_DSYNC`` keeps
  waiting on every write.
* (local) :class:`WriteOrder` applies one handle's writes in the order they
  were sent, although a thread pool serves the requests: two writes of the
  same page (the kernel's write-back cache flushing it twice) must land in
  order.

Shipped to hosts inside the agent's zipapp (``rrmirror.host``; the local side imports
:class:`WriteOrder` from here too): stdlib only, Python 3.8.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

#: Past this many bytes in flight on one handle, a write waits for the oldest.
IN_FLIGHT_BYTES = 16 << 20
#: (local) How long a write waits for its predecessors before giving up (EIO).
ORDER_TIMEOUT = 120.0


class PendingWrites:
    """(Agent) Writes sent but not yet answered, per local handle.

    *submit(op, args, payload)* sends a request and returns a slot for
    *wait(slot)*, which returns the reply or raises OSError with its errno.
    """

    def __init__(self, submit: Callable[[str, Dict[str, Any], bytes], Any],
                 wait: Callable[[Any], Any]) -> None:
        self._submit = submit
        self._wait = wait
        self._lock = threading.Lock()
        self._slots: Dict[int, List[Tuple[Any, int]]] = {}
        self._seq: Dict[int, int] = {}
        self._errors: Dict[int, int] = {}
        self._bytes: Dict[int, int] = {}
        self.sent = 0

    def write(self, fh: int, offset: int, data: bytes) -> int:
        """Send one write of *data* at *offset* without waiting; return its length."""
        with self._lock:
            seq = self._seq.get(fh, 0) + 1
            self._seq[fh] = seq
            slot = self._submit("write", {"fh": fh, "off": offset, "seq": seq}, data)
            self._slots.setdefault(fh, []).append((slot, len(data)))
            self._bytes[fh] = self._bytes.get(fh, 0) + len(data)
            self.sent += 1
            over = self._bytes[fh] > IN_FLIGHT_BYTES
        if over:
            self._collect(fh, keep_bytes=IN_FLIGHT_BYTES // 2)
        return len(data)

    def next_seq(self, fh: int) -> int:
        """Number a synchronous request that must come after the handle's pending writes."""
        with self._lock:
            seq = self._seq.get(fh, 0) + 1
            self._seq[fh] = seq
            return seq

    def _collect(self, fh: int, keep_bytes: int = 0) -> None:
        while True:
            with self._lock:
                slots = self._slots.get(fh)
                if not slots or self._bytes.get(fh, 0) <= keep_bytes:
                    return
                slot, size = slots.pop(0)
                self._bytes[fh] -= size
            try:
                self._wait(slot)
            except OSError as exc:
                with self._lock:
                    self._errors.setdefault(fh, exc.errno or errno.EIO)

    def drain(self, fh: int) -> None:
        """Wait for every write sent on *fh*; an error stays for :meth:`settle` to report."""
        self._collect(fh)

    def pending(self, fh: int) -> bool:
        with self._lock:
            return bool(self._slots.get(fh)) or fh in self._errors

    def settle(self, fh: int) -> None:
        """Wait for every write sent on *fh*; raise OSError with the first one's error (reported once)."""
        self._collect(fh)
        with self._lock:
            err = self._errors.pop(fh, None)
        if err is not None:
            raise OSError(err, os.strerror(err))

    def forget(self, fh: int) -> None:
        """The handle is released: drop its bookkeeping."""
        with self._lock:
            self._slots.pop(fh, None)
            self._seq.pop(fh, None)
            self._errors.pop(fh, None)
            self._bytes.pop(fh, None)


class WriteOrder:
    """(Local) Lets each handle's numbered requests run in the order they were numbered."""

    def __init__(self, timeout: float = ORDER_TIMEOUT) -> None:
        self.timeout = timeout
        self._next: Dict[Any, int] = {}
        self._cond = threading.Condition()

    def run(self, handle: Any, seq: Any, action: Callable[[], Any]) -> Any:
        """Run *action* as request *seq* of *handle* (1, 2, ...); None *seq*: no ordering."""
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            return action()
        end = time.monotonic() + self.timeout
        with self._cond:
            while self._next.get(handle, 1) < seq:
                left = end - time.monotonic()
                if left <= 0:
                    raise OSError(errno.EIO, "an earlier write never arrived")
                self._cond.wait(left)
        try:
            return action()
        finally:
            with self._cond:
                if self._next.get(handle, 1) <= seq:
                    self._next[handle] = seq + 1
                self._cond.notify_all()

    def forget(self, handle: Any) -> None:
        with self._cond:
            self._next.pop(handle, None)
            self._cond.notify_all()
