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
* (agent) :class:`PendingChanges` does the same for ``unlink``, ``rmdir``
  and ``rename`` in directories this machine already let the host change
  (``rm -r``, a test's cleanup, a ``.pyc`` renamed into place): an error
  comes back at the next change in the same directory.
* (local) :class:`WriteOrder` applies one handle's writes in the order they
  were sent, although a thread pool serves the requests: two writes of the
  same page (the kernel's write-back cache flushing it twice) must land in
  order; the same for those unlinks and renames, and a request sent after
  them waits for them here.

Shipped to hosts inside the agent's zipapp (``rrmirror.host``; the local side imports
:class:`WriteOrder` from here too): stdlib only, Python 3.8.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .. import protocol as P

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
                 wait: Callable[[Any], Any], abandon: Optional[Callable[[Any], None]] = None) -> None:
        self._submit = submit
        self._wait = wait
        #: Tells the link that nobody will wait for a slot (a handle released with some untaken).
        self._abandon = abandon
        self._lock = threading.Lock()
        self._slots: Dict[int, List[Tuple[Any, int, Any]]] = {}
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
            self._slots.setdefault(fh, []).append((slot, len(data), None))
            self._bytes[fh] = self._bytes.get(fh, 0) + len(data)
            self.sent += 1
            over = self._bytes[fh] > IN_FLIGHT_BYTES
        if over:
            self._collect(fh, keep_bytes=IN_FLIGHT_BYTES // 2)
        return len(data)

    def opened(self, fh: int, send: Callable[[int], Any],
               done: Callable[[Optional[Dict[str, Any]]], None]) -> None:
        """*fh* is opened by a request not waited for: *send(seq)* sends it as the handle's first.

        Its outcome is taken like a write's (an error is reported at close);
        *done* gets its reply's header, or None when it failed.
        """
        with self._lock:
            self._seq[fh] = 1
            self._slots[fh] = [(send(1), 0, done)]
            self._bytes[fh] = 0

    def last_seq(self, fh: int) -> int:
        """The number of the last request sent on *fh* so far (0: none)."""
        with self._lock:
            return self._seq.get(fh, 0)

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
                if not slots or (keep_bytes and self._bytes.get(fh, 0) <= keep_bytes):
                    return
                slot, size, done = slots.pop(0)
                self._bytes[fh] -= size
            try:
                reply = self._wait(slot)
            except OSError as exc:
                with self._lock:
                    self._errors.setdefault(fh, exc.errno or errno.EIO)
                if done is not None:
                    done(None)
                continue
            if done is not None:
                done(reply[0])

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
        """The handle is released: drop its bookkeeping (and the answers nobody took)."""
        with self._lock:
            untaken = self._slots.pop(fh, None) or []
            if self._abandon is not None:
                for slot, _, _ in untaken:
                    self._abandon(slot)
            self._seq.pop(fh, None)
            self._errors.pop(fh, None)
            self._bytes.pop(fh, None)


class PendingChanges:
    """(Agent) unlink, rmdir and rename sent without waiting, numbered, their errors kept per directory.

    Only in a directory where this machine already carried out a change for
    this session (so the exports let the host change it; the host's kernel has
    made the permission checks and found the names): the outcome is then
    known here, short of a local race or a failing disk. A failure is kept for
    the directory and raised by the next change made in it (as NFS reports an
    asynchronous error at the next call); the local side applies these
    changes in the order they were numbered (``nseq``), and every request sent
    while some are unconfirmed names the last one (``after``) so that it is
    carried out after them, with no round trip here.
    """

    def __init__(self, submit: Callable[[str, Dict[str, Any], bytes], Any],
                 wait: Callable[[Any], Any]) -> None:
        self._submit = submit
        self._wait = wait
        self._lock = threading.Lock()
        self._seq = 0
        self._inflight: List[Tuple[Any, List[str], Callable[[], None]]] = []
        self._errors: Dict[str, int] = {}
        self._confirmed: Dict[str, None] = {}
        self.sent = 0
        self.failed = 0

    def confirm(self, *directories: str) -> None:
        """This machine carried out a change in *directories*: later ones may go without waiting."""
        with self._lock:
            if len(self._confirmed) > 100000:
                self._confirmed.clear()
            for directory in directories:
                self._confirmed[directory] = None

    def forget(self, directory: str) -> None:
        """*directory* went away or was replaced: ask again before changing what is there now."""
        with self._lock:
            prefix = directory.rstrip("/") + "/"
            for name in [d for d in self._confirmed if d == directory or d.startswith(prefix)]:
                del self._confirmed[name]

    def may_post(self, *directories: str) -> bool:
        with self._lock:
            return all(d in self._confirmed for d in directories)

    def post(self, op: str, args: Dict[str, Any], directories: List[str],
             undo: Callable[[], None], done: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        """Send *op* numbered, without waiting; on failure *undo* runs and *directories* keep the errno.

        *done* gets the reply's header when the change succeeded (when :meth:`collect` takes it).
        """
        with self._lock:
            self._seq += 1
            args["nseq"] = self._seq
            try:
                slot = self._submit(op, args, b"")
            except OSError:
                self._seq -= 1  # never sent: no gap in the numbers
                raise
            self._inflight.append((slot, directories, undo, done))
            self.sent += 1

    def after(self) -> Optional[int]:
        """The number a request sent now must wait for on the local side (None: nothing unconfirmed)."""
        self.collect()
        with self._lock:
            return self._seq if self._inflight else None

    def collect(self, block: bool = False, directories: Optional[List[str]] = None) -> None:
        """Take the answers that arrived; with *block*, wait for those of *directories* (None: all)."""
        wanted = None if directories is None else set(directories)
        with self._lock:
            inflight = self._inflight
            if block:
                done, rest = [], []
                for item in inflight:
                    wait = item[0][0].is_set() or wanted is None or wanted.intersection(item[1])
                    (done if wait else rest).append(item)
                self._inflight = rest
            else:
                # Called before nearly every request: only the answers at the front, which
                # come in the order the changes were sent (one out of order waits its turn).
                n = 0
                while n < len(inflight) and inflight[n][0][0].is_set():
                    n += 1
                if not n:
                    return
                done = inflight[:n]
                del inflight[:n]
        for slot, directories, undo, learn in done:
            try:
                header, _ = self._wait(slot)
            except OSError as exc:
                undo()
                with self._lock:
                    self.failed += 1
                    for directory in directories:
                        self._errors.setdefault(directory, exc.errno or errno.EIO)
                        self._confirmed.pop(directory, None)
                continue
            if learn is not None:
                learn(header)

    @property
    def pending(self) -> bool:
        """Whether some change sent is not yet taken by :meth:`collect`."""
        return bool(self._inflight)

    def check(self, *directories: str, wait: bool = False) -> None:
        """Raise (once) the error a change sent earlier in one of *directories* failed with.

        *wait*: for a change the program waits for, first wait for the answers of
        those sent earlier in the same directories, so that it is never carried
        out after an earlier one failed unreported.
        """
        self.collect(block=wait, directories=list(directories))
        with self._lock:
            if not self._errors:
                return
            for directory in directories:
                err = self._errors.pop(directory, None)
                if err is not None:
                    raise OSError(err, os.strerror(err))


class DirectoryGuesses:
    """(Agent) Which names' attributes are guesses, and whose: directories after an unlink or
    rmdir in them (:func:`predicted_directory`), files and directories after a posted chmod.

    Each guess gets a token; a reply replaces the guess only if it answers the
    change that made the latest one there.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: Dict[str, int] = {}
        self._next = 0
        #: Names whose guess this process gave the kernel (see :meth:`given`).
        self._given: Set[str] = set()

    def __bool__(self) -> bool:
        return bool(self._latest)

    def begin(self, directory: str) -> int:
        with self._lock:
            self._next += 1
            self._latest[directory] = self._next
            # (the kernel dropped its own attributes of a directory changed through it, and
            # has not been given this guess yet)
            self._given.discard(directory)
            return self._next

    def handed(self, name: str) -> None:
        """*name*'s attributes go to the kernel now: if they are a guess, it holds the guess."""
        with self._lock:
            if name in self._latest:
                self._given.add(name)

    def given(self, name: str) -> bool:
        """Whether the kernel was given a guess of *name*'s since its last change (then forgotten).

        A reply's real attributes replace the guess here; the kernel's copy
        needs dropping (a request through this process, and another from the
        kernel for them again) only when it has one: a scratch file's create
        and unlink each guessed their directory, and the kernel asked for the
        directory's attributes once in between.
        """
        with self._lock:
            given = name in self._given
            self._given.discard(name)
            if not self._latest:
                self._given.clear()  # (no guess left anywhere: nothing more to remember)
            return given

    def end(self, directory: str, token: int) -> bool:
        """Whether *token* is still *directory*'s latest guess (it is then no longer a guess)."""
        with self._lock:
            if self._latest.get(directory) != token:
                return False
            del self._latest[directory]
            return True

    def supersede(self, name: str) -> None:
        """Newer attributes of *name* stand here (the host's own write, a close's answer): the
        reply to a change made before them must not replace them, so no pending one will."""
        with self._lock:
            self._latest.pop(name, None)
            self._given.discard(name)


def predicted_directory(attrs: Optional[Dict[str, Any]], op: str, now_ns: int) -> Optional[Dict[str, Any]]:
    """A directory's attributes after the host's own change of a name in it, until the reply.

    The kernel drops a directory's attributes after each change in it and asks
    for them again at the next permission check in it, so without a guess
    every change sent without waiting (``rm -r``, a test suite's cleanup)
    still cost a round trip. The guess keeps what a change there cannot alter
    (type, permissions, owner, inode) and moves mtime and ctime forward (at
    least a nanosecond past the old ones: the host's clock may lag this
    machine's); an ``rmdir`` takes a link from a parent that counts its
    subdirectories (``st_nlink`` above 2; btrfs keeps 1), a ``mkdir`` gives
    one. The reply's own
    attributes replace it within a round trip. None: nothing to guess from.
    """
    if not attrs or attrs.get("missing") or not stat.S_ISDIR(int(attrs.get("st_mode", 0))):
        return None
    guess = dict(attrs)
    moved = max(now_ns, int(attrs.get("st_mtime", 0)) + 1, int(attrs.get("st_ctime", 0)) + 1)
    guess["st_mtime"] = guess["st_ctime"] = moved
    if op == "rmdir" and int(attrs.get("st_nlink", 0)) > 2:
        guess["st_nlink"] = int(attrs["st_nlink"]) - 1
    elif op == "mkdir" and int(attrs.get("st_nlink", 0)) >= 2:
        guess["st_nlink"] = int(attrs["st_nlink"]) + 1
    return guess


class WriteOrder:
    """(Local) Lets each handle's numbered requests run in the order they were numbered.

    Each waiting request is woken only when the number it waits for is
    reached: a chain of changes sent without waiting (a test suite's
    cleanup) keeps several workers waiting, and waking all of them at each
    step cost more than the steps.
    """

    def __init__(self, timeout: float = ORDER_TIMEOUT) -> None:
        self.timeout = timeout
        self._next: Dict[Any, int] = {}
        self._lock = threading.Lock()
        self._waiting: Dict[Any, List[Tuple[int, threading.Event]]] = {}
        #: Handles released for good (numbers never given again): every request of theirs ran.
        #: The host numbers them upwards: those below :attr:`_gone_below` are all gone and
        #: leave the set, which then holds only those released out of order (not one int
        #: per file a long session ever wrote).
        self._gone: Set[Any] = set()
        self._gone_below = P.POSTED_HANDLES[0]

    def _wait_for(self, handle: Any, number: int, what: str) -> None:
        """Wait until *handle*'s next number is at least *number*."""
        with self._lock:
            if self._next.get(handle, 1) >= number or self._is_gone(handle):
                return
            event = threading.Event()
            waiter = (number, event)
            self._waiting.setdefault(handle, []).append(waiter)
        if event.wait(self.timeout):
            return
        with self._lock:
            waiters = self._waiting.get(handle, [])
            if waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiting[handle]
            if self._next.get(handle, 1) >= number or self._is_gone(handle):
                return
        raise OSError(errno.EIO, what)

    def _is_gone(self, handle: Any) -> bool:
        return handle in self._gone or (P.posted_handle(handle) and handle < self._gone_below)

    def _reached(self, handle: Any, number: int) -> None:
        with self._lock:
            if self._next.get(handle, 1) < number:
                self._next[handle] = number
            now = self._next.get(handle, 1)
            waiters = self._waiting.get(handle)
            if not waiters:
                return
            ready = [w for w in waiters if w[0] <= now]
            if ready:
                rest = [w for w in waiters if w[0] > now]
                if rest:
                    self._waiting[handle] = rest
                else:
                    del self._waiting[handle]
        for _, event in ready:
            event.set()

    def run(self, handle: Any, seq: Any, action: Callable[[], Any]) -> Any:
        """Run *action* as request *seq* of *handle* (1, 2, ...); None *seq*: no ordering."""
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            return action()
        self._wait_for(handle, seq, "an earlier write never arrived")
        try:
            return action()
        finally:
            self._reached(handle, seq + 1)

    def is_next(self, handle: Any, seq: Any) -> bool:
        """Whether request *seq* of *handle* would run at once (every earlier one has run)."""
        return isinstance(seq, int) and not isinstance(seq, bool) and self._next.get(handle, 1) == seq

    def is_past(self, handle: Any, seq: Any) -> bool:
        """Whether request *seq* of *handle* has run."""
        return isinstance(seq, int) and not isinstance(seq, bool) and (
            self._next.get(handle, 1) > seq or self._is_gone(handle))

    def forget(self, handle: Any, for_good: bool = False) -> None:
        """*handle* was released; *for_good*: its number is never used again, and a request
        sent after its last one (:meth:`wait_past`) need not wait for it."""
        with self._lock:
            self._next.pop(handle, None)
            if for_good:
                self._gone.add(handle)
                while self._gone_below in self._gone:  # (raised first: is_past reads unlocked)
                    self._gone_below += 1
                    self._gone.discard(self._gone_below - 1)
                waiters = self._waiting.pop(handle, [])
            else:
                waiters = []
        for _, event in waiters:
            event.set()

    def wait_past(self, handle: Any, seq: Any) -> None:
        """Wait until request *seq* of *handle* has run (a request sent after it names it)."""
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            return
        self._wait_for(handle, seq + 1, "an earlier change never arrived")
