"""The FUSE operations on names: each one a request to the local file service, unless a cache answers.

Why apart: this is the file system the command sees, one operation at a
time: which caches may answer it here, what it sends, what its reply teaches
the caches. Lookups, listings, links, renames, attributes and extended
attributes are here; a file's contents (open, read, write, close) are
:mod:`.contents`. What all operations share (the request path, the rules for
what a change drops from the name cache, which changes may go without
waiting, the handle tables) is :class:`~.state.MountState`; the binding's own
fixes are :mod:`.fusebinding`. :func:`make_operations` joins both halves to
mfusepy's ``Operations`` once libfuse is loaded (so these modules import
without it).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import protocol as P
from ..hardlinks import path_invalidator
from .caches import (FUSE_CAP_CACHE_SYMLINKS, FUSE_CAP_DIRECT_IO_ALLOW_MMAP, LOCAL_FH_BASE, FileCache, copy_key,
                     fetch_ahead)
from .fusebinding import fuse_class, pin_once
from .link import Link
from .answers import absorb_lookup, split_file, subdirectory_answers
from .kernel import KernelDrops
from . import listcache
from .names import NameCache, parent as parent_of
from .profile import Profile
from .contents import ContentOperations
from .state import MountState, caller, hidden_name


def make_operations(link: Link, prefix: bytes, files: Optional[FileCache] = None,
                    cache: Optional[NameCache] = None, profile: Optional["Profile"] = None,
                    drops: Optional[KernelDrops] = None):
    """Build the mfusepy Operations object serving the local tree at *prefix*, and its FUSE class."""
    import mfusepy

    m = MountState(link, prefix, files, cache, profile, drops, mfusepy.FuseOSError)
    namespace: Dict[str, Any] = {"use_ns": True}
    if listcache.passes_flags(mfusepy):
        # Registered only where libfuse passes the flags on; older ones get a wrapper (see listcache).
        namespace["opendir"] = _keep_listing
    cls = type("MirrorOperations", (NameOperations, ContentOperations, mfusepy.Operations), namespace)
    return cls(m, mfusepy), fuse_class(mfusepy, m)


def _keep_listing(self: Any, path: str) -> int:
    return 0  # (MirrorFUSE.opendir asks the kernel to keep the listing)


class NameOperations:
    """Names, attributes, links and extended attributes: lookups answered by the name cache when it can."""

    def __init__(self, m: MountState, fuse: Any) -> None:
        self.m = m
        self.fuse = fuse  # the mfusepy module (libfuse's version, its session)
        self.mounted = threading.Event()

    def init_with_config(self, conn: Any, config: Any) -> None:
        m = self.m
        # libfuse 3 can let the kernel cache symlink targets: without it every
        # path through /lib -> usr/lib costs a readlink round trip.
        if conn is not None and getattr(self.fuse, "fuse_version_major", 2) == 3:
            if conn.capable & FUSE_CAP_CACHE_SYMLINKS:
                conn.want |= FUSE_CAP_CACHE_SYMLINKS
            # (libfuse >= 3.16, Linux >= 6.6) a fresh file, read without the page cache, can
            # still be mapped shared (see fusebinding); before, only privately.
            if conn.capable & FUSE_CAP_DIRECT_IO_ALLOW_MMAP:
                conn.want |= FUSE_CAP_DIRECT_IO_ALLOW_MMAP
                m.fresh.shared_maps = True
        kernel = path_invalidator()

        def invalidate(name: str) -> Any:
            # Another name of a file changed through this one: drop it here and in the kernel.
            m.cache.changed(m.wire(name))
            return kernel(name) if kernel is not None else None

        m.links.invalidate = invalidate
        m.link.kernel_listings.add(listcache.wrap_session_opendir(self.fuse, pin_once))
        if m.drops is not None:
            m.drops.add_target(m.wire("/") if m.prefix else "", kernel)
        self.mounted.set()

    def getattr(self, path: Optional[str], fh: Optional[int] = None) -> Dict[str, int]:
        m = self.m
        attrs = self._attributes(path, fh)
        if m.guesses and path is not None:
            m.guesses.handed(m.wire(path))  # (a guess given to the kernel: dropped there at its reply)
        if m.drops is not None:
            m.drops.settle()  # the kernel forgets older answers first (see KernelDrops.settle)
        return attrs

    def _attributes(self, path: Optional[str], fh: Optional[int]) -> Dict[str, int]:
        m = self.m
        if m.guesses and m.changes.pending:
            m.changes.collect()  # replies arrived: real attributes for guessed directories
        args: Dict[str, Any] = {"path": m.wire(path)} if path is not None or not fh else {}
        if fh is not None and fh >= LOCAL_FH_BASE and m.files is not None:
            entry = m.files.handles.get(fh)
            if entry is not None:
                m.link.answer_here("getattr")
                return entry[1]
        if fh in m.reading and P.posted_handle(fh) and path is not None:
            known = m.cache.get(args["path"])  # (its open is not answered yet: the name's)
            if known is not None and not known.get("missing"):
                m.link.answer_here("getattr")
                return known
        if fh is not None and fh:
            args["fh"] = fh
            made = m.created.get(fh)
            if made is not None and path is not None:
                # A file this host created: while its name still stands for it (same
                # inode) its size and times follow from its own writes (see write),
                # with no need to wait for them.
                known = m.cache.get(args["path"])
                if known is not None and not known.get("missing") and known.get("st_ino") == made:
                    m.link.answer_here("getattr")
                    return known
            m.drain(fh)
        if "fh" not in args and not hidden_name(args["path"]):
            # (a file libfuse hid, unlinked while open, is held by the local side, not listed)
            where = args["path"]
            if m.profile is not None:
                m.profile.record(where)
            cached = m.cache.get(where)
            if cached is not None and cached.get("missing"):
                m.link.answer_here("getattr")
                raise m.fault(errno.ENOENT)
            if cached is not None:
                m.link.answer_here("getattr")
                if m.cache.kernel_must_look_up(where, int(cached.get("st_mode", 0))):
                    raise m.fault(errno.ESTALE)  # (see NameCache.kernel_must_look_up)
                if path is not None:
                    m.links.seen(path, cached)  # a name learned from a reply (a link just made)
                return cached
            since = m.cache.begin()
            # A first lookup in a directory brings the whole directory (see names.py).
            args["dir"] = 1 if where != "/" and m.cache.wants_listing(parent_of(where)) else 0
            if args["dir"] and m.files is not None:
                args["f"] = 1  # a small system file may come with the answer (kept in m.files)
            header, data = m.call("getattr", args)
            data, brought = split_file(header, data)
            got = absorb_lookup(m.cache, where, header, data, since)
            if brought is not None and m.files is not None and brought[0] == copy_key(got):
                fd = m.files.store_quietly(where, brought[0], [brought[1]])  # its open: answered here
                if fd is not None:
                    os.close(fd)
            if isinstance(header.get("libs"), dict) and m.files is not None:
                fetch_ahead(m.link, m.files, m.cache, header["libs"], since)  # a package's modules
            if got.get("missing"):
                raise m.fault(errno.ENOENT)
            if path is not None:
                m.links.seen(path, got)
            if m.cache.kernel_must_look_up(where, int(got.get("st_mode", 0))):
                raise m.fault(errno.ESTALE)
            return got
        header = m.call("getattr", args)[0]
        m.cache.inodes.alias(header.get("st"))
        if path is not None:
            m.links.seen(path, header.get("st"))
        return header["st"]

    def readlink(self, path: str) -> str:
        m = self.m
        known = m.cache.link(m.wire(path))  # sent with the lookup (or the directory)
        if known is not None:
            m.link.answer_here("readlink")
            return known
        return m.call("readlink", {"path": m.wire(path)})[1].decode("utf-8", "surrogateescape")

    def readdir(self, path: str, fh: int):
        m = self.m
        where = m.wire(path)
        if m.profile is not None:
            m.profile.record_dir(where)
        out: List[Any] = [(".", None, 0), ("..", None, 0)]
        held = m.cache.names(where)  # a whole listing, still standing (watched)
        if held is not None:
            m.link.answer_here("readdir")
            return out + [(name, st, 0) for name, st in held]
        since = m.cache.begin()
        header, payload = m.call("readdir", {"path": where})
        subdirectory_answers(m.cache, header, payload, since)  # a walk's next listings
        if isinstance(header.get("nl"), int):
            payload = payload[:header["nl"]]
        names = payload.split(b"\0") if payload else []
        attrs = header.get("attrs") or [None] * len(names)
        entries = []
        for name, st in zip(names, attrs):
            m.cache.inodes.alias(st)
            text = name.decode("utf-8", "surrogateescape")
            entries.append((text, st if isinstance(st, dict) else None, None))
            m.links.seen(path.rstrip("/") + "/" + text, st)
            out.append((text, st, 0))
        if len(entries) <= 4 * P.LISTING_ENTRIES:
            m.cache.put_listing(where, entries, watched=bool(header.get("w")), since=since)
        return out

    def statfs(self, path: str) -> Dict[str, int]:
        m = self.m
        return m.call("statfs", {"path": m.wire(path)})[0]["sv"]

    def mknod(self, path: str, mode: int, dev: int) -> int:
        m = self.m
        m.check_changes("mknod", {"path": m.wire(path)})
        m.call("mknod", {"path": m.wire(path), "mode": mode, "dev": dev, "ctx": caller()})
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        m = self.m
        args = {"path": m.wire(path), "mode": mode, "ctx": caller()}
        if m.post_made("mkdir", args):  # not waited for (see MountState.post_made)
            return 0
        m.check_changes("mkdir", {"path": m.wire(path)})
        m.call("mkdir", args)
        if m.profile is not None:
            m.profile.made(m.wire(path))
        return 0

    def unlink(self, path: str) -> int:
        m = self.m
        others = m.links.others(path)
        m.change("unlink", {"path": m.wire(path)})
        m.links.forget(path)
        m.links.refresh(others)
        return 0

    def rmdir(self, path: str) -> int:
        m = self.m
        m.change("rmdir", {"path": m.wire(path)})
        if m.profile is not None:
            m.profile.gone(m.wire(path))
        return 0

    def symlink(self, target: str, source: str) -> int:
        m = self.m
        # mfusepy: *target* is the new link's path, *source* its contents.
        args = {"path": m.wire(target), "ctx": caller(),
                "target": P.name_to_wire(source.encode("utf-8", "surrogateescape"))}
        if m.post_made("symlink", args):  # not waited for (see MountState.post_made)
            return 0
        m.check_changes("symlink", {"path": m.wire(target)})
        m.call("symlink", args)
        return 0

    def link(self, target: str, source: str) -> int:
        m = self.m
        m.call("link", {"path": m.wire(target), "target": m.wire(source)})
        m.links.refresh(m.links.others(source) + [source])
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        m = self.m
        args: Dict[str, Any] = {"old": m.wire(old), "new": m.wire(new), "flags": flags}
        if not flags and hidden_name(new):
            args["hide"] = True  # libfuse hiding a file unlinked while open (see the service)
        replaced = m.links.others(new)
        m.change("rename", args)
        if m.profile is not None and not flags & P.RENAME_EXCHANGE:
            m.profile.gone(m.wire(old))
        m.links.forget(new)
        m.links.moved(old, new)  # the file's ctime changed: its other names see it too
        m.links.refresh(replaced)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        m = self.m
        args = {"path": m.wire(path), "mode": mode}
        if not m.post_chmod(args):
            m.call("chmod", args)
        m.links.changed(path)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        m = self.m
        args = {"path": m.wire(path), "uid": _signed(uid), "gid": _signed(gid)}
        if not m.post_chown(args):
            m.call("chown", args)
        m.links.changed(path)
        return 0

    def utimens(self, path: str, times: Optional[Tuple[int, int]] = None) -> int:
        m = self.m
        args = {"path": m.wire(path), "ns": list(times) if times else None}
        if not m.post_utimens(args):
            m.call("utimens", args)
        m.links.changed(path)
        return 0

    # Extended attributes: names travel as text (surrogate-escaped), values as bytes.
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        m = self.m
        if (name == "security.capability" and m.no_capability(path)) or m.bare_of_xattrs(path):
            # Asked before every write (to drop privileges): answered here while the
            # file's ctime (which setting a capability changes) is the one seen without it.
            # And a file the local side said has no attribute at all, while its ctime is that one.
            m.link.answer_here("getxattr")
            raise m.fault(errno.ENODATA)
        header, data = m.call("getxattr", {"path": m.wire(path), "name": name})
        if not header.get("none"):
            return data
        m.learn_bare(path, header.get("bare"))
        if name == "security.capability":
            known = m.cache.get(m.wire(path))
            ctime = known.get("st_ctime") if known is not None else None
            if len(m.no_caps) > 10000:
                m.no_caps.clear()
            m.no_caps[path] = (time.monotonic() + 1.0, ctime)
        raise m.fault(errno.ENODATA)

    def listxattr(self, path: str) -> List[str]:
        m = self.m
        if m.bare_of_xattrs(path):
            m.link.answer_here("listxattr")
            return []
        data = m.call("listxattr", {"path": m.wire(path)})[1]
        return [n.decode("utf-8", "surrogateescape") for n in data.split(b"\0") if n]

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        m = self.m
        m.no_caps.pop(path, None)
        m.bare.pop(m.wire(path), None)
        if name == "security.capability":
            m.capable.add(m.wire(path))
        m.call("setxattr", {"path": m.wire(path), "name": name, "flags": options}, bytes(value))
        return 0

    def removexattr(self, path: str, name: str) -> int:
        m = self.m
        m.bare.pop(m.wire(path), None)
        m.call("removexattr", {"path": m.wire(path), "name": name})
        return 0


def _signed(value: int) -> int:
    """Map an unsigned 32-bit "unchanged" id (0xffffffff) to -1."""
    return -1 if value in (-1, 0xFFFFFFFF) else value
