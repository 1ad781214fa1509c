"""What the local file service hands back: numbered handles, a reply, a request's errno.

Why apart: the host only ever sees handle numbers (never raw descriptors;
an unknown one is EBADF), issued here or, for a ``create`` or ``open`` it did
not wait for, chosen by the host within its own range; and every failure travels as its
errno; the service and its helpers share these few types.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from remote_runner.mirror import protocol as P


class OpError(Exception):
    """A request that fails with a specific errno."""

    def __init__(self, err: int) -> None:
        super().__init__(err, os.strerror(err))
        self.errno = err


@dataclass
class Reply:
    """The result of one request: JSON fields, optional raw bytes, optional pushes."""

    fields: Dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""
    compressible: bool = False
    #: A whole file's first bytes when the payload does not carry them (not sent: the host has them).
    head: bytes = b""


class HandleTable:
    """Open local descriptors, addressed by numbers issued here."""

    def __init__(self) -> None:
        self._fds: Dict[int, int] = {}
        self._next = 1
        self._lock = threading.Lock()

    def add(self, fd: int, number: Optional[int] = None) -> int:
        """Register *fd* and return its handle: *number* if given (the host chose it), else the next.

        A number the host chose must lie in :data:`~.protocol.POSTED_HANDLES` and be free (EBADF).
        """
        with self._lock:
            if number is None:
                handle = self._next
                self._next += 1
            elif P.posted_handle(number) and number not in self._fds:
                handle = number
            else:
                raise OpError(errno.EBADF)
            self._fds[handle] = fd
            return handle

    def get(self, handle: Any) -> int:
        """Return the descriptor of *handle* or raise EBADF."""
        with self._lock:
            fd = self._fds.get(handle) if isinstance(handle, int) else None
        if fd is None:
            raise OpError(errno.EBADF)
        return fd

    def pop(self, handle: Any) -> int:
        """Forget *handle* and return its descriptor."""
        with self._lock:
            fd = self._fds.pop(handle, None) if isinstance(handle, int) else None
        if fd is None:
            raise OpError(errno.EBADF)
        return fd

    def close_all(self) -> None:
        """Close every descriptor still open."""
        with self._lock:
            fds = list(self._fds.values())
            self._fds.clear()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return len(self._fds)
