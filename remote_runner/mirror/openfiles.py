"""The local side's requests on open files: open, create, read, write, flush, release, fsync.

Why apart: these are the requests that hold a descriptor between calls. What
they share is the handle table's rules: a handle opened in a read-only export
cannot change anything (:meth:`OpenFiles._writable_handle`), the name each
handle was opened by is kept (its writes are the host's own changes to it),
a host that did not wait for an open or a create numbers the handle itself
(within ``protocol.POSTED_HANDLES``), and a whole-file open answers with the
file's first chunk and what to fetch beside it (:mod:`.sendahead`). Mixed
into :class:`~.service.LocalFileService`, whose helpers (``_path``,
``_held``, ``_owner``) and tables these use.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from typing import Any, Dict, Optional

from remote_runner.mirror import elf
from remote_runner.mirror import protocol as P
from remote_runner.mirror.linuxcalls import fallocate
from remote_runner.mirror.replies import OpError, Reply


#: Requests on the handle of a regular file on a local disk that wait for nothing else.
QUICK_ON_REGULAR = frozenset(("write", "flush", "release"))
#: ... a write only up to this many bytes (a larger one may wait for the disk's write-back).
QUICK_WRITE = 64 << 10


class OpenFiles:
    """(Mixed into LocalFileService) requests on open files and the handles they hold."""

    #: The thread that reads the link (:meth:`~.locallink.LocalLink._read_loop`), which
    #: serves a request itself only when it cannot block (:meth:`quick_on_handle`).
    reader_ident: Optional[int] = None

    def quick_on_handle(self, op: Any, a: Dict[str, Any], size: int) -> bool:
        """Whether request *op* on handle ``a["fh"]`` (*size* bytes) waits for nothing but a local disk.

        A create, which makes a new file (``O_EXCL`` first; on the reader, a
        name that appeared meanwhile is opened without blocking, see
        :meth:`_open_existing`); a small write, a flush or a release of a
        regular file on a local file system. Anything else may wait for
        another process (a FIFO's handle), a server (NFS's close writes back)
        or the disk's write-back (a large write).
        """
        if op == "create":
            return True
        return op in QUICK_ON_REGULAR and a.get("fh") in self._quick_handles and (
            op != "write" or size <= QUICK_WRITE)

    def _writable_handle(self, a: Dict[str, Any]) -> int:
        """The descriptor of ``fh`` in *a*, unless it was opened in a read-only export."""
        if a.get("fh") in self._ro_handles:
            raise OpError(errno.EROFS)
        return self.handles.get(a["fh"])

    def _add_handle(self, fd: int, st: os.stat_result, a: Dict[str, Any], number: Optional[int] = None) -> int:
        """Keep *fd* (whose fstat is *st*) as a handle of the file ``a["path"]``; return its number."""
        handle = self.handles.add(fd, number)
        if stat.S_ISREG(st.st_mode) and self._local_fs.watchable(st.st_dev):
            self._quick_handles.add(handle)
        try:
            name = P.name_from_wire(a["path"])
            export = self.exports.find(name)
            self._handle_paths[handle] = os.path.normpath(name)
        except (P.ProtocolError, KeyError):
            export = None
        if export is None or not export.writable:
            self._ro_handles.add(handle)
        return handle

    def _flags(self, flags: int) -> int:
        if self.writeback:
            # The kernel write-back cache reads partial pages through this handle
            # and computes append offsets itself.
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags | os.O_CLOEXEC | os.O_NOCTTY

    def op_open(self, a: Dict[str, Any], _: bytes) -> Reply:
        flags = int(a["flags"]) & ~(os.O_CREAT | os.O_EXCL)
        changes = flags & (os.O_ACCMODE | os.O_TRUNC) != os.O_RDONLY
        path = self._path(a, write=changes)
        held = self._held(a)
        watched = a.get("whole") and not changes and self._watch_parent(a["path"])
        fd = os.open(held or path, self._flags(flags) | (0 if held else os.O_NOFOLLOW))
        if a.get("whole") and not changes:
            try:
                reply = self._whole(fd, a.get("have"), P.name_from_wire(a["path"]), a.get("basis"))
                if "whole" in reply.fields:
                    reply.fields["w"] = 1 if watched else 0
                    if a.get("ahead"):
                        # Listed by an earlier reply, with what follows it; that reply noted
                        # it for the profile if the program is known to need it (a library,
                        # a profile's file); a sibling only if the host says it was opened.
                        return reply
                    self._note(self.sent_whole, a["path"])
                    if (reply.payload or reply.head).startswith(elf.MAGIC):
                        self._add_libraries(reply, a["path"])
                    else:
                        self._add_siblings(reply, a["path"], reply.fields["whole"][0])
                return reply
            except BaseException:
                os.close(fd)
                raise
        try:
            st = os.fstat(fd)
            handle = self._add_handle(fd, st, a, a.get("fh"))  # (numbered by a host that did not wait)
        except BaseException:
            os.close(fd)
            raise
        if flags & os.O_TRUNC and changes:
            # emptied: its attributes, so the host can follow its size as it writes
            return Reply({"fh": handle, "st": P.stat_to_wire(st)})
        if not changes:  # (a file just written is read past the host kernel's cache)
            return Reply({"fh": handle, **self.freshness_of(st, P.name_from_wire(a["path"]))})
        return Reply({"fh": handle})

    def op_create(self, a: Dict[str, Any], _: bytes) -> Reply:
        path = self._path(a, write=True)
        mode = int(a["mode"]) & 0o7777
        flags = self._flags(int(a["flags"])) | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
            created = True
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd = self._open_existing(path, flags & ~os.O_CREAT)
            created = False
        try:
            if created:
                self._owner(a, path, fd)
                os.fchmod(fd, mode)  # the remote umask applies, not ours
            st = os.fstat(fd)
            # "fh": the number a host that did not wait for this reply already uses
            handle = self._add_handle(fd, st, a, a.get("fh"))
        except BaseException:
            os.close(fd)
            raise
        return Reply({"fh": handle, "st": P.stat_to_wire(st)})

    def _open_existing(self, path: bytes, flags: int) -> int:
        """Open a name a create found already there (made here since the host looked it up).

        On the link's reader (which must never block) it is opened
        ``O_NONBLOCK``: a regular file then behaves as opened plainly; anything
        else (a FIFO with no reader would wait for one) fails with EAGAIN.
        """
        if threading.get_ident() != self.reader_ident:
            return os.open(path, flags)
        try:
            fd = os.open(path, flags | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO and not flags & os.O_NONBLOCK:  # a FIFO no one reads
                raise OpError(errno.EAGAIN) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OpError(errno.EAGAIN)
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def op_read(self, a: Dict[str, Any], _: bytes) -> Reply:
        size = min(int(a["size"]), P.MAX_PAYLOAD // 2)
        return Reply(payload=os.pread(self.handles.get(a["fh"]), size, int(a["off"])), compressible=True)

    def op_write(self, a: Dict[str, Any], data: bytes) -> Reply:
        fd = self.handles.get(a["fh"])
        off = int(a["off"])
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += os.pwrite(fd, view[done:], off + done)
        return Reply({"n": done})

    def op_flush(self, a: Dict[str, Any], _: bytes) -> Reply:
        fd = self.handles.get(a["fh"])
        os.close(os.dup(fd))
        raw = self._handle_paths.get(a["fh"])
        if not a.get("st") or raw is None:
            return Reply()
        # The file's attributes after its writes (the host guessed them meanwhile), and
        # whether its directory is watched (then the host may keep them until told).
        watched = self._watch(os.path.dirname(raw) or b"/")
        return Reply({"st": P.stat_to_wire(os.fstat(fd)), "w": 1 if watched else 0})

    def op_release(self, a: Dict[str, Any], _: bytes) -> Reply:
        self._handle_paths.pop(a["fh"], None)
        os.close(self.handles.pop(a["fh"]))
        self._ro_handles.discard(a["fh"])
        self._quick_handles.discard(a["fh"])
        return Reply()

    def op_fsync(self, a: Dict[str, Any], _: bytes) -> Reply:
        fd = self.handles.get(a["fh"])
        if a.get("data"):
            os.fdatasync(fd)
        else:
            os.fsync(fd)
        return Reply()

    def op_fallocate(self, a: Dict[str, Any], _: bytes) -> Reply:
        fallocate(self.handles.get(a["fh"]), int(a.get("mode") or 0), int(a["off"]), int(a["len"]))
        return Reply()
