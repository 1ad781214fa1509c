"""Making the host's kernel forget what it cached of names that changed locally.

Why apart: the name cache (:mod:`.names`) is plain data kept by whoever holds
it; the kernel's copy is dropped through libfuse (``fuse_invalidate_path``),
which may block on page locks a FUSE read holds while it waits for a reply,
so those drops run on a thread of their own, with rules (:meth:`KernelDrops.settle`)
for which answers the kernel may be given meanwhile.

Shipped to hosts inside the agent's zipapp (``rrmirror.host``): stdlib only, Python 3.8.
"""

from __future__ import annotations

import threading
import time
from typing import Any, List, Optional, Tuple


class KernelDrops:
    """Makes the host's kernel forget what it cached for invalidated paths (``fuse_invalidate_path``).

    Run from a thread of its own, never from the link's reader: dropping a
    file's pages waits for page locks that a FUSE read may hold while it waits
    for a reply only the reader can deliver. The reader waits for the drop at
    most :attr:`patience` seconds, so in the normal case the kernel has
    forgotten before any later frame (a reply, the command's stdin) is seen.
    """

    patience = 1.0

    def __init__(self) -> None:
        self._targets: List[Tuple[str, Any]] = []   # (mount prefix, invalidate(path))
        self._queue: List[Tuple[List[str], threading.Event]] = []
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._queued = 0     # drops asked for so far
        self._finished = 0   # of those, done
        self.dropped = 0

    def add_target(self, prefix: str, invalidate: Any) -> None:
        """Paths under *prefix* (a mount's local root, "" for the whole tree) go to *invalidate*."""
        if invalidate is None:
            return
        with self._cond:
            self._targets.append((prefix.rstrip("/"), invalidate))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="kernel-drops")
                self._thread.start()

    @property
    def active(self) -> bool:
        return bool(self._targets)

    def expect(self) -> None:
        """A drop will follow (an ``inval`` frame whose names are already gone from the name cache).

        From then on :meth:`settle` waits for it too: the name cache may give
        the new attributes before the frame's handler has asked the kernel.
        """
        with self._cond:
            self._queued += 1

    def drop(self, paths: List[str], wait: bool = True, expected: bool = False) -> None:
        """Drop *paths* (wire names); wait until done, at most :attr:`patience` seconds.

        *expected*: announced with :meth:`expect` before.
        """
        done = threading.Event()
        with self._cond:
            if not expected:
                self._queued += 1
            if not paths or not self._targets:
                self._finished += 1
                self._cond.notify_all()
                return
            self._queue.append((paths, done))
            self._cond.notify_all()
        if wait:
            done.wait(self.patience)

    def settle(self) -> None:
        """Wait until every drop asked for so far is done (at most :attr:`patience` seconds).

        Call before giving the kernel attributes. The kernel caches a
        ``getattr`` answer unless the inode's attributes changed while it was
        asked; two threads asking at once can thus get an old answer (held
        here just before an ``inval``) cached *after* a new one was returned
        to the other thread, which then sees the file go back in time. Once
        the drop of that ``inval`` is done, the old answer is either dropped
        with it or refused as older than the drop; so a new answer is given
        only after the drops of the changes it reflects.
        """
        target = self._queued          # (both only grow: read without the lock, in this order,
        if self._finished >= target:   # nothing asked before this call is missed)
            return
        with self._cond:
            end = time.monotonic() + self.patience
            while self._finished < target:
                left = end - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch = self._queue
                self._queue = []
                targets = list(self._targets)
            for paths, done in batch:
                for path in paths:
                    for prefix, invalidate in targets:
                        if prefix and not (path == prefix or path.startswith(prefix + "/")):
                            continue
                        try:
                            invalidate(path[len(prefix):] or "/")
                            self.dropped += 1
                        except Exception:  # noqa: BLE001 - a node the kernel no longer has
                            pass
                done.set()
                with self._cond:
                    self._finished += 1
                    self._cond.notify_all()
