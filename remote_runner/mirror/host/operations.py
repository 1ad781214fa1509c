"""The FUSE operations: each one a request to the local file service, unless a cache answers.

Why apart: this is the file system the command sees, one operation at a
time: which caches may answer it here, what it sends, what its reply teaches
the caches. What all operations share (the request path, the rules for what a
change drops from the name cache, which changes may go without waiting, the
handle tables) is :class:`~.state.MountState`; the binding's own fixes are
:mod:`.fusebinding`.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import protocol as P
from ..hardlinks import path_invalidator
from .caches import FUSE_CAP_CACHE_SYMLINKS, LOCAL_FH_BASE, FileCache, copy_key, fetch_ahead
from .fusebinding import fuse_class, pin_once
from .link import Link
from .answers import absorb_lookup, split_file, subdirectory_answers
from .kernel import KernelDrops
from . import listcache
from .names import NameCache, parent as parent_of
from .profile import Profile
from .state import MountState
from .writes import grown_file


def make_operations(link: Link, prefix: bytes, files: Optional[FileCache] = None,
                    cache: Optional[NameCache] = None, profile: Optional["Profile"] = None,
                    drops: Optional[KernelDrops] = None):
    """Build the mfusepy Operations object serving the local tree at *prefix*, and its FUSE class."""
    import mfusepy

    m = MountState(link, prefix, files, cache, profile, drops, mfusepy.FuseOSError)

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
            kernel = path_invalidator()

            def invalidate(name: str) -> Any:
                # Another name of a file changed through this one: drop it here and in the kernel.
                m.cache.changed(m.wire(name))
                return kernel(name) if kernel is not None else None

            m.links.invalidate = invalidate
            m.link.kernel_listings.add(listcache.wrap_session_opendir(mfusepy, pin_once))
            if m.drops is not None:
                m.drops.add_target(m.wire("/") if m.prefix else "", kernel)
            self.mounted.set()

        def getattr(self, path: Optional[str], fh: Optional[int] = None) -> Dict[str, int]:
            attrs = self._attributes(path, fh)
            if m.drops is not None:
                m.drops.settle()  # the kernel forgets older answers first (see KernelDrops.settle)
            return attrs

        def _attributes(self, path: Optional[str], fh: Optional[int]) -> Dict[str, int]:
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
                    raise mfusepy.FuseOSError(errno.ENOENT)
                if cached is not None:
                    m.link.answer_here("getattr")
                    if m.cache.kernel_must_look_up(where, int(cached.get("st_mode", 0))):
                        raise mfusepy.FuseOSError(errno.ESTALE)  # (see NameCache.kernel_must_look_up)
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
                    raise mfusepy.FuseOSError(errno.ENOENT)
                if path is not None:
                    m.links.seen(path, got)
                if m.cache.kernel_must_look_up(where, int(got.get("st_mode", 0))):
                    raise mfusepy.FuseOSError(errno.ESTALE)
                return got
            header = m.call("getattr", args)[0]
            m.cache.alias(header.get("st"))
            if path is not None:
                m.links.seen(path, header.get("st"))
            return header["st"]

        def readlink(self, path: str) -> str:
            known = m.cache.link(m.wire(path))  # sent with the lookup (or the directory)
            if known is not None:
                m.link.answer_here("readlink")
                return known
            return m.call("readlink", {"path": m.wire(path)})[1].decode("utf-8", "surrogateescape")

        def opendir(self, path: str) -> int:
            return 0  # (MirrorFUSE.opendir asks the kernel to keep the listing)

        # Registered only where libfuse passes the flags on; older ones get a wrapper (see listcache).
        opendir.libfuse_ignore = not listcache.passes_flags(mfusepy)

        def readdir(self, path: str, fh: int):
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
                m.cache.alias(st)
                text = name.decode("utf-8", "surrogateescape")
                entries.append((text, st if isinstance(st, dict) else None, None))
                m.links.seen(path.rstrip("/") + "/" + text, st)
                out.append((text, st, 0))
            if len(entries) <= 4 * P.LISTING_ENTRIES:
                m.cache.put_listing(where, entries, watched=bool(header.get("w")), since=since)
            return out

        def statfs(self, path: str) -> Dict[str, int]:
            return m.call("statfs", {"path": m.wire(path)})[0]["sv"]

        def mknod(self, path: str, mode: int, dev: int) -> int:
            m.check_changes("mknod", {"path": m.wire(path)})
            m.call("mknod", {"path": m.wire(path), "mode": mode, "dev": dev, "ctx": caller()})
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            args = {"path": m.wire(path), "mode": mode, "ctx": caller()}
            if m.post_made("mkdir", args):  # not waited for (see MountState.post_made)
                return 0
            m.check_changes("mkdir", {"path": m.wire(path)})
            m.call("mkdir", args)
            if m.profile is not None:
                m.profile.made(m.wire(path))
            return 0

        def unlink(self, path: str) -> int:
            others = m.links.others(path)
            m.change("unlink", {"path": m.wire(path)})
            m.links.forget(path)
            m.links.refresh(others)
            return 0

        def rmdir(self, path: str) -> int:
            m.change("rmdir", {"path": m.wire(path)})
            if m.profile is not None:
                m.profile.gone(m.wire(path))
            return 0

        def symlink(self, target: str, source: str) -> int:
            # mfusepy: *target* is the new link's path, *source* its contents.
            args = {"path": m.wire(target), "ctx": caller(),
                    "target": P.name_to_wire(source.encode("utf-8", "surrogateescape"))}
            if m.post_made("symlink", args):  # not waited for (see MountState.post_made)
                return 0
            m.check_changes("symlink", {"path": m.wire(target)})
            m.call("symlink", args)
            return 0

        def link(self, target: str, source: str) -> int:
            m.call("link", {"path": m.wire(target), "target": m.wire(source)})
            m.links.refresh(m.links.others(source) + [source])
            return 0

        def rename(self, old: str, new: str, flags: int = 0) -> int:
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
            args = {"path": m.wire(path), "mode": mode}
            if not m.post_chmod(args):
                m.call("chmod", args)
            m.links.changed(path)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            args = {"path": m.wire(path), "uid": _signed(uid), "gid": _signed(gid)}
            if not m.post_chown(args):
                m.call("chown", args)
            m.links.changed(path)
            return 0

        def truncate(self, path: str, length: int, fh: Optional[int] = None) -> int:
            if fh:
                m.flushed.pop(fh, None)
            args: Dict[str, Any] = {"size": length}
            if fh and fh < LOCAL_FH_BASE:
                args["fh"] = fh
                m.drain(fh)
            args["path"] = m.wire(path) if path is not None or not fh else "/"
            m.call("truncate", args)
            m.links.changed(path)
            return 0

        def utimens(self, path: str, times: Optional[Tuple[int, int]] = None) -> int:
            args = {"path": m.wire(path), "ns": list(times) if times else None}
            if not m.post_utimens(args):
                m.call("utimens", args)
            m.links.changed(path)
            return 0

        def open(self, path: str, flags: int) -> int:
            if flags & (os.O_ACCMODE | os.O_TRUNC | os.O_CREAT) == os.O_RDONLY and m.written_files:
                fh = m.post_reading(m.wire(path), flags)
                if fh is not None:  # not waited for (see MountState.post_reading)
                    return fh
            if m.files is not None and flags & (os.O_ACCMODE | os.O_TRUNC | os.O_CREAT) == os.O_RDONLY:
                return m.open_whole(m.wire(path), flags)
            name = m.wire(path)
            fh = m.post_emptying(name, flags)
            if fh is not None:  # not waited for (see MountState.post_emptying)
                return fh
            header = m.call("open", {"path": name, "flags": flags})[0]
            fh = int(header["fh"])
            st = header.get("st")
            if flags & os.O_TRUNC and isinstance(st, dict) and st.get("st_size") == 0:
                # emptied: like a file just made (its size and times follow its writes)
                if stat.S_ISREG(st.get("st_mode", 0)):
                    # and, truncated, it lost any capability (the kernel drops it on truncate):
                    # the first write's check for one is answered here, as for a new file
                    m.no_caps[path] = (0.0, st.get("st_ctime"))
                since = m.cache.begin()
                if m.cache.put(name, st, watched=m.cache.kept(name), since=since):
                    m.created[fh] = st.get("st_ino")
                    m.track_written(name, fh)
            if flags & os.O_DSYNC:
                m.sync_handles[fh] = None
            return fh

        def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
            fh = None if hidden_name(path) else m.post_create(m.wire(path), mode, flags, caller())
            if fh is not None:  # not waited for (see MountState.post_create)
                m.no_caps[path] = (0.0, (m.cache.get(m.wire(path)) or {}).get("st_ctime"))
                m.remember_new_file(m.wire(path))
                return fh
            m.check_changes("create", {"path": m.wire(path)})
            header = m.call("create", {"path": m.wire(path), "mode": mode, "flags": flags, "ctx": caller()})[0]
            fh = int(header["fh"])
            if isinstance(header.get("st"), dict):
                m.created[fh] = header["st"].get("st_ino")
                if header["st"].get("st_size") == 0:
                    m.track_written(m.wire(path), fh)
                    # a new (or emptied) file has no capability until one is set, which changes its ctime
                    m.no_caps[path] = (0.0, header["st"].get("st_ctime"))
                    m.remember_new_file(m.wire(path))
            if flags & os.O_DSYNC:
                m.sync_handles[fh] = None
            return fh

        def read_buf(self, *args: Any) -> int:  # registers the callback; MirrorFUSE.read_buf answers it
            raise NotImplementedError

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            if fh >= LOCAL_FH_BASE:
                m.link.answer_here("read")
                return os.pread(m.local_fd(fh), size, offset)
            if m.written_files and path is not None:
                known = m.written_files.read(m.wire(path), offset, size, m.cache.changed_since)
                if known is not None:
                    m.link.answer_here("read")
                    return known
            m.drain(fh)  # reading back what was just written
            return m.read_through(path, fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            data = bytes(data)
            m.flushed.pop(fh, None)
            if path is not None:
                name = m.wire(path)
                m.written_files.wrote(name, fh, offset, data)
                since = m.cache.begin()
                known = m.cache.get(name) if fh in m.created else None
                guess = grown_file(known, offset, len(data), time.time_ns())
                if guess is None or guess.get("st_ino") != m.created.get(fh) or not m.cache.put(
                        name, guess, watched=m.cache.kept(name), since=since):
                    m.cache.changed(name)
                else:
                    m.guesses.supersede(name)  # a chmod's reply, taken before this write, is older
                    if known is not None and m.no_caps.get(path, (0.0, None))[1] == known.get("st_ctime"):
                        m.no_caps[path] = (m.no_caps[path][0], guess["st_ctime"])  # still none: writes only drop them
                with m.writing_lock:
                    if m.written.get(fh) != name:
                        m.writing.get(m.written.get(fh, ""), {}).pop(fh, None)
                        m.writing.setdefault(name, {})[fh] = None
                        m.written[fh] = name
            if fh in m.sync_handles:
                done = int(m.call("write", {"fh": fh, "off": offset}, data)[0]["n"])
            else:
                # Sent without waiting (see writes.py): an error comes back at close or fsync.
                done = m.writes.write(fh, offset, data)
                m.link.count_posted("write")
            m.links.changed(path)
            return done

        def flush(self, path: str, fh: int) -> int:
            if fh >= LOCAL_FH_BASE or fh in m.reading:
                # A read-only handle has nothing to write back and no error to report.
                m.link.answer_here("flush")
                return 0
            if m.writes.pending(fh):
                # close: the flush goes after the handle's writes; one wait for all of them.
                # Its reply brings the file's attributes, which replace what was guessed.
                since = m.cache.begin()
                name = m.wire(path) if path is not None else None
                args = {"fh": fh, "seq": m.writes.next_seq(fh), "st": 1}
                m.after_changes(args)  # its attributes then follow a chmod sent before it, too
                slot = m.link.submit("flush", args)
                header: Dict[str, Any] = {}
                try:
                    m.writes.settle(fh)
                    header = m.link.wait(slot)[0]
                except OSError as exc:
                    if name is not None:
                        m.written_files.drop(name)  # what failed to be written is not there
                    raise mfusepy.FuseOSError(exc.errno or errno.EIO)
                finally:
                    if name is not None:
                        st = header.get("st")
                        # (kept until told only if the host also holds the name's directory so)
                        if isinstance(st, dict) and m.cache.put(
                                name, st, watched=bool(header.get("w")) and m.cache.kept(name), since=since):
                            m.flushed[fh] = None
                            m.guesses.supersede(name)
                        else:
                            m.cache.changed(name)
                        if fh in m.created and m.drops is not None:
                            m.drops.drop([name], wait=False)  # the kernel's copy of a guess, too
                return 0
            # Nothing sent and not waited for: the local close would report nothing
            # (the local file system keeps no error for a handle without writes).
            m.link.answer_here("flush")
            return 0

        def release(self, path: str, fh: int) -> int:
            if fh >= LOCAL_FH_BASE:
                m.files.release(fh)
                m.link.answer_here("release")
                return 0
            if fh in m.reading:
                # Closing a read-only handle changes nothing the program could see:
                # the local side closes it while the program goes on (after its open).
                m.reading.pop(fh, None)
                m.link.answer_here("release")
                if P.posted_handle(fh):  # opened without waiting (MountState.post_reading)
                    m.link.post("release", {"fh": fh, "seq": m.writes.next_seq(fh)})
                    m.writes.forget(fh)
                else:
                    m.link.post("release", {"fh": fh})
                return 0
            # A handle written through: nothing left to report (close did), so not
            # waited for either; numbered, so it comes after the handle's writes.
            m.sync_handles.pop(fh, None)
            m.created.pop(fh, None)
            clean = fh in m.flushed  # unwritten since its close brought the attributes: they stand
            m.flushed.pop(fh, None)
            m.link.post("release", {"fh": fh, "seq": m.writes.next_seq(fh)})
            m.writes.forget(fh)
            m.forget_handle(fh)
            m.stop_writing(fh)
            if path is not None and not clean:
                m.cache.changed(m.wire(path))
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            if fh >= LOCAL_FH_BASE:
                return 0
            try:
                m.writes.settle(fh)
            except OSError as exc:
                raise mfusepy.FuseOSError(exc.errno or errno.EIO)
            m.call("fsync", {"fh": fh, "data": bool(datasync)})
            return 0

        def fallocate(self, path: Optional[str], mode: int, offset: int, size: int, fh: int) -> int:
            if fh >= LOCAL_FH_BASE:
                raise mfusepy.FuseOSError(errno.EBADF)
            m.drain(fh)
            m.flushed.pop(fh, None)
            if path is not None:
                m.written_files.drop(m.wire(path))
            m.call("fallocate", {"fh": fh, "mode": mode, "off": offset, "len": size})
            m.links.changed(path)
            return 0

        # Extended attributes: names travel as text (surrogate-escaped), values as bytes.
        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            if (name == "security.capability" and m.no_capability(path)) or m.bare_of_xattrs(path):
                # Asked before every write (to drop privileges): answered here while the
                # file's ctime (which setting a capability changes) is the one seen without it.
                # And a file the local side said has no attribute at all, while its ctime is that one.
                m.link.answer_here("getxattr")
                raise mfusepy.FuseOSError(errno.ENODATA)
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
            raise mfusepy.FuseOSError(errno.ENODATA)

        def listxattr(self, path: str) -> List[str]:
            if m.bare_of_xattrs(path):
                m.link.answer_here("listxattr")
                return []
            data = m.call("listxattr", {"path": m.wire(path)})[1]
            return [n.decode("utf-8", "surrogateescape") for n in data.split(b"\0") if n]

        def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
            m.no_caps.pop(path, None)
            m.bare.pop(m.wire(path), None)
            if name == "security.capability":
                m.capable.add(m.wire(path))
            m.call("setxattr", {"path": m.wire(path), "name": name, "flags": options}, bytes(value))
            return 0

        def removexattr(self, path: str, name: str) -> int:
            m.bare.pop(m.wire(path), None)
            m.call("removexattr", {"path": m.wire(path), "name": name})
            return 0

    return MirrorOperations(), fuse_class(mfusepy, m)


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
