"""What the host itself wrote into a file, answered here until the file's close.

Why apart from :mod:`.writes`: those send writes without waiting; these keep
what was sent so that reads and size queries of the file being written need
not wait for it either. A compiler's pipeline reads back what it just wrote
(``as`` reads the ``.s`` that ``cc1`` wrote) and an assembler or linker asks
for the size of its output after nearly every write; through the link each
would wait for the writes sent on and then for its own round trip.

Shipped to hosts inside the agent's zipapp (``rrmirror.host``): stdlib only, Python 3.8.
"""

from __future__ import annotations

import stat
import threading
from typing import Any, Callable, Dict, Optional, Tuple


#: What the host writes into a file it created or emptied is kept to answer reads, up to this
#: size per file and this much in all (the files written longest ago go first).
WRITTEN_LIMIT, WRITTEN_TOTAL = 4 << 20, 64 << 20


class WrittenFiles:
    """(Agent) The bytes written into files the host created or emptied, to answer their reads here.

    An assembler reads back the header it wrote, ``as`` reads the ``.s`` that
    ``cc1`` just wrote, a test reads the fixture it wrote: through the link,
    each read waits for the writes sent on and then for its own answer. A
    file that was empty when its writer opened it holds exactly what that
    writer wrote (zeros in the gaps), as long as no other handle wrote to it,
    nothing truncated it, and this machine reported no change to it (its
    directory is watched: a change made there is reported before anything
    newer). Reads of it, through any handle, are then answered from those
    bytes (its end is theirs: an append by the same writer is added here, any
    other change makes the file ask the link again); a write that fails
    drops them at the close that reports it.
    """

    def __init__(self, limit: int = WRITTEN_LIMIT, total: int = WRITTEN_TOTAL) -> None:
        self.limit = limit
        self.total = total
        self._held = 0
        self._lock = threading.Lock()
        self._files: Dict[str, Tuple[int, bytearray, int]] = {}  # name -> (writer, bytes, since)

    def __bool__(self) -> bool:
        return bool(self._files)

    def start(self, name: str, fh: int, since: int) -> None:
        """*fh* opened *name* empty; *since*: a name-cache token from after the open."""
        with self._lock:
            self._forget(name)
            self._files[name] = (fh, bytearray(), since)

    def wrote(self, name: str, fh: int, offset: int, data: bytes) -> None:
        with self._lock:
            entry = self._files.get(name)
            if entry is None:
                return
            if entry[0] != fh or offset + len(data) > self.limit:
                self._forget(name)  # another writer, or too big: read through the link
                return
            held = entry[1]
            before = len(held)
            if offset > before:
                held.extend(bytes(offset - before))  # a hole reads as zeros
            held[offset:offset + len(data)] = data
            self._held += len(held) - before
            while self._held > self.total and self._files:
                self._forget(next(iter(self._files)))  # the oldest first

    def drop(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self._forget(name)

    def _forget(self, name: str) -> None:
        entry = self._files.pop(name, None)
        if entry is not None:
            self._held -= len(entry[1])

    def holds(self, name: str, changed_since: Callable[[str, int], bool]) -> bool:
        """Whether every byte of *name* is known here (see :meth:`read`)."""
        with self._lock:
            entry = self._files.get(name)
            return entry is not None and not changed_since(name, entry[2])

    def read(self, name: str, offset: int, size: int, changed_since: Callable[[str, int], bool]
             ) -> Optional[bytes]:
        """The bytes at *offset* if *name* is known here (None: ask); a short answer at its end."""
        with self._lock:
            entry = self._files.get(name)
            if entry is None:
                return None
            if changed_since(name, entry[2]):
                self._forget(name)
                return None
            return bytes(entry[1][offset:offset + size])  # short at the end: the file ends there


def grown_file(attrs: Optional[Dict[str, Any]], offset: int, length: int,
               now_ns: int) -> Optional[Dict[str, Any]]:
    """A file's attributes after the host's own write of *length* bytes at *offset*, until its close.

    An assembler or linker asks for the size of the file it writes after
    nearly every write (``fstat``, ``lseek``); asking this machine would wait
    for the writes sent on and one more round trip each. The size follows from
    the write, the times move forward as for :func:`.writes.predicted_directory`, and
    the blocks cover at least the size. The ``flush`` at close brings the real
    attributes. None: nothing to guess from.
    """
    if not attrs or attrs.get("missing") or not stat.S_ISREG(int(attrs.get("st_mode", 0))):
        return None
    guess = dict(attrs)
    guess["st_size"] = max(int(attrs.get("st_size", 0)), offset + length)
    moved = max(now_ns, int(attrs.get("st_mtime", 0)) + 1, int(attrs.get("st_ctime", 0)) + 1)
    guess["st_mtime"] = guess["st_ctime"] = moved
    guess["st_blocks"] = max(int(attrs.get("st_blocks", 0)), (guess["st_size"] + 511) // 512)
    return guess
