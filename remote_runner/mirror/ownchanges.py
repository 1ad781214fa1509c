"""The host's own changes: not echoed back to it, their outcome sent with the reply.

Why: the local side watches the directories the host keeps answers from and
reports every change in them (see :mod:`.watcher`). A change the host asked
for itself (a ``mkdir``, a file created, written and renamed by the command)
would come back as an invalidation, dropping what the host had just learned
and making its kernel forget the pages of a file it is writing; the host then
asked again for attributes it could have known (a ``getattr`` after every
``mkdir``, ``symlink`` or ``unlink``, the directory's own attributes...). So:

* the events of a request's own change are set aside (``ChangeWatcher.own``),
  while changes by anyone else, before or after, are still reported;
* the reply carries the state after the change, computed after the events were
  set aside: the new name's attributes (``st``), its directory's (``dst``) and
  whether that directory is watched (``w``: the host may keep them until told);
  a new directory watched and still empty says so (``empty``): the lookups
  made in it before its first entries are answered on the host.

Mixed into :class:`~.service.LocalFileService`.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from remote_runner.mirror import protocol as P
from remote_runner.mirror.replies import OpError, Reply
from remote_runner.mirror.sharing import freshness

LOG = logging.getLogger("remote_runner.mirror.service")

#: Per operation, the arguments naming what it changes (see LocalFileService._own_names);
#: operations through a handle also change the handle's file.
OWN_NAMES: Dict[str, Tuple[str, ...]] = {
    "mkdir": ("path",), "rmdir": ("path",), "unlink": ("path",), "symlink": ("path",),
    "mknod": ("path",), "create": ("path",), "link": ("path", "target"), "rename": ("old", "new"),
    "chmod": ("path",), "chown": ("path",), "utimens": ("path",), "truncate": ("path",),
    "setxattr": ("path",), "removexattr": ("path",), "open": ("path",), "write": (),
    "release": (), "fallocate": (),
}


class HostChanges:
    """When the host last changed each name (this machine's clock), for :func:`~.sharing.freshness`.

    A file the command itself just wrote is not one that changed under it: its
    host's kernel saw every write, so it keeps the page cache there (and can be
    mapped shared on any libfuse), unless something here changed it since.
    """

    LIMIT = 100000

    def __init__(self) -> None:
        self._last: Dict[bytes, float] = {}

    def note(self, names: List[bytes]) -> None:
        if len(self._last) >= self.LIMIT:
            self._last.clear()
        now = time.time()
        for name in names:
            self._last[name] = now

    def last(self, name: bytes) -> Optional[float]:
        return self._last.get(name)


class OwnChanges:
    """(Mixin) Runs a request with its own changes kept from the watcher's reports."""

    watcher: Any
    handles: Any
    request_fds: Any
    _handle_paths: Dict[int, bytes]
    host_changes: "HostChanges"
    started: float

    def _run(self, op: str, method: Any, args: Dict[str, Any], payload: bytes) -> Reply:
        """Run *method*; what it changes for the host is not echoed back to it, the new state is sent."""
        mine = self._own_names(op, args)
        if not mine:
            return method(args, payload)
        if self.watcher is None:
            reply = method(args, payload)
        else:
            with self.watcher.own(mine):
                reply = method(args, payload)
            self._tell_outcome(op, args, reply)
        self.host_changes.note(mine)
        return reply

    def freshness_of(self, st: os.stat_result, name: bytes) -> Dict[str, int]:
        """:func:`~.sharing.freshness` of the file *name* (a read-only open's reply fields)."""
        return freshness(st, self.started, self.host_changes.last(os.path.normpath(name)))

    def _own_names(self, op: str, a: Dict[str, Any]) -> List[bytes]:
        """The local names an operation changes (their changes are the host's own, see watcher.own)."""
        keys = OWN_NAMES.get(op)
        if keys is None or (op == "open" and not int(a.get("flags") or 0) & os.O_TRUNC):
            return []
        out = []
        for key in keys:
            raw = a.get(key)
            if isinstance(raw, str):
                try:
                    out.append(os.path.normpath(P.name_from_wire(raw)))
                except P.ProtocolError:
                    pass
        handle = self._handle_paths.get(a.get("fh")) if "fh" in a else None
        if handle is not None:
            out.append(handle)
        return out

    def _tell_outcome(self, op: str, a: Dict[str, Any], reply: Reply) -> None:
        """Add to *reply* what the host needs to know the names its request changed.

        Computed after the change was made and its events set aside, so a later
        change by someone else is either in these attributes or in a later
        ``inval``. ``w``: whether the directory is watched (the host may keep
        the answer until told otherwise).
        """
        if op in ("chmod", "chown", "utimens", "truncate"):
            # The kernel asks for the attributes next (its reply to a setattr carries them).
            if "fh" in a or self._held(a) is not None:
                return
            raw = os.path.normpath(P.name_from_wire(a["path"]))
            watched = self._watch(os.path.dirname(raw) or b"/")
            try:
                reply.fields["st"] = P.stat_to_wire(os.lstat(self._path(a)))
            except (OpError, OSError):
                return
            reply.fields["w"] = 1 if watched else 0
            return
        if op not in ("mkdir", "symlink", "mknod", "link", "create", "unlink", "rmdir"):
            return
        raw = os.path.normpath(P.name_from_wire(a["path"]))
        directory = os.path.dirname(raw) or b"/"
        watched = self._watch(directory)
        try:
            # the directory's mtime and link count changed too (through the descriptor the
            # change reached it by, if it did: see RequestDescriptors.parents)
            fd = self.request_fds.parents().get(directory)
            reply.fields["dst"] = P.stat_to_wire(
                os.stat(fd) if fd is not None else os.stat(self._path({"path": P.name_to_wire(directory)})))
            if op not in ("unlink", "rmdir"):
                st = (os.fstat(self.handles.get(reply.fields["fh"])) if op == "create"
                      else os.lstat(self._path(a)))
                reply.fields["st"] = P.stat_to_wire(st)
        except (OpError, OSError, KeyError):
            reply.fields.pop("st", None)
            reply.fields.pop("dst", None)
            return
        reply.fields["w"] = 1 if watched else 0
        if op == "mkdir" and self._watch(raw):
            # Watched before it is read: a new directory, empty unless someone was quick.
            try:
                if not os.listdir(self._path(a)):
                    reply.fields["empty"] = 1
            except (OpError, OSError):
                pass

    def serve(self, header: Dict[str, Any], payload: bytes) -> Tuple[Dict[str, Any], bytes, bool]:
        """Turn one request frame into a reply frame (header, payload, compressible).

        Every request gets a reply, whatever the host sent: a malformed one is
        EINVAL, and a failure of our own is EIO (logged), never a request left
        unanswered.
        """
        rid = header.get("id")
        args = header.get("a") or {}
        if not isinstance(args, dict):
            return {"t": P.REP, "id": rid, "e": errno.EINVAL}, b"", False
        try:
            reply = self.handle(header.get("op"), args, payload)
        except OpError as exc:
            return {"t": P.REP, "id": rid, "e": exc.errno}, b"", False
        except OSError as exc:
            return {"t": P.REP, "id": rid, "e": exc.errno or errno.EIO}, b"", False
        except (TypeError, ValueError, KeyError, OverflowError, AttributeError, IndexError) as exc:
            LOG.debug("mirror: bad request %r: %s", header, exc)
            return {"t": P.REP, "id": rid, "e": errno.EINVAL}, b"", False
        except Exception as exc:  # noqa: BLE001 - the host still gets an answer
            LOG.warning("mirror: request %s failed here: %r", header.get("op"), exc)
            return {"t": P.REP, "id": rid, "e": errno.EIO}, b"", False
        out = {"t": P.REP, "id": rid}
        out.update(reply.fields)
        return P.compact_reply(out), reply.payload, reply.compressible
