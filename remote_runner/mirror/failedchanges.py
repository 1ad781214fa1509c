"""Changes the host sent without waiting, after one in the same directory failed here: not made.

Why: where the host knows a change's outcome (an unlink, a mkdir, a new file
in a directory it holds whole), it sends the change without waiting, and
what it sends next in that directory does not wait for that answer either
(a test suite's temporary directory is a mkdir, files made in it and
removed, an rmdir: a round trip each otherwise). Such a change can still
fail here (a local race: the name changed here meanwhile; a mount point's
EBUSY; a failing disk). Then the changes after it in that directory were
decided on a picture that is now wrong: a file created under the name an
unlink failed to free would open the old file and write into it. So from the
failure until the host shows that it knows (a change there that it waited
for: once it took the error, it sends none there without waiting), every
change sent without waiting in that directory fails here with the same
error and makes nothing. The command learns each as the host reports these
errors: at its next change in the directory, or at the file's close.

A failed ``mkdir`` bars its new directory too, so nothing is made in a
directory that is not there. Each failure is logged here, where the user is.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any, Dict, List

from remote_runner.mirror import protocol as P
from remote_runner.mirror.ownchanges import OWN_NAMES
from remote_runner.mirror.replies import OpError

LOG = logging.getLogger("remote_runner.mirror.service")

#: The arguments naming what each change makes, removes or alters (their directories are
#: its own): the host's own changes (:data:`~.ownchanges.OWN_NAMES`) but for a hard link's
#: target, whose directory's entries it leaves as they are. (write, release, fallocate name none.)
CHANGED_NAMES = dict(OWN_NAMES, link=("path",))
#: Barred directories kept at most (past it, all are forgotten: a session with that many failures).
LIMIT = 10000


def not_waited_for(op: str, args: Dict[str, Any]) -> bool:
    """Whether the host sent this change without waiting: numbered (``nseq``), or a new file or
    an emptying open on a handle the host numbered itself."""
    return "nseq" in args or (op in ("create", "open") and P.posted_handle(args.get("fh")))


def directories(op: str, args: Dict[str, Any]) -> List[bytes]:
    """The local directories whose entries or entries' attributes *op* changes ([] for none)."""
    out: Dict[bytes, None] = {}
    for key in CHANGED_NAMES.get(op, ()):
        raw = args.get(key)
        if not isinstance(raw, str):
            continue
        try:
            name = os.path.normpath(P.name_from_wire(raw))
        except P.ProtocolError:
            continue
        out[os.path.dirname(name) or b"/"] = None
    return list(out)


class FailedChanges:
    """The directories where a change sent without waiting failed, and its errno."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._barred: Dict[bytes, int] = {}
        #: Changes that failed here, and changes not made after them.
        self.failed = 0
        self.refused = 0

    def run(self, op: str, args: Dict[str, Any], call: Any) -> Any:
        """Run change *op* (*call* ()) unless it was sent without waiting into a barred directory."""
        dirs = directories(op, args)
        if not dirs or (op == "open" and not int(args.get("flags") or 0) & (os.O_TRUNC | os.O_CREAT)):
            return call()
        if not not_waited_for(op, args):
            self._lift(dirs)  # the host waits for this one: it knows of what failed before
            return call()
        barred = self._barred_errno(dirs)
        if barred:
            with self._lock:
                self.refused += 1
            self._bar(op, args, dirs, barred)
            raise OpError(barred)
        try:
            return call()
        except (OpError, OSError) as exc:
            code = exc.errno or errno.EIO
            if "nseq" in args:  # (a new file's error the host reports at its close, on its own)
                with self._lock:
                    self.failed += 1
                self._bar(op, args, dirs, code)
                LOG.warning("mirror: %s %s, sent by the host without waiting, failed here: %s; "
                            "changes sent after it in that directory are not made until the "
                            "command is told", op, os.fsdecode(b" -> ".join(
                                P.name_from_wire(args[k]) for k in CHANGED_NAMES[op] if isinstance(args.get(k), str))),
                            os.strerror(code))
            raise

    def _barred_errno(self, dirs: List[bytes]) -> int:
        with self._lock:
            for directory in dirs:
                code = self._barred.get(directory)
                if code:
                    return code
        return 0

    def _bar(self, op: str, args: Dict[str, Any], dirs: List[bytes], code: int) -> None:
        bar = list(dirs)
        if op == "mkdir" and isinstance(args.get("path"), str):
            bar.append(os.path.normpath(P.name_from_wire(args["path"])))  # nothing is made in it
        with self._lock:
            if len(self._barred) >= LIMIT:
                self._barred.clear()
            for directory in bar:
                self._barred.setdefault(directory, code)

    def _lift(self, dirs: List[bytes]) -> None:
        if not self._barred:
            return
        with self._lock:
            for directory in dirs:
                self._barred.pop(directory, None)
