"""The command's ``$TMPDIR`` is a directory of the host: anonymous scratch files never cross the link.

Why: a test suite or a compiler makes and removes thousands of temporary
files (``mkstemp``, ``mktemp``, ``cc``'s ``.s`` files, pytest's ``tmp_path``),
and through the mirror's ``/tmp`` each create, write, close, unlink and rmdir
is a request to this machine, and every change makes the host's kernel ask
for the directory's attributes again. Measured at 0 ms on this project's lab,
five files of CPython's test suite took 5.3-7.5 s through the mirror's
``/tmp`` against 2.5 s with ``$TMPDIR`` on the host (1.8-2.0 s locally).

Those files are, by the convention every program that reads ``$TMPDIR``
follows, nobody else's: their names are random and they are gone when the
program is. So by default (``--local-tmpdir`` turns it off) the command gets
``TMPDIR`` pointing at an empty directory of the host, while ``/tmp`` and
``/var/tmp`` stay this machine's: a path the program or the user *names*
(``-o /tmp/result``) is still written here, at once, as before.

How: this side makes an empty directory in its own ``/tmp`` (a name the host
cannot choose), the host mounts a fresh directory of its own (in its own
temporary directory, mode 0700, the command user's) over that path in the
mirror, and the command's ``TMPDIR`` names it, so paths look as they would
here. The host removes its directory when the mirror ends and this side
removes the (still empty) one here; one left by a process that was killed (its
pid is in the name) is removed by a later one, a day on. A rename from
``$TMPDIR`` to another place crosses file systems (``EXDEV``), as from a tmpfs
``/tmp`` to a home on disk does here; programs that move their temporary files
already handle that.

Left alone: a ``$TMPDIR`` the user set to a place of their own,
``--private-tmp`` (the whole of ``/tmp`` is the host's then), and a ``/tmp``
the mirror does not serve (``--files-only`` with other exports).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Mapping, Optional

from remote_runner.mirror.exports import SCRATCH_TREES, Exports

LOG = logging.getLogger(__name__)

#: The directory's name here starts with this, then the pid of the process that made it.
PREFIX = "remote-runner-tmp-"
#: A directory of a process that is gone is removed once it is this old (seconds).
ORPHAN_AGE = 24 * 3600


def user_chose(environ: Mapping[str, str]) -> bool:
    """Whether ``$TMPDIR`` names a place of the user's own (not unset, not just ``/tmp``)."""
    value = environ.get("TMPDIR")
    if not value:
        return False
    return os.path.normpath(value) not in SCRATCH_TREES


def make_mount_point(exports: Exports, environ: Optional[Mapping[str, str]] = None) -> Optional[bytes]:
    """Make the empty directory the host mounts its own over; return its path (None: not wanted).

    *environ*: the command's environment here (default ``os.environ``).
    """
    if user_chose(os.environ if environ is None else environ):
        return None
    for tree in SCRATCH_TREES:
        if not os.path.isdir(tree) or exports.find(os.fsencode(tree)) is None:
            continue
        remove_orphans(tree)
        try:
            return os.fsencode(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=tree))
        except OSError as exc:
            LOG.debug("mirror: no host $TMPDIR: cannot make a directory in %s (%s)", tree, exc.strerror)
    return None


def remove_mount_point(path: Optional[bytes]) -> None:
    """Remove the directory :func:`make_mount_point` made, unless something was put in it here."""
    if path is None:
        return
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        LOG.warning("mirror: %s is not empty (%s): left in place", os.fsdecode(path), exc.strerror)


def remove_orphans(tree: str, now: Optional[float] = None) -> None:
    """Remove the empty directories of processes that are gone (killed before removing theirs).

    Only those older than :data:`ORPHAN_AGE`: a process of another pid
    namespace sharing this ``/tmp`` (a container) looks gone from here, and
    its directory is still a host's mount point.
    """
    try:
        names = [n for n in os.listdir(tree) if n.startswith(PREFIX)]
    except OSError:
        return
    now = time.time() if now is None else now
    for name in names:
        pid = name[len(PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path = os.path.join(tree, name)
        try:
            if now - os.lstat(path).st_mtime < ORPHAN_AGE:
                continue
            os.rmdir(path)
        except OSError:
            pass  # not empty (someone put something in it), or not ours: left alone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's
    return True
