"""Hard links seen through the mirror: every name of a file shows its current attributes.

Why: libfuse's high-level library gives every *name* its own kernel inode.
When a link is added or removed under one name, or the file is changed
through it (chmod, chown, times, size, data, rename), the host's kernel still
holds the old attributes and pages under the other names for up to the
attribute timeout, so ``stat`` would disagree with the local disk (pjdfstest's
link tests: a mode set through one name, read through the other). The agent
remembers the names it saw for each multiply-linked local file and, after
such a change, asks libfuse to drop what the kernel cached for the others.

Shipped to hosts inside the agent's zipapp: stdlib only, Python 3.8.
"""

from __future__ import annotations

import ctypes
import stat
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

#: Forget everything past this many names (a huge tree of hard links).
MAX_NAMES = 80000


class LinkNames:
    """The names seen for each local file with more than one hard link.

    libfuse's high-level library gives every *name* its own kernel inode, so
    when a link is added or removed under one name, or the file is changed
    through it (chmod, chown, times, size, data), the kernel still holds the
    old attributes and pages under the other names for up to the attribute
    timeout: ``stat`` would disagree with the local disk. After such a change
    the agent asks libfuse to drop the kernel's cache of the other names
    (``fuse_invalidate_path``), so the next ``stat`` or read asks here.
    """

    def __init__(self) -> None:
        self._names: Dict[Tuple[int, int], Dict[str, None]] = {}
        self._key: Dict[str, Tuple[int, int]] = {}
        self._lock = threading.Lock()
        self.invalidate: Optional[Callable[[str], None]] = None

    def seen(self, path: str, st: Optional[Dict[str, Any]]) -> None:
        """Note the attributes *st* received for *path*."""
        if not st or st.get("missing"):
            return
        key = (int(st.get("st_dev", 0)), int(st.get("st_ino", 0)))
        many = int(st.get("st_nlink", 1)) > 1 and not stat.S_ISDIR(int(st.get("st_mode", 0)))
        with self._lock:
            old = self._key.get(path)
            if old is not None and (old != key or not many):
                self._names.get(old, {}).pop(path, None)
                del self._key[path]
            if many:
                if len(self._key) > MAX_NAMES:
                    self._names.clear()
                    self._key.clear()
                self._names.setdefault(key, {})[path] = None
                self._key[path] = key

    def others(self, path: str) -> List[str]:
        """The other names of the file *path* names (as far as seen)."""
        with self._lock:
            key = self._key.get(path)
            return [p for p in self._names.get(key, {}) if p != path] if key else []

    def forget(self, path: str) -> None:
        with self._lock:
            key = self._key.pop(path, None)
            if key is not None:
                self._names.get(key, {}).pop(path, None)

    def moved(self, old: str, new: str) -> None:
        """*old* was renamed to *new*: keep the name, refresh the file's other names."""
        with self._lock:
            key = self._key.pop(old, None)
            if key is None:
                return
            names = self._names.setdefault(key, {})
            names.pop(old, None)
            names[new] = None
            self._key[new] = key
        self.changed(new)

    def changed(self, path: Optional[str]) -> None:
        """*path*'s file changed (mode, owner, times, size, data): refresh its other names."""
        if path is not None and self._key:
            self.refresh(self.others(path))

    def refresh(self, paths: List[str]) -> None:
        """Make the kernel ask again for the attributes of *paths*."""
        if self.invalidate is None:
            return
        for path in paths:
            try:
                self.invalidate(path)
            except OSError:
                pass



def path_invalidator() -> Optional[Callable[[str], None]]:
    """A function dropping the kernel's cached attributes of a mount path (libfuse >= 3.1), or None.

    Called from the mount's init, where the FUSE context names the file system.
    """
    import mfusepy
    lib = getattr(mfusepy, "_libfuse", None)
    if getattr(mfusepy, "fuse_version_major", 2) != 3 or lib is None or not hasattr(lib, "fuse_invalidate_path"):
        return None
    fuse = ctypes.c_void_p(lib.fuse_get_context().contents.fuse)
    lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.fuse_invalidate_path.restype = ctypes.c_int

    def invalidate(path: str) -> None:
        lib.fuse_invalidate_path(fuse, path.encode("utf-8", "surrogateescape"))

    return invalidate
