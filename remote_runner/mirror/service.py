"""The local half of the mirror: carry out the remote's file-system requests here.

Every operation runs with ``os.*`` on byte paths as the local user, so files
the remote command creates are owned by that user on the local disk. Open
files live in a per-session :class:`HandleTable`; the remote only ever sees
small handle numbers we issued, never our raw descriptors, and an unknown
handle is EBADF rather than a write into whatever fd happens to have that
number. Errors come back as their errno, preserved across the wire.

Its parts: the handle table and reply (:mod:`.replies`), the answers sent
ahead of the host's questions (:mod:`.sendahead`, mixed in), the host's own
changes kept from echoing back and their outcome sent (:mod:`.ownchanges`,
mixed in), the changes not made after one that failed (:mod:`.failedchanges`),
the requests on open files (:mod:`.openfiles`, mixed in), extended
attributes (:mod:`.xattrs`, mixed in), and the Linux calls os lacks
(:mod:`.linuxcalls`).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from remote_runner.mirror.exports import Exports, Refused, resolve_parent
from remote_runner.mirror.failedchanges import FailedChanges
from remote_runner.mirror.host.writes import WriteOrder
from remote_runner.mirror.listing import DirectoryAnswers
from remote_runner.mirror.openfiles import OpenFiles
from remote_runner.mirror.ownchanges import HostChanges, OwnChanges
from remote_runner.mirror import protocol as P
from remote_runner.mirror.linuxcalls import renameat2
from remote_runner.mirror.localnames import (HiddenFiles, RequestDescriptors, is_hidden_name,
                                              proc_fd_path)
from remote_runner.mirror.replies import HandleTable, OpError, Reply
from remote_runner.mirror.sendahead import SendAhead, walk as _walk
from remote_runner.mirror.sharing import PublicDirs
from remote_runner.mirror.xattrs import ExtendedAttributes
from remote_runner.mirror.watcher import FsTypes

#: Names callers (tests, the session) reach through this module.
__all__ = ["HandleTable", "LocalFileService", "OpError", "Reply", "_walk"]

LOG = logging.getLogger(__name__)

#: The ordering key of the unlinks, rmdirs and renames the host sent without waiting.
CHANGES = "changes"
#: The most handles one change may be ordered after (``after_fh``); more is not a request the host makes.
AFTER_HANDLES = 64


def _handles_before(args: Dict[str, Any]) -> List[Tuple[int, int]]:
    """(handle, number) of the requests a change must come after (``after_fh``: handles the host
    numbered itself, see :meth:`~.host.state.MountState.after_names`); anything else in it is ignored."""
    listed = args.get("after_fh")
    if not isinstance(listed, list) or len(listed) > AFTER_HANDLES:
        return []
    return [(item[0], item[1]) for item in listed
            if isinstance(item, list) and len(item) == 2 and P.posted_handle(item[0])
            and type(item[1]) is int and item[1] >= 1]


class LocalFileService(OpenFiles, SendAhead, DirectoryAnswers, OwnChanges, ExtendedAttributes):
    """Answer mirror requests against the local file system.

    *roots* limits what the remote may touch (files-only mode exports only
    some trees); ``None`` exports the whole file system.
    """

    def __init__(self, roots: Optional[Sequence[bytes]] = None, writeback: bool = False,
                 exports: Optional[Exports] = None) -> None:
        self.handles = HandleTable()
        self.roots = [os.path.normpath(r) for r in roots] if roots is not None else None
        #: What the host may see and change (checked for every request, see exports.py).
        self.exports = exports or (Exports.only(self.roots) if self.roots is not None
                                   else Exports.everything())
        #: Handles opened in a read-only export: no fchmod/fchown/futimens through them.
        self._ro_handles: Set[int] = set()
        #: Handles of regular files on a local file system (see OpenFiles.quick_on_handle).
        self._quick_handles: Set[int] = set()
        self._local_fs = FsTypes()
        #: Directories whose listing must be filtered: parents of secrets, and directories on
        #: the way to an export that are not served themselves (a served directory shows all
        #: its entries, however many exports lie inside it: ``/usr/lib/x86_64-linux-gnu``
        #: beside a program's libraries would otherwise check 3,000 names per listing).
        self._filtered = ({os.path.dirname(d) for d in self.exports.deny}
                          | {d for d in ({os.path.dirname(e.path) for e in self.exports.exports}
                                         | self.exports.ancestors) if self.exports.find(d) is None})
        self.writeback = writeback
        #: When this session began: a file written since is one its command may see change.
        self.started = time.time()
        #: When the host itself last changed each name (see :func:`~.sharing.freshness`).
        self.host_changes = HostChanges()
        #: Which directories every local user may search (whole-file copies need it).
        self.public = PublicDirs()
        #: What this session looked up and sent whole (wire names, in order), for its profile.
        self.looked_up: Dict[str, None] = {}
        self.sent_whole: Dict[str, None] = {}
        #: Directories the host made this session, and names it removed or renamed away
        #: (wire names): they and what lies below them are not put in profiles.
        self.made_dirs: Set[str] = set()
        #: (names, files) of the command's profile with those it shares (its
        #: executable's, its directory tree's), offered once at ``validate``...
        self.seed: Tuple[List[str], List[str]] = ([], [])
        #: ... or of its own profile alone, to a host that ran the command before.
        self.own_seed: Tuple[List[str], List[str]] = ([], [])
        #: Programs whose libraries, and directories whose small files, were already
        #: listed to the host this session; bytes of small files listed so far.
        self._expanded: Dict[str, None] = {}
        self._sibling_dirs: Dict[bytes, None] = {}
        self._sibling_bytes = 0
        self._lookup_bytes = 0  # files sent with their lookups (see SendAhead._add_file)
        #: The siblings listed (wire names): the host may report which of them were used.
        self.listed_siblings: Set[str] = set()
        #: Files unlinked while open on the host, held here (see :mod:`.localnames`).
        self.hidden = HiddenFiles()
        #: Descriptors that reach a request's path (its parent, walked without links), per request.
        self.request_fds = RequestDescriptors()
        #: Watches the directories the host keeps answers from (set by the session; None: leases).
        self.watcher = None
        #: Answers kept while their directory is unchanged (see :meth:`_listing`, :meth:`_whole_meta`).
        self._answers: Dict[Tuple[bytes, int], Tuple[Any, ...]] = {}
        self._metas: Dict[str, Tuple[int, Optional[List[int]]]] = {}
        self._lookups: Dict[str, Tuple[int, Any]] = {}
        #: A program's loader list worked out ahead (:meth:`_libraries_ahead`), taken by its open.
        self._closures: Dict[str, List[str]] = {}
        #: The thread running :meth:`prepare`, if one was started, and what stops it.
        self.preparing: Optional[threading.Thread] = None
        self.prepare_stop = threading.Event()
        self.prepared = threading.Event()  # (what prepare does for certain is done)
        #: The directories the host offered at ``validate`` (kept for the next session's prepare).
        self.offered_dirs: List[str] = []
        #: One handle's pipelined writes (numbered ``seq``) applied in the order they were sent.
        self.order = WriteOrder()
        #: Directories where a change the host did not wait for failed (see failedchanges.py).
        self.failed_changes = FailedChanges()
        #: The name each handle was opened by (its writes are the host's own changes to it).
        self._handle_paths: Dict[int, bytes] = {}

    # -- helpers -------------------------------------------------------------
    def _path(self, args: Dict[str, Any], key: str = "path", write: bool = False) -> bytes:
        """The local name for the path in *args*, once the exports allow it (*write*: to change it).

        The name returned reaches the file through its parent directory's
        descriptor, opened without following links (:func:`exports.resolve_parent`).
        """
        raw = args.get(key)
        if raw is None:
            raise OpError(errno.EINVAL)
        try:
            path = P.name_from_wire(raw)
        except P.ProtocolError:
            raise OpError(errno.EINVAL)
        if not path.startswith(b"/") or b"\0" in path or b".." in path.split(b"/"):
            raise OpError(errno.EINVAL)
        path = os.path.normpath(path)
        try:
            self.exports.check(path, write)
            if self.hidden.path(path) is not None:
                return path  # reached through its held descriptor (its directory may be gone)
            return resolve_parent(path, self.request_fds.held(), self.request_fds.parents())
        except Refused as exc:
            raise OpError(exc.errno) from None

    def _new_path(self, a: Dict[str, Any], key: str = "path") -> bytes:
        """:meth:`_path` for a name to be created: an existing name the host may see is EEXIST.

        The kernel finds the name before it checks whether the directory may
        be written, so ``mkdir -p``'s (and pathlib's ``exist_ok``) mkdir of an
        existing directory in a read-only tree says EEXIST, not EROFS or EACCES.
        """
        try:
            return self._path(a, key, write=True)
        except OpError as exc:
            try:
                visible = self._path(a, key)
                os.lstat(self._held(a, key) or visible)
            except (OpError, OSError):
                raise exc from None
            raise OpError(errno.EEXIST) from None

    def _final(self, path: bytes) -> bytes:
        """A name for the file *path* names itself, refusing a symbolic link (ELOOP).

        For operations that would follow a link in the last component: the
        kernel never asks that of a link, so a request that does is refused
        rather than followed out of the exports.
        """
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.request_fds.held().append(fd)
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OpError(errno.ELOOP)
        return proc_fd_path(fd)

    def close(self) -> None:
        """Close every handle the remote left open, and let go of hidden files."""
        self.handles.close_all()
        self.hidden.close()

    def _held(self, a: Dict[str, Any], key: str = "path") -> Optional[bytes]:
        """The /proc/self/fd path standing for a hidden file named in *a*, or None."""
        try:
            return self.hidden.path(P.name_from_wire(a.get(key)))
        except P.ProtocolError:
            return None

    # -- dispatch ------------------------------------------------------------
    def runs_now(self, header: Dict[str, Any], size: int = 0) -> bool:
        """Whether request *header* (*size* payload bytes) may run at once, on the reader.

        A change not waited for: the host numbers them (``nseq``) and they
        arrive in that order; the next one due needs no worker: handing each
        to the pool, only for it to wait there for the one before, cost two
        thread switches per change (a test suite's set-up and clean-up are
        thousands of them). One that must wait (a number still to come, or an
        ``after`` not yet reached) goes to the pool as before.

        The same for a request on a handle the host numbered in order
        (``fh``, ``seq``: creating, writing, closing a file without waiting)
        when it is its handle's next and cannot block
        (:meth:`~.openfiles.OpenFiles.quick_on_handle`): a test suite's scratch
        files are a create, a write, a flush and a release each.
        """
        args = header.get("a")
        if not isinstance(args, dict):
            return False
        if "after" in args and not self.order.is_past(CHANGES, args["after"]):
            return False
        if "nseq" not in args:
            if "fh" not in args or "after_fh" in args or not self.quick_on_handle(header.get("op"), args, size):
                return False
            return self.order.is_next(args["fh"], args.get("seq"))
        if not all(self.order.is_past(fh, seq) for fh, seq in _handles_before(args)):
            return False
        return self.order.is_next(CHANGES, args["nseq"])

    def handle(self, op: str, args: Dict[str, Any], payload: bytes) -> Reply:
        """Run one operation; raise OpError (or OSError) on failure."""
        method = getattr(self, "op_" + op, None) if isinstance(op, str) and op.isidentifier() else None
        if method is None:
            raise OpError(errno.ENOSYS)
        try:
            if "after" in args:  # sent after changes not waited for: they come first
                self.order.wait_past(CHANGES, args["after"])
            for fh, seq in _handles_before(args):  # and after these handles' requests
                self.order.wait_past(fh, seq)
            # (not made on top of an earlier change there that failed, see failedchanges.py)
            run = lambda: self.failed_changes.run(op, args, lambda: self._run(op, method, args, payload))  # noqa: E731
            if "nseq" in args:
                return self.order.run(CHANGES, args["nseq"], run)
            seq = args.get("seq")
            if seq is not None and "fh" in args:
                try:
                    return self.order.run(args["fh"], seq, run)
                finally:
                    if op == "release":  # (a number the host chose is never used again)
                        self.order.forget(args["fh"], for_good=P.posted_handle(args["fh"]))
            return run()
        finally:
            self.request_fds.release()

    # -- metadata ------------------------------------------------------------
    def op_getattr(self, a: Dict[str, Any], _: bytes) -> Reply:
        """Return attributes; for a symlink also its target (``link``) and the target's attributes.

        Resolving a library path is lookup, readlink, lookup of the target:
        answering all three at once saves two round trips per symlink.
        """
        if a.get("fh") is not None:
            return Reply({"st": P.stat_to_wire(os.fstat(self.handles.get(a["fh"])))})
        if "dir" in a:
            return self._lookup_reply(a)  # the host's name cache asks (see listing.py)
        path = self._path(a)
        held = self._held(a)
        if held is not None:
            return Reply({"st": P.stat_to_wire(os.stat(held))})
        self._note(self.looked_up, a["path"])
        st = os.lstat(path)
        reply = Reply({"st": P.stat_to_wire(st)})
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(path)
            except OSError:
                return reply
            reply.fields["link"] = P.name_to_wire(target)
            raw = P.name_from_wire(a["path"])
            self._push(reply, [os.path.normpath(os.path.join(os.path.dirname(raw), target))])
        return reply

    def op_readlink(self, a: Dict[str, Any], _: bytes) -> Reply:
        """Return the link's target, pushing the target's attributes: the kernel looks it up next."""
        path = self._path(a)
        target = os.readlink(path)
        reply = Reply(payload=target)
        raw = P.name_from_wire(a["path"])
        self._push(reply, [os.path.normpath(os.path.join(os.path.dirname(raw), target))])
        return reply

    def op_readdir(self, a: Dict[str, Any], _: bytes) -> Reply:
        """List a directory with attributes of every entry (READDIRPLUS-style)."""
        path = self._path(a)
        raw = os.path.normpath(P.name_from_wire(a["path"]))
        watched = self._watch(raw)  # before listing: no change is missed
        names: List[bytes] = []
        attrs: List[Optional[Dict[str, int]]] = []
        for entry in self._served_entries(raw, path):
            names.append(entry.name)
            try:
                attrs.append(P.stat_to_wire(entry.stat(follow_symlinks=False)))
            except OSError:
                attrs.append(None)
        reply = Reply({"attrs": attrs, "w": 1 if watched else 0}, b"\0".join(names), compressible=True)
        self._listed_subdirectories(reply, raw, [
            name for name, st in zip(names, attrs) if st is not None and stat.S_ISDIR(st["st_mode"])])
        self._say_changeable(reply, a["path"])
        return reply

    def _served_entries(self, directory: bytes, where: bytes) -> Iterator[os.DirEntry]:
        """The entries of local *directory* (reached as *where*) the host may see (see Exports.listable)."""
        screened = directory in self._filtered
        with os.scandir(where) as it:
            for entry in it:
                if not screened or self.exports.listable(directory, entry.name):
                    yield entry

    def op_statfs(self, a: Dict[str, Any], _: bytes) -> Reply:
        sv = os.statvfs(self._path(a))
        return Reply({"sv": {k: getattr(sv, k) for k in P.STATVFS_FIELDS}})

    def op_chmod(self, a: Dict[str, Any], _: bytes) -> Reply:
        if a.get("fh") is not None:
            os.fchmod(self._writable_handle(a), int(a["mode"]) & 0o7777)
        else:
            path = self._path(a, write=True)
            os.chmod(self._held(a) or self._final(path), int(a["mode"]) & 0o7777)
        return Reply()

    def op_chown(self, a: Dict[str, Any], _: bytes) -> Reply:
        uid, gid = int(a.get("uid", -1)), int(a.get("gid", -1))
        if a.get("fh") is not None:
            os.fchown(self._writable_handle(a), uid, gid)
        else:
            path = self._path(a, write=True)
            held = self._held(a)
            os.chown(held or path, uid, gid, follow_symlinks=held is not None)
        return Reply()

    def op_utimens(self, a: Dict[str, Any], _: bytes) -> Reply:
        path = self._path(a, write=True)
        held = self._held(a)
        follow = held is not None
        if a.get("fh") is not None:
            path, follow = proc_fd_path(self._writable_handle(a)), True
        elif held is not None:
            path = held
        times = a.get("ns")
        if times is None:
            os.utime(path, follow_symlinks=follow)
            return Reply()
        atime, mtime = int(times[0]), int(times[1])
        if atime in (P.UTIME_NOW, P.UTIME_OMIT) or mtime in (P.UTIME_NOW, P.UTIME_OMIT):
            st = os.stat(path) if follow else os.lstat(path)
            now = time.time_ns()
            atime = now if atime == P.UTIME_NOW else (st.st_atime_ns if atime == P.UTIME_OMIT else atime)
            mtime = now if mtime == P.UTIME_NOW else (st.st_mtime_ns if mtime == P.UTIME_OMIT else mtime)
        os.utime(path, ns=(atime, mtime), follow_symlinks=follow)
        return Reply()

    def op_truncate(self, a: Dict[str, Any], _: bytes) -> Reply:
        if a.get("fh") is not None:
            os.ftruncate(self._writable_handle(a), int(a["size"]))
        else:
            path = self._path(a, write=True)
            os.truncate(self._held(a) or self._final(path), int(a["size"]))
        return Reply()

    # -- namespace -----------------------------------------------------------
    def _owner(self, a: Dict[str, Any], path: bytes, fd: Optional[int] = None) -> bool:
        """Give a new file to the host process that created it (``ctx``: its uid, gid).

        Only when this side runs as root and the creator is someone else (a
        program that switched users, as pjdfstest and ``sudo -u`` do); the
        group comes from a set-group-ID parent directory as the kernel would
        have given it. Returns whether the owner changed: chown clears the
        set-user/group-ID bits, so the caller applies the mode again.
        """
        ctx = a.get("ctx")
        if not (isinstance(ctx, list) and len(ctx) == 2 and os.geteuid() == 0):
            return False
        uid, gid = int(ctx[0]), int(ctx[1])
        if uid < 0 or gid < 0 or (uid, gid) == (0, 0):
            return False
        try:
            if os.stat(os.path.dirname(path) or b"/").st_mode & stat.S_ISGID:
                gid = -1
        except OSError:
            pass
        if fd is not None:
            os.fchown(fd, uid, gid)
        else:
            os.chown(path, uid, gid, follow_symlinks=False)
        return True

    def op_mkdir(self, a: Dict[str, Any], _: bytes) -> Reply:
        path = self._new_path(a)
        mode = int(a["mode"]) & 0o7777
        os.mkdir(path, mode)
        self._owner(a, path)
        # The remote already applied its umask; ours must not. A directory keeps
        # the set-group-ID bit it inherits from its parent, as the kernel gives it.
        os.chmod(path, mode | (os.lstat(path).st_mode & stat.S_ISGID))
        self._left_out(a["path"])
        return Reply()

    def op_rmdir(self, a: Dict[str, Any], _: bytes) -> Reply:
        os.rmdir(self._path(a, write=True))
        self._left_out(a["path"])
        return Reply()

    def _left_out(self, name: str) -> None:
        """Keep wire *name* and what lies below it out of profiles (see :attr:`made_dirs`): a
        directory made this session, or a name removed or renamed away (a test suite's cleanup
        of an earlier run's temporary tree: hundreds of them, else offered back at every start)."""
        if len(self.made_dirs) < P.PROFILE_NAMES:
            self.made_dirs.add(name)

    def op_unlink(self, a: Dict[str, Any], _: bytes) -> Reply:
        path = self._path(a, write=True)
        if self.hidden.release(P.name_from_wire(a["path"])):
            return Reply()  # libfuse lets go of a hidden file: it is already gone here
        os.unlink(path)
        return Reply()

    def op_symlink(self, a: Dict[str, Any], _: bytes) -> Reply:
        target = P.name_from_wire(a["target"])
        path = self._new_path(a)
        os.symlink(target, path)
        self._owner(a, path)
        return Reply()

    def op_link(self, a: Dict[str, Any], _: bytes) -> Reply:
        os.link(self._path(a, "target", write=True), self._new_path(a),
                follow_symlinks=False)
        return Reply()

    def op_rename(self, a: Dict[str, Any], _: bytes) -> Reply:
        old, new = self._path(a, "old", write=True), self._path(a, "new", write=True)
        flags = int(a.get("flags") or 0)
        if flags & ~(P.RENAME_NOREPLACE | P.RENAME_EXCHANGE):
            raise OpError(errno.EINVAL)
        if not flags and a.get("hide") and is_hidden_name(new):
            # libfuse hides a file unlinked or renamed over while open: remove it for
            # real here and hold it, so nothing is left behind (see :mod:`.localnames`).
            self.hidden.hide(old, P.name_from_wire(a["new"]))
            return Reply()
        if flags:
            renameat2(old, new, flags)
        else:
            os.rename(old, new)
        if not flags & P.RENAME_EXCHANGE:
            self._left_out(a["old"])
        return Reply()

    def op_mknod(self, a: Dict[str, Any], _: bytes) -> Reply:
        path = self._new_path(a)
        mode = int(a["mode"])
        if stat.S_ISFIFO(mode):
            os.mkfifo(path, mode & 0o7777)
        else:
            os.mknod(path, mode, int(a.get("dev") or 0))
        self._owner(a, path)
        os.chmod(path, mode & 0o7777)
        return Reply()

    def op_access(self, a: Dict[str, Any], _: bytes) -> Reply:
        path = self._path(a)
        held = self._held(a)
        if not os.access(held or path, int(a["mode"]), follow_symlinks=held is not None):
            raise OpError(errno.EACCES)
        return Reply()
