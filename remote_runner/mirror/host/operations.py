"""The FUSE operations: each one a request to the local file service, unless a cache answers.

Why apart: this is the file system the command sees. The rules that keep it
correct (what empties the attribute cache, which handles are local copies,
libfuse 3's renameat2 flags and ftruncate handle passed on) are here, and
nothing else.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import protocol as P
from ..hardlinks import LinkNames, path_invalidator
from .caches import LOCAL_FH_BASE, MISSING, AttrCache, FileCache, fetch_ahead, fetch_rest
from .link import Link
from .profile import Profile

FUSE_CAP_CACHE_SYMLINKS = 1 << 23


MUTATING_OPS = frozenset(("mknod", "mkdir", "unlink", "rmdir", "symlink", "link", "rename", "chmod",
                          "chown", "truncate", "utimens", "create", "write", "open", "release", "flush",
                          "fsync", "fallocate", "setxattr", "removexattr"))


def make_operations(link: Link, prefix: bytes, files: Optional[FileCache] = None,
                    cache: Optional[AttrCache] = None, profile: Optional["Profile"] = None):
    """Build the mfusepy Operations object serving the local tree at *prefix*."""
    import mfusepy

    cache = cache if cache is not None else AttrCache()

    def wire(path: str) -> str:
        if path is None:  # an operation on an open file whose name libfuse no longer knows
            raise mfusepy.FuseOSError(errno.ESTALE)
        raw = path.encode("utf-8", "surrogateescape")
        full = (prefix.rstrip(b"/") + raw) if prefix else raw
        return P.name_to_wire(full or b"/")

    reading: Dict[int, None] = {}  # local handles opened read-only: closing them changes nothing
    links = LinkNames()
    no_caps: Dict[str, float] = {}  # paths without security.capability, until when

    def mutates(op: str, args: Dict[str, Any]) -> bool:
        if op == "open":
            return args.get("flags", 0) & (os.O_ACCMODE | os.O_TRUNC) != os.O_RDONLY
        if op in ("flush", "release"):
            return args.get("fh") not in reading
        return op in MUTATING_OPS

    def call(op: str, args: Dict[str, Any], payload: bytes = b"") -> Tuple[Dict[str, Any], bytes]:
        if mutates(op, args):
            cache.clear()
        try:
            header, data = link.call(op, args, payload)
        except OSError as exc:
            raise mfusepy.FuseOSError(exc.errno or errno.EIO)
        if op == "open" and "fh" in header and not mutates(op, args):
            reading[header["fh"]] = None
        elif op == "release":
            reading.pop(args.get("fh"), None)
        for item in header.get("push") or ():
            try:
                cache.put(item[0], item[1])
            except (IndexError, TypeError):
                continue
        return header, data

    def local_fd(fh: int) -> int:
        entry = files.handles.get(fh) if files is not None else None
        if entry is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        return entry[0]

    def open_whole(path: str, flags: int) -> int:
        """Open read-only through the host's copy of the file (see :class:`FileCache`)."""
        assert files is not None
        fd = None
        files.wait_for(path, link.request_timeout)
        have = files.lookup(path)
        recent = cache.recent(path)
        if have is not None and recent is not None and [
                recent[1].get("st_size"), recent[1].get("st_mtime"), recent[1].get("st_ino")] == have:
            # The kernel's lookup a moment ago matched our copy: no need to ask again.
            fd = files.open_copy(path, have)
            if fd is not None:
                link.answer_here("open")
                cache.put(path, recent[1], recent[0])  # for the getattr after the open
                return files.add_handle(fd, recent[1])
        while True:
            header, first = call("open", {"path": path, "flags": flags, "whole": True, "have": have})
            if isinstance(header.get("libs"), dict):  # a program: its libraries come next
                fetch_ahead(link, files, cache, header["libs"])
            meta = header.get("whole")
            if not meta:  # not eligible (too big, changing, not a regular file)
                return int(header["fh"])
            if first or "fh" in header:
                break
            fd = files.open_copy(path, meta)  # our copy is current
            if fd is not None or have is None:
                break
            have = None  # another session dropped the copy: ask for the data
        if fd is None:
            fd = fetch_whole(path, meta, header.get("fh"), first)
        if fd is None:  # fall back to reading through the link
            return int(call("open", {"path": path, "flags": flags})[0]["fh"])
        cache.put(path, header["st"])  # the kernel asks for the attributes right after an open
        return files.add_handle(fd, header["st"])

    def fetch_whole(path: str, meta: List[int], fh: Optional[int], first: bytes) -> Optional[int]:
        """Receive the rest of a whole file (all chunks requested at once); store it, return an fd.

        None when the file changed while it was sent or the copy cannot be stored.
        """
        assert files is not None
        chunks = fetch_rest(link, [(fh, first, meta[0])])[0]
        if chunks is None:
            return None
        return files.store_quietly(path, meta, chunks)

    class MirrorOperations(mfusepy.Operations):
        use_ns = True

        def __init__(self) -> None:
            self.mounted = threading.Event()

        def init_with_config(self, conn: Any, config: Any) -> None:
            # libfuse 3 can let the kernel cache symlink targets: without it every
            # path through /lib -> usr/lib costs a readlink round trip.
            if conn is not None and getattr(mfusepy, "fuse_version_major", 2) == 3:
                if conn.capable & FUSE_CAP_CACHE_SYMLINKS:
                    conn.want |= FUSE_CAP_CACHE_SYMLINKS
            links.invalidate = path_invalidator()
            self.mounted.set()

        def getattr(self, path: Optional[str], fh: Optional[int] = None) -> Dict[str, int]:
            args: Dict[str, Any] = {"path": wire(path)} if path is not None or not fh else {}
            if fh is not None and fh >= LOCAL_FH_BASE and files is not None:
                entry = files.handles.get(fh)
                if entry is not None:
                    link.answer_here("getattr")
                    return entry[1]
            if fh is not None and fh:
                args["fh"] = fh
            if "fh" not in args:
                if profile is not None:
                    profile.record(args["path"])
                cached = cache.get(args["path"])
                if cached is MISSING or (cached is not None and cached.get("missing")):
                    link.answer_here("getattr")
                    raise mfusepy.FuseOSError(errno.ENOENT)
                if cached is None:
                    # Asked again within the lease of the last answer (as long as the
                    # kernel's own attr_timeout, emptied by any change made through here).
                    lease = cache.recent(args["path"])
                    cached = lease[1] if lease is not None else None
                if cached is not None:
                    link.answer_here("getattr")
                    return cached
            header = call("getattr", args)[0]
            if path is not None:
                links.seen(path, header.get("st"))
            if "fh" not in args and "path" in args:
                cache.note(args["path"], header["st"])
                if isinstance(header.get("link"), str):
                    cache.note(args["path"], {"link": header["link"]}, kind="link")
            return header["st"]

        def readlink(self, path: str) -> str:
            recent = cache.recent(wire(path), kind="link")  # sent with the lookup just before
            if recent is not None:
                link.answer_here("readlink")
                return recent[1]["link"]
            return call("readlink", {"path": wire(path)})[1].decode("utf-8", "surrogateescape")

        def readdir(self, path: str, fh: int):
            where = wire(path)
            header, payload = call("readdir", {"path": where})
            names = payload.split(b"\0") if payload else []
            attrs = header.get("attrs") or [None] * len(names)
            out: List[Any] = [(".", None, 0), ("..", None, 0)]
            base = where.rstrip("/") + "/"
            for name, st in zip(names, attrs):
                text = name.decode("utf-8", "surrogateescape")
                cache.put(base + text, st)
                links.seen(path.rstrip("/") + "/" + text, st)
                out.append((text, st, 0))
            return out

        def statfs(self, path: str) -> Dict[str, int]:
            return call("statfs", {"path": wire(path)})[0]["sv"]

        def mknod(self, path: str, mode: int, dev: int) -> int:
            call("mknod", {"path": wire(path), "mode": mode, "dev": dev, "ctx": caller()})
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            call("mkdir", {"path": wire(path), "mode": mode, "ctx": caller()})
            return 0

        def unlink(self, path: str) -> int:
            others = links.others(path)
            call("unlink", {"path": wire(path)})
            links.forget(path)
            links.refresh(others)
            return 0

        def rmdir(self, path: str) -> int:
            call("rmdir", {"path": wire(path)})
            return 0

        def symlink(self, target: str, source: str) -> int:
            # mfusepy: *target* is the new link's path, *source* its contents.
            call("symlink", {"path": wire(target), "ctx": caller(),
                             "target": P.name_to_wire(source.encode("utf-8", "surrogateescape"))})
            return 0

        def link(self, target: str, source: str) -> int:
            call("link", {"path": wire(target), "target": wire(source)})
            links.refresh(links.others(source) + [source])
            return 0

        def rename(self, old: str, new: str, flags: int = 0) -> int:
            args: Dict[str, Any] = {"old": wire(old), "new": wire(new), "flags": flags}
            if not flags and hidden_name(new):
                args["hide"] = True  # libfuse hiding a file unlinked while open (see the service)
            replaced = links.others(new)
            call("rename", args)
            links.forget(new)
            links.moved(old, new)  # the file's ctime changed: its other names see it too
            links.refresh(replaced)
            return 0

        def chmod(self, path: str, mode: int) -> int:
            call("chmod", {"path": wire(path), "mode": mode})
            links.changed(path)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            call("chown", {"path": wire(path), "uid": _signed(uid), "gid": _signed(gid)})
            links.changed(path)
            return 0

        def truncate(self, path: str, length: int, fh: Optional[int] = None) -> int:
            args: Dict[str, Any] = {"size": length}
            if fh and fh < LOCAL_FH_BASE:
                args["fh"] = fh
            args["path"] = wire(path) if path is not None or not fh else "/"
            call("truncate", args)
            links.changed(path)
            return 0

        def utimens(self, path: str, times: Optional[Tuple[int, int]] = None) -> int:
            call("utimens", {"path": wire(path), "ns": list(times) if times else None})
            links.changed(path)
            return 0

        def open(self, path: str, flags: int) -> int:
            if files is not None and flags & (os.O_ACCMODE | os.O_TRUNC | os.O_CREAT) == os.O_RDONLY:
                return open_whole(wire(path), flags)
            return int(call("open", {"path": wire(path), "flags": flags})[0]["fh"])

        def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
            return int(call("create", {"path": wire(path), "mode": mode, "flags": flags,
                                       "ctx": caller()})[0]["fh"])

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            if fh >= LOCAL_FH_BASE:
                link.answer_here("read")
                return os.pread(local_fd(fh), size, offset)
            return call("read", {"fh": fh, "size": size, "off": offset})[1]

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            done = int(call("write", {"fh": fh, "off": offset}, bytes(data))[0]["n"])
            links.changed(path)
            return done

        def flush(self, path: str, fh: int) -> int:
            if fh >= LOCAL_FH_BASE or fh in reading:
                # A read-only handle has nothing to write back and no error to report.
                link.answer_here("flush")
                return 0
            call("flush", {"fh": fh})
            return 0

        def release(self, path: str, fh: int) -> int:
            if fh >= LOCAL_FH_BASE:
                files.release(fh)
                link.answer_here("release")
                return 0
            if fh in reading:
                # Closing a read-only handle changes nothing the program could see:
                # the local side closes it while the program goes on.
                reading.pop(fh, None)
                link.answer_here("release")
                link.post("release", {"fh": fh})
                return 0
            call("release", {"fh": fh})
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            if fh >= LOCAL_FH_BASE:
                return 0
            call("fsync", {"fh": fh, "data": bool(datasync)})
            return 0

        def fallocate(self, path: Optional[str], mode: int, offset: int, size: int, fh: int) -> int:
            if fh >= LOCAL_FH_BASE:
                raise mfusepy.FuseOSError(errno.EBADF)
            call("fallocate", {"fh": fh, "mode": mode, "off": offset, "len": size})
            links.changed(path)
            return 0

        # Extended attributes: names travel as text (surrogate-escaped), values as bytes.
        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            if name == "security.capability" and no_caps.get(path, 0.0) > time.monotonic():
                # Asked before every write (to drop privileges); asked once per second here.
                raise mfusepy.FuseOSError(errno.ENODATA)
            try:
                return call("getxattr", {"path": wire(path), "name": name})[1]
            except mfusepy.FuseOSError as exc:
                if name == "security.capability" and exc.errno == errno.ENODATA:
                    no_caps[path] = time.monotonic() + 1.0
                raise

        def listxattr(self, path: str) -> List[str]:
            data = call("listxattr", {"path": wire(path)})[1]
            return [n.decode("utf-8", "surrogateescape") for n in data.split(b"\0") if n]

        def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
            no_caps.pop(path, None)
            call("setxattr", {"path": wire(path), "name": name, "flags": options}, bytes(value))
            return 0

        def removexattr(self, path: str, name: str) -> int:
            call("removexattr", {"path": wire(path), "name": name})
            return 0

    class MirrorFUSE(mfusepy.FUSE):
        """mfusepy drops renameat2 flags and ftruncate's handle; pass them on."""

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return self.operations.rename(old.decode(self.encoding, self.errors),
                                          new.decode(self.encoding, self.errors), flags)

        def truncate_fuse_3(self, path: Optional[bytes], length: int, fip: Any) -> int:
            fh = fip.contents.fh if fip else None
            return self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors),
                                            length, fh)

    return MirrorOperations(), MirrorFUSE


def caller() -> List[int]:
    """uid and gid of the process making the current FUSE request (new files become theirs)."""
    import mfusepy
    uid, gid, _ = mfusepy.fuse_get_context()
    return [uid, gid]


def hidden_name(path: str) -> bool:
    """Whether *path* has the shape of libfuse's ``.fuse_hidden`` + 16 hex digits name."""
    name = path.rsplit("/", 1)[-1]
    digits = name[len(".fuse_hidden"):]
    return name.startswith(".fuse_hidden") and len(digits) == 16 and all(
        c in "0123456789abcdef" for c in digits)


def _signed(value: int) -> int:
    """Map an unsigned 32-bit "unchanged" id (0xffffffff) to -1."""
    return -1 if value in (-1, 0xFFFFFFFF) else value
