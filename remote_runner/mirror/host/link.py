"""The agent's end of the link: frames over its stdin/stdout, many requests in flight, heartbeat.

Why apart: every other part talks to this machine only through :class:`Link`
(``call``, ``call_many``, ``send``), and a lost link (EOF, silence past the
deadline, a signal) must fail every waiter at once; that is all in one place.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from .. import protocol as P

LOG = logging.getLogger("remote_runner.mirror.agent")

DEFAULT_HEARTBEAT = 5.0
DEFAULT_DEADLINE = 20.0
REQUEST_TIMEOUT = 60.0
#: Seconds a request nobody waits for yet may be held back, to go out with those after it.
HOLD = 0.002
#: The agent's status when the link or the tool failed (errors.EXIT_LINK).
EXIT_LINK = 254


class Link:
    """The framed channel to the local side."""

    def __init__(self, in_fd: int, out_fd: int, heartbeat: float = DEFAULT_HEARTBEAT,
                 deadline: float = DEFAULT_DEADLINE) -> None:
        self.reader = P.FdReader(in_fd)
        self.writer = P.FrameWriter(P.fd_write_all(out_fd))
        self.heartbeat = heartbeat
        self.deadline = deadline
        self.request_timeout = REQUEST_TIMEOUT
        self.lost = threading.Event()
        self.lost_reason = ""
        self.last_rx = time.monotonic()
        self._pending: Dict[int, List[Any]] = {}
        self._abandoned: Set[int] = set()  # ids of pending requests whose answers nobody takes
        self._lock = threading.Lock()
        self._held = threading.Condition()
        self._next = 1
        self.handlers: Dict[str, Callable[[Dict[str, Any], bytes], None]] = {}
        #: Run by the reader itself, before the frame goes to its handler: what
        #: replies read after the frame must already see (dropped names).
        self.inline: Dict[str, Callable[[Dict[str, Any], bytes], None]] = {}
        #: Requests answered here without asking the local side, per operation.
        self.answered: Dict[str, int] = {}
        #: Requests sent to the local side and waited for, per operation.
        self.asked: Dict[str, int] = {}
        #: Requests sent to the local side without waiting for the answer (:meth:`post`).
        self.posted: Dict[str, int] = {}
        #: Program operations (else calls) that blocked on answers from the local side not there
        #: yet (a close waiting for its writes and its own answer is one); answers in cost none.
        self.waits = 0
        #: Seconds callers spent so blocked, summed (callers in parallel each count theirs).
        self.waited = 0.0
        #: The FUSE operation this thread is in (:meth:`operation_begins`): its waits count as one.
        self._operation = threading.local()
        #: How each mount's kernel keeps directory listings (see listcache.wrap_session_opendir).
        self.kernel_listings: Set[str] = set()
        #: Frames other than replies, handled in order by their own thread: an
        #: invalidation may wait for the kernel, which may wait for a reply.
        self._frames: "queue.Queue[Optional[Tuple[Dict[str, Any], bytes]]]" = queue.Queue()
        #: The local side's (uid, gid), from its boot frame: who owns the files it creates.
        self.local_ids: Optional[Tuple[int, int]] = None
        #: Directories the local side's warm-start answer says the host may change without
        #: asking (``wr``, see LocalFileService._may_change): each mount confirms them at its start.
        self.changeable: List[str] = []
        #: Extra channels for large replies (:mod:`.lanes`), if any; started with the link.
        self.lanes: Any = None
        self.lanes_wanted = 0

    def operation_begins(self) -> None:
        """This thread now serves one of the program's operations: whatever it blocks on until
        :meth:`operation_ends` (a close's writes and then its own answer, say) is one wait."""
        self._operation.active, self._operation.blocked = True, False

    def operation_ends(self) -> None:
        operation = self._operation
        operation.active = False
        if operation.blocked:
            with self._lock:
                self.waits += 1

    def answer_here(self, op: str) -> None:
        """Count one request answered on the host (cache hit, local copy, nothing to report)."""
        with self._lock:
            self.answered[op] = self.answered.get(op, 0) + 1

    def stats(self) -> Dict[str, Any]:
        """What this end counted: requests asked and answered here, bytes each way, frames packed."""
        lanes = self.lanes.stats() if self.lanes is not None else {}
        with self._lock:
            return {"asked": dict(self.asked), "answered_on_host": dict(self.answered),
                    "posted": dict(self.posted), "waits": self.waits,
                    "waited_s": round(self.waited, 3),
                    "kernel_listings": sorted(self.kernel_listings),
                    "bytes_received": self.reader.received + lanes.get("lane_bytes", 0),
                    **lanes, **self.writer.counters()}

    def send(self, header: Dict[str, Any], payload: bytes = b"", compressible: bool = False,
             defer: bool = False) -> None:
        """Send a frame; a broken pipe marks the link lost."""
        if self.lost.is_set():
            return
        try:
            self.writer.send(header, payload, compressible, defer)
        except OSError as exc:
            self.mark_lost("write failed: %s" % exc)
        if defer:
            with self._held:
                self._held.notify()

    def flush(self) -> None:
        """Write the frames held back (:data:`HOLD`) now: someone is about to wait for an answer."""
        try:
            self.writer.flush()
        except OSError as exc:
            self.mark_lost("write failed: %s" % exc)

    def flush_loop(self) -> None:
        """Write what was held back once it has waited :data:`HOLD` seconds."""
        while not self.lost.is_set():
            since = self.writer.held()
            if not since:
                with self._held:
                    if not self.writer.held():
                        self._held.wait(self.heartbeat)
                continue
            left = since + HOLD - time.monotonic()
            if left > 0:
                time.sleep(left)
            self.flush()

    def mark_lost(self, reason: str) -> None:
        """Fail every pending request and wake everyone waiting on the link."""
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for slot in pending:
            slot[0].set()

    def call(self, op: str, args: Dict[str, Any], payload: bytes = b"",
             timeout: Optional[float] = None) -> Tuple[Dict[str, Any], bytes]:
        """Run one file-system request; raise OSError with the remote errno (EIO on link loss or timeout)."""
        slot = self._submit(op, args, payload)
        return self._wait(slot, timeout)

    def call_many(self, op: str, many: List[Dict[str, Any]],
                  timeout: Optional[float] = None) -> List[Any]:
        """Send every request of *many* at once, then wait for all (one round trip, not N).

        Returns (header, payload) per request, or the OSError it failed with.
        """
        return list(self.call_each(op, many, timeout))

    def call_each(self, op: str, many: List[Dict[str, Any]],
                  timeout: Optional[float] = None) -> Iterator[Any]:
        """:meth:`call_many`, each answer given as soon as it (and those before it) came.

        Every request is sent at the first ``next()``; a caller that stops
        early leaves no request waiting in the pending table.
        """
        slots = [self._submit(op, args, b"") for args in many]
        try:
            for slot in slots:
                try:
                    answer: Any = self._wait(slot, timeout)
                except OSError as exc:
                    answer = exc
                yield answer
        finally:
            with self._lock:
                for slot in slots:
                    self._pending.pop(slot[3], None)

    def post(self, op: str, args: Dict[str, Any]) -> None:
        """Send a request whose answer nobody waits for (its reply, matching no slot, is dropped).

        For what the local side must do but the program need not wait for:
        closing a read-only handle. Counted under ``posted``.
        """
        if self.lost.is_set():
            return
        with self._lock:
            rid = self._next
            self._next += 1
            self.posted[op] = self.posted.get(op, 0) + 1
        self.send({"t": P.REQ, "id": rid, "op": op, "a": args}, defer=True)

    def submit(self, op: str, args: Dict[str, Any], payload: bytes = b"") -> List[Any]:
        """Send a request now; :meth:`wait` for its answer later (pipelining)."""
        return self._submit(op, args, payload)

    def count_posted(self, op: str) -> None:
        """Count a :meth:`submit`-ted request the program did not wait for (under ``posted``)."""
        with self._lock:
            self.posted[op] = self.posted.get(op, 0) + 1

    def wait(self, slot: List[Any], timeout: Optional[float] = None) -> Tuple[Dict[str, Any], bytes]:
        """The answer to a :meth:`submit`; OSError with its errno on failure."""
        return self._wait(slot, timeout)

    def settle(self, timeout: Optional[float] = None) -> None:
        """Wait until every request sent so far was answered (or the link is lost).

        Before a command's end is reported: what it changed without waiting
        (writes, unlinks, renames) is then done on the local disk.
        """
        end = time.monotonic() + (self.request_timeout if timeout is None else timeout)
        self.flush()
        with self._lock:
            slots = list(self._pending.values())
        for slot in slots:
            while not slot[0].wait(min(1.0, max(0.0, end - time.monotonic()))):
                if self.lost.is_set() or time.monotonic() >= end:
                    return

    def _submit(self, op: str, args: Dict[str, Any], payload: bytes) -> List[Any]:
        if self.lost.is_set():
            raise OSError(errno.EIO, "link lost")
        with self._lock:
            rid = self._next
            self._next += 1
            slot: List[Any] = [threading.Event(), None, b"", rid, op, args]
            self._pending[rid] = slot
            self.asked[op] = self.asked.get(op, 0) + 1
        self.send({"t": P.REQ, "id": rid, "op": op, "a": args}, payload, compressible=op == "write", defer=True)
        return slot

    def _wait(self, slot: List[Any], timeout: Optional[float]) -> Tuple[Dict[str, Any], bytes]:
        began = time.monotonic()
        blocked = not slot[0].is_set()
        if blocked:
            self.flush()
        end = began + (self.request_timeout if timeout is None else timeout)
        while not slot[0].wait(min(1.0, max(0.0, end - time.monotonic()))):
            if self.lost.is_set() or time.monotonic() >= end:
                break
        with self._lock:
            self._pending.pop(slot[3], None)
            if blocked:
                self.waited += time.monotonic() - began
                if getattr(self._operation, "active", False):
                    self._operation.blocked = True
                else:
                    self.waits += 1
        header = slot[1]
        if header is None:
            raise OSError(errno.EIO, "link lost or request timed out")
        if header.get("e"):
            raise OSError(int(header["e"]), os.strerror(int(header["e"])))
        return header, slot[2]

    def read_loop(self) -> None:
        """Dispatch incoming frames until the stream ends."""
        try:
            while True:
                header, payload = P.read_frame(self.reader)
                self.last_rx = time.monotonic()
                kind = header["t"]
                if kind == P.REP:
                    self.deliver(header, payload)
                elif kind == P.PING:
                    self.send({"t": P.PONG})
                elif kind == P.PONG:
                    pass
                elif kind == P.LANE:  # the local side retired a lane that ended
                    self.resend_pending("read")
                elif kind == P.BYE:
                    self.mark_lost("local side ended the session")
                    return
                else:
                    first = self.inline.get(kind)
                    if first is not None:
                        first(header, payload)
                    self._frames.put((header, payload))
        except P.LinkClosed:
            self.mark_lost("connection closed")
        except (P.ProtocolError, OSError) as exc:
            self.mark_lost("link error: %s" % exc)
        finally:
            self._frames.put(None)

    def deliver(self, header: Dict[str, Any], payload: bytes) -> None:
        """Hand a reply to whoever waits for its id (from stdin or a lane; a stray one is dropped)."""
        P.expand_reply(header)
        with self._lock:
            slot = self._pending.get(header.get("id"))
            if slot is None or slot[1] is not None:
                return
            if slot[3] in self._abandoned:
                self._abandoned.discard(slot[3])
                del self._pending[slot[3]]
                return
            slot[1], slot[2] = header, payload
        slot[0].set()

    def abandon(self, slot: List[Any]) -> None:
        """Nobody will :meth:`wait` for *slot*'s answer: forget it now, or when it comes."""
        with self._lock:
            if slot[1] is not None:
                self._pending.pop(slot[3], None)
            elif slot[3] in self._pending:
                self._abandoned.add(slot[3])

    def resend_pending(self, op: str) -> None:
        """Ask again for every unanswered *op* request (a lost lane may have held the answers).

        Only for requests that can be served twice (reads); the first answer wins.
        """
        with self._lock:
            again = [slot for slot in self._pending.values() if slot[4] == op and slot[1] is None]
        for slot in again:
            self.send({"t": P.REQ, "id": slot[3], "op": op, "a": slot[5]})

    def lane_gone(self, number: int) -> None:
        """A lane ended: ask again now, and again once the local side stopped writing to it."""
        self.resend_pending("read")
        self.send({"t": P.LANE, "gone": number})

    def dispatch_loop(self) -> None:
        """Run the handlers of non-reply frames (stdin, signals, invalidations...) in arrival order."""
        while True:
            item = self._frames.get()
            if item is None:
                return
            header, payload = item
            handler = self.handlers.get(header["t"])
            if handler is None:
                LOG.debug("ignoring frame %r", header["t"])
                continue
            try:
                handler(header, payload)
            except Exception:  # noqa: BLE001 - one bad frame must not stop the others
                LOG.exception("handling a %r frame failed", header["t"])

    def heartbeat_loop(self) -> None:
        """Ping the local side; declare the link lost after *deadline* of silence."""
        while not self.lost.wait(self.heartbeat):
            if time.monotonic() - self.last_rx > self.deadline:
                self.mark_lost("no frame for %.0f s" % self.deadline)
                return
            self.send({"t": P.PING})

    def start(self) -> None:
        """Start the reader and heartbeat threads."""
        for target in (self.read_loop, self.heartbeat_loop, self.dispatch_loop, self.flush_loop):
            threading.Thread(target=target, daemon=True).start()
        if self.lanes is not None:
            self.lanes.start(self.lanes_wanted)
