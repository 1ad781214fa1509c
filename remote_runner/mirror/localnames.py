"""How the host's names reach local files when a plain path will not do.

Why: the mirror's host sends an absolute path with every request, and two
kinds of names would not behave there as the program's own names do here:

* **hidden names** — libfuse's high-level library keeps a file that is
  unlinked (or renamed over) while open by renaming it to
  ``.fuse_hidden<16 hex digits>`` in the same directory, and unlinks that
  name after the last close. A program would see the file in ``ls -a`` and
  get ENOTEMPTY from ``rmdir`` (CPython's ``test_tempfile`` does exactly that).
  :class:`HiddenFiles` removes the file here at once, as the program asked,
  and holds it with an O_PATH descriptor: the hidden name then stands for
  that descriptor (through ``/proc/self/fd/N``) until libfuse lets it go;
* **long paths** — a program may use a relative path of up to PATH_MAX - 1
  bytes in a deep directory; the absolute path the host sends is longer.
  Every request's path is reached through its parent directory's O_PATH
  descriptor, walked one component at a time
  (:func:`remote_runner.mirror.exports.resolve_parent`), so the name handed
  to a system call is ``/proc/self/fd/N/NAME`` whatever the path's length;
  :class:`RequestDescriptors` closes those descriptors when the request ends.
"""

from __future__ import annotations

import os
import threading
from typing import Dict, List, Optional

#: libfuse's prefix for a file unlinked while open (fuse.c's hidden_name).
HIDDEN_PREFIX = b".fuse_hidden"


def proc_fd_path(fd: int) -> bytes:
    """The path that reopens, stats or changes the file of descriptor *fd*."""
    return b"/proc/self/fd/%d" % fd


def is_hidden_name(path: bytes) -> bool:
    """Whether *path* has the shape of libfuse's name for a file unlinked while open."""
    name = os.path.basename(path)
    digits = name[len(HIDDEN_PREFIX):]
    return (name.startswith(HIDDEN_PREFIX) and len(digits) == 16
            and all(c in b"0123456789abcdef" for c in digits))


class HiddenFiles:
    """Files unlinked while open on the host, held here: libfuse's hidden name -> O_PATH descriptor."""

    def __init__(self) -> None:
        self._held: Dict[bytes, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def hide(self, path: bytes, name: bytes) -> None:
        """Unlink the file at *path* (a local path) and hold it under hidden *name* (the host's)."""
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.unlink(path)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            prior = self._held.pop(name, None)
            self._held[name] = fd
        if prior is not None:
            os.close(prior)

    def path(self, name: bytes) -> Optional[bytes]:
        """The ``/proc/self/fd`` path standing for hidden *name*, or None when it is not held."""
        if not self._held:
            return None
        with self._lock:
            fd = self._held.get(name)
        return None if fd is None else proc_fd_path(fd)

    def release(self, name: bytes) -> bool:
        """libfuse unlinks hidden *name* after the last close: let go of it; False if not held."""
        with self._lock:
            fd = self._held.pop(name, None)
        if fd is None:
            return False
        os.close(fd)
        return True

    def close(self) -> None:
        """Let go of every file still held (the session ends)."""
        with self._lock:
            fds = list(self._held.values())
            self._held.clear()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


class RequestDescriptors:
    """Descriptors opened to reach one request's paths, per thread, closed at :meth:`release`."""

    def __init__(self) -> None:
        self._tls = threading.local()

    def held(self) -> List[int]:
        """This thread's list of descriptors to close at :meth:`release` (callers add theirs)."""
        return self._tls.__dict__.setdefault("fds", [])

    def parents(self) -> Dict[bytes, int]:
        """This thread's directories reached so far for its request, each with its descriptor
        (among :meth:`held`): the directory a request changed a name in is then stat'ed
        through the descriptor the change used, not reached again from ``/``."""
        return self._tls.__dict__.setdefault("dirs", {})

    def open_count(self) -> int:
        """Descriptors this thread holds (0 after :meth:`release`)."""
        return len(self._tls.__dict__.get("fds", ()))

    def release(self) -> None:
        """Close the descriptors this thread opened for its request."""
        self._tls.__dict__.pop("dirs", None)
        for fd in self._tls.__dict__.pop("fds", None) or ():
            try:
                os.close(fd)
            except OSError:
                pass
