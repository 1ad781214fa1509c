"""What may be copied to a host: settled, world-readable files behind world-searchable directories.

Why apart: a file sent whole stays in the host's cache, where other users of
that host may get at it, and it is believed there until it changes. So only
what every local user could read may go (world-readable, reached through
world-searchable directories up to the top of a shared export), and only once
it has settled (not modified for ``SETTLED_SECONDS``: a log being written keeps
being read through the link). The mirror's send-ahead answers
(:mod:`.sendahead`) ask these rules before they copy anything.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from remote_runner.mirror import protocol as P
from remote_runner.mirror.exports import Exports, inside

#: A file modified this recently may still be being written: not sent whole.
SETTLED_SECONDS = 2.0

def sendable_whole(st: os.stat_result) -> bool:
    """Whether a file qualifies to be sent whole (and kept on the host).

    Settled, regular, not empty, not too big, and readable by everyone here:
    a private file (a key, a 0600 data file) is never left behind on a host.
    """
    return (stat.S_ISREG(st.st_mode) and 0 < st.st_size <= P.WHOLE_LIMIT
            and bool(st.st_mode & stat.S_IROTH)
            and time.time() - st.st_mtime >= SETTLED_SECONDS)


def freshness(st: os.stat_result, session_start: float, host_changed: Optional[float] = None) -> Dict[str, int]:
    """What a read-only open's reply says of a regular file written too recently to be settled.

    Read on the host, such a file may be replaced here while a handle reads
    it (an editor's save, a build's output, a config rewritten by rename).
    The host's kernel keeps one size per name, so its reads of the handle
    must not be cut at, or padded up to, a newer version's size: the host
    reads it without the kernel's page cache (see :mod:`.host.fusebinding`).
    ``fresh``: written, or put in place, since the session began, while its
    command runs (by its ctime too: ``rsync -a`` or ``cp -p`` give the new
    file an old mtime, and it is sent whole); ``recent``: written just
    before (a pipeline's previous step), which the host reads that way only
    where it can still map it shared. Neither when the last change was the
    host's own (*host_changed*, :class:`~.ownchanges.HostChanges`): its kernel
    saw it.
    """
    if not stat.S_ISREG(st.st_mode):
        return {}
    now = time.time()
    changed = max(st.st_mtime, st.st_ctime)
    if host_changed is not None and changed <= host_changed:
        return {}
    if changed >= session_start and now - changed < SETTLED_SECONDS:
        return {"fresh": 1}
    return {"recent": 1} if now - st.st_mtime < SETTLED_SECONDS else {}


def whole_meta(st: os.stat_result) -> List[int]:
    """What a host's whole copy of a file is checked against: [size, mtime_ns, ino, ctime_ns].

    ctime too: a file rewritten in place to the same size with its mtime put
    back (``touch -d``, ``cp -p``, an archive extracted over it) keeps size,
    mtime and inode, but never its ctime, which no program can set.
    """
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


class PublicDirs:
    """Which local directories every user may search (``o+x``), remembered briefly.

    A whole-file copy stays on the host, where other users may get at it; so it
    is made only of a file that every local user could read too: world-readable
    itself *and* reachable through world-searchable directories all the way up
    (a 0644 file inside a 0700 home is private). Both the path as named and its
    resolved form are checked; answers are kept for ``SETTLED_SECONDS``.

    The climb stops at the top of a *shared* export (:attr:`.exports.Export.shared`:
    a tree the user named with ``--export``, or a program's own installation):
    what lies above it is where the user chose to share it from. A Python
    built in a 0700 home or a virtual environment there is kept on the host like
    ``/usr``, where it would otherwise be read through the link at every run;
    a private directory *inside* it still keeps its files off the host, and so
    do the cwd and paths merely named on a command line.
    """

    def __init__(self, ttl: float = SETTLED_SECONDS) -> None:
        self.ttl = ttl
        self._known: Dict[bytes, Tuple[bool, float]] = {}
        #: per (directory, top of its shared export): the answer for the files in it, and when
        self._answers: Dict[Tuple[bytes, Optional[bytes]], Tuple[bool, float]] = {}
        self._resolved: Dict[bytes, Tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def reachable(self, path: bytes, exports: Optional[Exports] = None) -> bool:
        """Whether every directory above *path* (named and resolved) is world-searchable.

        With *exports*, only up to the top of the shared export *path* lies in.
        A directory's answer (and where it resolves to) is kept as long as its
        directories' searchable bits are: the files of one directory (a
        program's 600 modules in 70 directories) cost one climb each, not one
        ``realpath`` and one climb per file.
        """
        parent = os.path.dirname(path)
        for directory in dict.fromkeys((parent, self._realpath(parent))):
            export = exports.find(os.path.join(directory, os.path.basename(path))) if exports else None
            if not self._answer(directory, export.path if export is not None and export.shared else None):
                return False
        return True

    def _realpath(self, directory: bytes) -> bytes:
        now = time.monotonic()
        return self._kept(self._resolved, directory, lambda: (os.path.realpath(directory), now))[0]

    def _answer(self, directory: bytes, top: Optional[bytes]) -> bool:
        # (kept no longer than the oldest searchable bit it rests on)
        return self._kept(self._answers, (directory, top), lambda: self._chain(directory, top))[0]

    def _chain(self, directory: bytes, top: Optional[bytes]) -> Tuple[bool, float]:
        """The answer for *directory*, and when the oldest of the bits it rests on was read."""
        oldest = time.monotonic()
        while True:
            if top is not None and not inside(directory, top):
                return True, oldest  # above the shared export: not this check's business
            ok, when = self._searchable(directory)
            oldest = min(oldest, when)
            if not ok:
                return False, oldest
            if directory in (b"/", b""):
                return True, oldest
            directory = os.path.dirname(directory)

    def _searchable(self, directory: bytes) -> Tuple[bool, float]:
        def search() -> Tuple[bool, float]:
            now = time.monotonic()
            try:
                return bool(os.stat(directory).st_mode & stat.S_IXOTH), now
            except OSError:
                return False, now
        return self._kept(self._known, directory, search)

    def _kept(self, table: Dict[Any, Tuple[Any, float]], key: Any,
              compute: Callable[[], Tuple[Any, float]]) -> Tuple[Any, float]:
        """*table*'s (value, when) for *key* while younger than the ttl, else *compute* () kept."""
        with self._lock:
            known = table.get(key)
        if known is not None and time.monotonic() - known[1] < self.ttl:
            return known
        known = compute()
        with self._lock:
            if len(table) > 4096:
                table.clear()
            table[key] = known
        return known
