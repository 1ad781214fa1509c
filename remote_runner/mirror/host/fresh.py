"""(Agent) Files written on the local machine while the command runs: read past the kernel's cache.

Why: libfuse's high-level API gives the host's kernel one inode per *name*,
so it keeps one size per name. A file replaced on the local machine (an
editor's save, a build's output, a config rewritten by rename) while a
handle of the old version is open here gets the new version's size as soon
as anything stats the name -- the program's own ``fstat`` is asked by name.
Read through the page cache, that handle's bytes were then cut at, or
padded with zeros up to, the other version's size: bytes of neither file
(7-10 % of reads of a file replaced every 3 ms). The local side calls a file
``fresh`` when it was written in the last seconds and since the session
began (``recent``: just before it began), and such a handle is read with
``direct_io`` (:mod:`.fusebinding`): each read asks this process, which
answers with the handle's own bytes, whole, as a local read would.

Without the page cache there is no kernel read-ahead either, so this
module asks the local side for :data:`READ_AHEAD` bytes at a time and keeps
what a read did not use for the next reads of the handle, while the name
sees no change (a change drops them, as it drops the kernel's pages); a
read reaching past what was kept asks again, so a growing log is followed.

A file put in place with an old mtime (``rsync -a``, ``cp -p``) is sent
whole and kept here, and the next opens of that version are answered from
the copy without asking: the version is remembered as fresh for
:data:`FRESH_FOR` seconds, and those opens read past the page cache too.

A ``direct_io`` handle can be mapped privately (programs, libraries), and
shared only where libfuse >= 3.16 and Linux >= 6.6 negotiate
``FUSE_CAP_DIRECT_IO_ALLOW_MMAP``; elsewhere a ``recent`` file (a pipeline's
previous step, then mapped) keeps the page cache.

Shipped to hosts inside the agent's zipapp (``rrmirror.host``): stdlib only, Python 3.8.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

#: Bytes a fresh handle's read through the link asks for at least.
READ_AHEAD = 128 << 10
#: Seconds a version of a file the local side called fresh is taken as fresh here (its
#: ``SETTLED_SECONDS``), for opens answered from the host's copy of it.
FRESH_FOR = 2.0
#: Versions remembered at most (then forgotten all at once).
VERSIONS_LIMIT = 10000


class FreshFiles:
    """The handles read with ``direct_io``, until their release, and the bytes each has ahead."""

    def __init__(self) -> None:
        self._handles: Dict[int, None] = {}
        self._kept: Dict[int, Tuple[int, bytes, int]] = {}  # fh -> (offset, data, since)
        self._versions: Dict[str, Tuple[List[Any], float]] = {}  # name -> (copy key, fresh until)
        #: Whether a ``direct_io`` handle can still be mapped shared (set at the mount's init).
        self.shared_maps = False

    def __contains__(self, fh: int) -> bool:
        return fh in self._handles

    def opened(self, fh: int, header: Dict[str, Any], name: Optional[str] = None,
               version: Optional[List[Any]] = None) -> int:
        """*fh*, an open's handle: read past the kernel's cache if its reply says the file is fresh.

        *version*: the copy key of the host's copy *fh* reads, for :meth:`reopened`.
        """
        if header.get("fresh") or (header.get("recent") and self.shared_maps):
            self._handles[fh] = None
            if name is not None and version is not None:
                if len(self._versions) >= VERSIONS_LIMIT:
                    self._versions.clear()
                self._versions[name] = (version, time.monotonic() + FRESH_FOR)
        return fh

    def reopened(self, fh: int, name: str, version: List[Any]) -> int:
        """*fh*, an open of the host's copy of *name* answered here: fresh if that version was."""
        known = self._versions.get(name)
        if known is not None and known[0] == version and time.monotonic() < known[1]:
            self._handles[fh] = None
        return fh

    def released(self, fh: int) -> None:
        self._handles.pop(fh, None)
        self._kept.pop(fh, None)

    def kept(self, fh: int, offset: int, size: int, name: Optional[str],
             changed_since: Callable[[str, int], bool]) -> Optional[bytes]:
        """The kept bytes [offset, offset + size) of *fh*, if all are kept and *name* did not change."""
        kept = self._kept.get(fh)
        if kept is None:
            return None
        start, data, since = kept
        if not start <= offset or offset + size > start + len(data) or (
                name is not None and changed_since(name, since)):
            return None
        return data[offset - start:offset - start + size]

    def keep(self, fh: int, offset: int, data: bytes, since: int) -> None:
        """What a read of *fh* at *offset* brought, asked when the name's stamp was *since*."""
        self._kept[fh] = (offset, data, since)
