"""Files this host already has: a library of the same release is copied from its own disk.

Why: the first run of a program on a host sends the program's libraries whole
(:mod:`.caches`), and for a big program that is most of the run (``ffmpeg
-version``: 237 MB through the link for 0.1 s of work). Machines of one lab
mostly run one release, so the host often has the very same file at the very
same path. Before asking for a file of at least :data:`BASIS_MIN` bytes, the
host copies its own file of that path and size into the cache's directory
while hashing it, and sends the SHA-1 with the request (``basis``). The local
side compares it with the SHA-1 of its file (remembered by stat in its hash
cache) and answers "same" without data, or sends the file as before. The copy
is kept only after that answer; otherwise it is removed.

What this trusts: nothing new. The local side sends no data and tells nothing
it would not have sent anyway (it checks the file may be copied first); the
host's own file only ever serves the host's own run.

Shipped to hosts inside the agent's zipapp (``rrmirror.host``): stdlib only, Python 3.8.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from typing import NamedTuple, Optional

from .. import protocol as P

#: Smaller files are not looked for here: a round trip costs more than sending them.
BASIS_MIN = 64 << 10
COPY_CHUNK = 1 << 20


class Staged(NamedTuple):
    """This host's own copy of a file, written under a temporary name in the cache's directory."""

    tmp: str
    digest: str


def stage(directory: str, name: str, size: int) -> Optional[Staged]:
    """Copy this host's file at local path *name* into *directory* while hashing it.

    Only a regular file of exactly *size* bytes (at least :data:`BASIS_MIN`);
    None when there is none, or on any error (the file is then fetched as before).
    """
    if not isinstance(size, int) or size < BASIS_MIN:
        return None
    try:
        src = os.open(P.name_from_wire(name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError, P.ProtocolError):
        return None
    tmp = None
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return None
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        digest, copied = hashlib.sha1(), 0
        with os.fdopen(fd, "wb") as out:
            while True:
                chunk = os.read(src, COPY_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                copied += len(chunk)
        if copied != size:
            unlink_quietly(tmp)
            return None
        return Staged(tmp, digest.hexdigest())
    except OSError:
        if tmp is not None:
            unlink_quietly(tmp)
        return None
    finally:
        os.close(src)


def discard(staged: Optional[Staged]) -> None:
    """Remove a staged copy the local side did not confirm."""
    if staged is not None:
        unlink_quietly(staged.tmp)


def unlink_quietly(path: str) -> None:
    """Remove *path* (a file of a cache's directory); already gone (or not removable) is no error."""
    try:
        os.unlink(path)
    except OSError:
        pass
