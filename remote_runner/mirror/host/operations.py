"""The FUSE operations: each one a request to the local file service, unless a cache answers.

Why apart: this is the file system the command sees. The rules that keep it
correct (what each change drops from the name cache, which handles are local
copies, which writes may go without waiting, libfuse 3's renameat2 flags and
ftruncate handle passed on) are here, and nothing else.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import protocol as P
from ..hardlinks import LinkNames, path_invalidator
from .caches import LOCAL_FH_BASE, FileCache, fetch_ahead, fetch_rest
from .link import Link
from .names import KernelDrops, NameCache, absorb_lookup, parent as parent_of
from .writes import (DirectoryGuesses, PendingChanges, PendingWrites, WrittenFiles, grown_file,
                     predicted_directory)
from .profile import Profile

FUSE_CAP_CACHE_SYMLINKS = 1 << 23


#: Operations changing names in a directory: once one succeeds there, the exports let the host change it.
ENTRY_OPS = frozenset(("mknod", "mkdir", "symlink", "link", "create", "unlink", "rmdir", "rename"))

#: Operations whose reply tells the host the state of the name they made or removed.
LEARNED_OPS = frozenset(("mkdir", "symlink", "mknod", "link", "create", "unlink", "rmdir",
                         "chmod", "chown", "utimens", "truncate"))

MUTATING_OPS = frozenset(("mknod", "mkdir", "unlink", "rmdir", "symlink", "link", "rename", "chmod",
                          "chown", "truncate", "utimens", "create", "write", "open", "release", "flush",
                          "fsync", "fallocate", "setxattr", "removexattr"))


def make_operations(link: Link, prefix: bytes, files: Optional[FileCache] = None,
                    cache: Optional[NameCache] = None, profile: Optional["Profile"] = None,
                    drops: Optional[KernelDrops] = None):
    """Build the mfusepy Operations object serving the local tree at *prefix*."""
    import mfusepy

    cache = cache if cache is not None else NameCache()
    writes = PendingWrites(link.submit, link.wait)
    changes = PendingChanges(link.submit, link.wait)
    sync_handles: Dict[int, None] = {}  # opened O_SYNC/O_DSYNC: every write waits
    created: Dict[int, Any] = {}  # handles of files this host created -> the file's inode
    flushed: Dict[int, None] = {}  # handles whose close brought the file's attributes, unwritten since
    written_files = WrittenFiles()  # files the host created or emptied: reads answered here
    guesses = DirectoryGuesses()  # directories whose attributes are guessed after unlink, rmdir

    def wire(path: str) -> str:
        if path is None:  # an operation on an open file whose name libfuse no longer knows
            raise mfusepy.FuseOSError(errno.ESTALE)
        raw = path.encode("utf-8", "surrogateescape")
        full = (prefix.rstrip(b"/") + raw.rstrip(b"/")) if prefix else raw
        return P.name_to_wire(full or b"/")

    reading: Dict[int, None] = {}  # local handles opened read-only: closing them changes nothing
    links = LinkNames()
    no_caps: Dict[str, Tuple[float, Any]] = {}  # paths without security.capability: until when, at which ctime

    def no_capability(path: str) -> bool:
        until, ctime = no_caps.get(path, (0.0, None))
        if until > time.monotonic():
            return True
        if ctime is None:
            return False
        known = cache.get(wire(path))  # kept until this file's attributes change
        return known is not None and known.get("st_ctime") == ctime

    def mutates(op: str, args: Dict[str, Any]) -> bool:
        if op == "open":
            return args.get("flags", 0) & (os.O_ACCMODE | os.O_TRUNC) != os.O_RDONLY
        if op in ("flush", "release"):
            return args.get("fh") not in reading
        return op in MUTATING_OPS

    def forget_changed(op: str, args: Dict[str, Any]) -> None:
        """Drop from the name cache exactly what *op* changed (never all of it)."""
        if op in ("unlink", "rename", "link", "truncate"):
            written_files.drop(*[args[k] for k in ("path", "old", "new", "target") if isinstance(args.get(k), str)])
        if op in ("mknod", "mkdir", "symlink", "create", "unlink", "rmdir"):
            cache.renamed(args["path"])
        elif op == "rename":
            cache.renamed(args["old"], args["new"])
        elif op == "link":
            cache.renamed(args["path"])
            cache.changed(args["target"])
        elif op in ("chmod", "chown", "truncate", "utimens", "setxattr", "removexattr") and "path" in args:
            cache.changed(args["path"])
        elif op == "open" and args.get("flags", 0) & os.O_TRUNC:
            cache.changed(args["path"])

    writing: Dict[str, Dict[int, None]] = {}  # name -> handles that wrote to it (pipelined)
    written: Dict[int, str] = {}
    writing_lock = threading.Lock()

    def settle_names(args: Dict[str, Any]) -> None:
        """Before a request naming a file, let the writes sent to it land (its size, its data)."""
        if not writing:
            return
        with writing_lock:
            handles = [fh for key in ("path", "old", "new", "target") if isinstance(args.get(key), str)
                       for fh in writing.get(args[key], ())]
        for fh in handles:
            drain(fh)

    def call(op: str, args: Dict[str, Any], payload: bytes = b"") -> Tuple[Dict[str, Any], bytes]:
        settle_names(args)
        after = changes.after()
        if after is not None:
            args["after"] = after
        since = cache.begin()
        try:
            header, data = link.call(op, args, payload)
        except OSError as exc:
            raise mfusepy.FuseOSError(exc.errno or errno.EIO)
        finally:
            if mutates(op, args):
                forget_changed(op, args)
        if op in ENTRY_OPS:
            changes.confirm(*changed_dirs(op, args))
        if op == "open" and "fh" in header and not mutates(op, args):
            reading[header["fh"]] = None
        elif op == "release":
            reading.pop(args.get("fh"), None)
        elif "w" in header and op in LEARNED_OPS:
            learn(op, args, header)
        for item in header.get("push") or ():
            try:
                cache.put(item[0], item[1], watched=bool(item[2]) if len(item) > 2 else False, since=since)
            except (IndexError, TypeError, AttributeError):
                continue
        return header, data

    def learn(op: str, args: Dict[str, Any], header: Dict[str, Any], since: Optional[int] = None) -> None:
        """Keep what the reply to the host's own change says of the name it made or removed.

        The local side sent it after the change (and did not echo the change
        back, see watcher.own); every ``inval`` sent before the reply has
        been applied by the time the reply is read, so the answer is current.
        *since*: for a reply taken later than it was read, a token from before the
        change was sent (an ``inval`` read meanwhile wins).
        """
        watched = bool(header.get("w"))
        since = cache.begin() if since is None else since
        if op in ("unlink", "rmdir"):
            cache.put(args["path"], None, watched=watched, since=since)
        elif isinstance(header.get("st"), dict):
            cache.put(args["path"], header["st"], watched=watched, since=since)
            if op == "mkdir" and header.get("empty"):
                cache.put_listing(args["path"], [], watched=True, since=since)
        if isinstance(header.get("dst"), dict):
            cache.put(parent_of(args["path"]), header["dst"], watched=watched, since=since)

    def changed_dirs(op: str, args: Dict[str, Any]) -> List[str]:
        if op == "rename":
            return list(dict.fromkeys((parent_of(args["old"]), parent_of(args["new"]))))
        return [parent_of(args["path"])]

    def check_changes(op: str, args: Dict[str, Any], wait: bool = True) -> None:
        """Raise the error of an earlier change sent without waiting in the same directory."""
        try:
            changes.check(*changed_dirs(op, args), wait=wait)
        except OSError as exc:
            raise mfusepy.FuseOSError(exc.errno or errno.EIO)

    def outcome_known(op: str, args: Dict[str, Any]) -> bool:
        """Whether the host knows what the local side will answer (the kernel checked the rest).

        rmdir: the directory is known empty (its whole listing is held).
        rename: the new name is known missing, a non-directory, or an empty
        directory (the kernel refuses a directory over a file and the reverse).
        """
        if op == "unlink":
            return True
        if op == "rmdir":
            return cache.names(args["path"]) == []
        if args.get("flags") or args.get("hide"):
            return False
        target = cache.get(args["new"])
        if target is None:
            return False
        return (bool(target.get("missing")) or not stat.S_ISDIR(int(target.get("st_mode", 0)))
                or cache.names(args["new"]) == [])

    def change(op: str, args: Dict[str, Any]) -> None:
        """An unlink, rmdir or rename: sent without waiting where its outcome is known here."""
        dirs = changed_dirs(op, args)
        if not changes.may_post(*dirs) or not outcome_known(op, args):
            check_changes(op, args)
            call(op, args)
            return
        check_changes(op, args, wait=False)
        settle_names(args)  # a file's own writes land before it is renamed or removed
        gone = args["old"] if op == "rename" else args["path"]
        kept = cache.kept(gone)
        # unlink, rmdir: the directory's attributes are guessed until the reply brings them
        # (a rename's reply does not: its directories are asked for again).
        folder = dirs[0]
        before = cache.get(folder) if op != "rename" else None
        guess = predicted_directory(before, op, time.time_ns())
        folder_kept = guess is not None and cache.kept(folder)
        forget_changed(op, args)
        if op == "rmdir" or op == "rename":
            changes.forget(gone)
        done = None
        if guess is not None:
            token, since = guesses.begin(folder), cache.begin()
            cache.put(folder, guess, watched=folder_kept, since=since)
            done = lambda header: learned(folder, token, since, op, args, header)  # noqa: E731
        try:
            changes.post(op, args, dirs, undo=lambda: forget_changed(op, args), done=done)
            link.count_posted(op)
        except OSError as exc:
            forget_changed(op, args)  # (the guess too)
            raise mfusepy.FuseOSError(exc.errno or errno.EIO)
        # What the change makes of the name, as the local side will find it.
        cache.put(gone, None, watched=kept, since=cache.begin())

    def learned(folder: str, token: int, since: int, op: str, args: Dict[str, Any],
                header: Dict[str, Any]) -> None:
        """The reply to a change sent without waiting: its directory's real attributes replace the
        guess, unless a later change there made a newer one (its own reply will)."""
        if guesses.end(folder, token):
            learn(op, args, header, since)
            if drops is not None:
                drops.drop([folder], wait=False)  # the kernel's copy of the guess, too

    def drain(fh: Optional[int]) -> None:
        """Wait for the handle's pipelined writes (a read-back or size change needs them)."""
        if fh is not None and fh < LOCAL_FH_BASE and writes.pending(fh):
            writes.drain(fh)

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
        known = cache.get(path)
        if have is not None and known is not None and not known.get("missing") and [
                known.get("st_size"), known.get("st_mtime"), known.get("st_ino"), known.get("st_ctime")] == have:
            # What the host holds of the name (watched, or within its lease) matches our copy.
            fd = files.open_copy(path, have)
            if fd is not None:
                link.answer_here("open")
                files.opened(path)
                return files.add_handle(fd, known)
        while True:
            since = cache.begin()
            header, first = call("open", {"path": path, "flags": flags, "whole": True, "have": have})
            if isinstance(header.get("libs"), dict):  # a program: its libraries (or siblings) come next
                fetch_ahead(link, files, cache, header["libs"], since)
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
        cache.put(path, header["st"], watched=bool(header.get("w")), since=since)
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

    def track_written(name: str, fh: int) -> None:
        """*fh* opened *name* empty: keep what it writes to answer reads (see WrittenFiles)."""
        if cache.kept(name):  # a change made by this machine will be reported (watched)
            written_files.start(name, fh, cache.begin())

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
                cache.changed(wire(name))
                return kernel(name) if kernel is not None else None

            links.invalidate = invalidate
            if drops is not None:
                drops.add_target(wire("/") if prefix else "", kernel)
            self.mounted.set()

        def getattr(self, path: Optional[str], fh: Optional[int] = None) -> Dict[str, int]:
            attrs = self._attributes(path, fh)
            if drops is not None:
                drops.settle()  # the kernel forgets older answers first (see KernelDrops.settle)
            return attrs

        def _attributes(self, path: Optional[str], fh: Optional[int]) -> Dict[str, int]:
            if guesses and changes.pending:
                changes.collect()  # replies arrived: real attributes for guessed directories
            args: Dict[str, Any] = {"path": wire(path)} if path is not None or not fh else {}
            if fh is not None and fh >= LOCAL_FH_BASE and files is not None:
                entry = files.handles.get(fh)
                if entry is not None:
                    link.answer_here("getattr")
                    return entry[1]
            if fh is not None and fh:
                args["fh"] = fh
                made = created.get(fh)
                if made is not None and path is not None:
                    # A file this host created: while its name still stands for it (same
                    # inode) its size and times follow from its own writes (see write),
                    # with no need to wait for them.
                    known = cache.get(args["path"])
                    if known is not None and not known.get("missing") and known.get("st_ino") == made:
                        link.answer_here("getattr")
                        return known
                drain(fh)
            if "fh" not in args and not hidden_name(args["path"]):
                # (a file libfuse hid, unlinked while open, is held by the local side, not listed)
                where = args["path"]
                if profile is not None:
                    profile.record(where)
                cached = cache.get(where)
                if cached is not None and cached.get("missing"):
                    link.answer_here("getattr")
                    raise mfusepy.FuseOSError(errno.ENOENT)
                if cached is not None:
                    link.answer_here("getattr")
                    if cache.kernel_must_look_up(where, int(cached.get("st_mode", 0))):
                        raise mfusepy.FuseOSError(errno.ESTALE)  # (see NameCache.kernel_must_look_up)
                    if path is not None:
                        links.seen(path, cached)  # a name learned from a reply (a link just made)
                    return cached
                since = cache.begin()
                # A first lookup in a directory brings the whole directory (see names.py).
                args["dir"] = 1 if where != "/" and cache.wants_listing(parent_of(where)) else 0
                header, data = call("getattr", args)
                got = absorb_lookup(cache, where, header, data, since)
                if got.get("missing"):
                    raise mfusepy.FuseOSError(errno.ENOENT)
                if path is not None:
                    links.seen(path, got)
                if cache.kernel_must_look_up(where, int(got.get("st_mode", 0))):
                    raise mfusepy.FuseOSError(errno.ESTALE)
                return got
            header = call("getattr", args)[0]
            if path is not None:
                links.seen(path, header.get("st"))
            return header["st"]

        def readlink(self, path: str) -> str:
            known = cache.link(wire(path))  # sent with the lookup (or the directory)
            if known is not None:
                link.answer_here("readlink")
                return known
            return call("readlink", {"path": wire(path)})[1].decode("utf-8", "surrogateescape")

        def readdir(self, path: str, fh: int):
            where = wire(path)
            if profile is not None:
                profile.record_dir(where)
            out: List[Any] = [(".", None, 0), ("..", None, 0)]
            held = cache.names(where)  # a whole listing, still standing (watched)
            if held is not None:
                return out + [(name, st, 0) for name, st in held]
            since = cache.begin()
            header, payload = call("readdir", {"path": where})
            names = payload.split(b"\0") if payload else []
            attrs = header.get("attrs") or [None] * len(names)
            entries = []
            for name, st in zip(names, attrs):
                text = name.decode("utf-8", "surrogateescape")
                entries.append((text, st if isinstance(st, dict) else None, None))
                links.seen(path.rstrip("/") + "/" + text, st)
                out.append((text, st, 0))
            if len(entries) <= 4 * P.LISTING_ENTRIES:
                cache.put_listing(where, entries, watched=bool(header.get("w")), since=since)
            return out

        def statfs(self, path: str) -> Dict[str, int]:
            return call("statfs", {"path": wire(path)})[0]["sv"]

        def mknod(self, path: str, mode: int, dev: int) -> int:
            check_changes("mknod", {"path": wire(path)})
            call("mknod", {"path": wire(path), "mode": mode, "dev": dev, "ctx": caller()})
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            check_changes("mkdir", {"path": wire(path)})
            call("mkdir", {"path": wire(path), "mode": mode, "ctx": caller()})
            if profile is not None:
                profile.made(wire(path))
            return 0

        def unlink(self, path: str) -> int:
            others = links.others(path)
            change("unlink", {"path": wire(path)})
            links.forget(path)
            links.refresh(others)
            return 0

        def rmdir(self, path: str) -> int:
            change("rmdir", {"path": wire(path)})
            return 0

        def symlink(self, target: str, source: str) -> int:
            check_changes("symlink", {"path": wire(target)})
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
            change("rename", args)
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
            if fh:
                flushed.pop(fh, None)
            args: Dict[str, Any] = {"size": length}
            if fh and fh < LOCAL_FH_BASE:
                args["fh"] = fh
                drain(fh)
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
            name = wire(path)
            header = call("open", {"path": name, "flags": flags})[0]
            fh = int(header["fh"])
            st = header.get("st")
            if flags & os.O_TRUNC and isinstance(st, dict) and st.get("st_size") == 0:
                # emptied: like a file just made (its size and times follow its writes)
                since = cache.begin()
                if cache.put(name, st, watched=cache.kept(name), since=since):
                    created[fh] = st.get("st_ino")
                    track_written(name, fh)
            if flags & os.O_DSYNC:
                sync_handles[fh] = None
            return fh

        def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
            check_changes("create", {"path": wire(path)})
            header = call("create", {"path": wire(path), "mode": mode, "flags": flags, "ctx": caller()})[0]
            fh = int(header["fh"])
            if isinstance(header.get("st"), dict):
                created[fh] = header["st"].get("st_ino")
                if header["st"].get("st_size") == 0:
                    track_written(wire(path), fh)
                    # a new (or emptied) file has no capability until one is set, which changes its ctime
                    no_caps[path] = (0.0, header["st"].get("st_ctime"))
            if flags & os.O_DSYNC:
                sync_handles[fh] = None
            return fh

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            if fh >= LOCAL_FH_BASE:
                link.answer_here("read")
                return os.pread(local_fd(fh), size, offset)
            if written_files and path is not None:
                known = written_files.read(wire(path), offset, size, cache.changed_since)
                if known is not None:
                    link.answer_here("read")
                    return known
            drain(fh)  # reading back what was just written
            return call("read", {"fh": fh, "size": size, "off": offset})[1]

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            data = bytes(data)
            flushed.pop(fh, None)
            if path is not None:
                name = wire(path)
                written_files.wrote(name, fh, offset, data)
                since = cache.begin()
                known = cache.get(name) if fh in created else None
                guess = grown_file(known, offset, len(data), time.time_ns())
                if guess is None or guess.get("st_ino") != created.get(fh) or not cache.put(
                        name, guess, watched=cache.kept(name), since=since):
                    cache.changed(name)
                elif known is not None and no_caps.get(path, (0.0, None))[1] == known.get("st_ctime"):
                    no_caps[path] = (no_caps[path][0], guess["st_ctime"])  # still none: writes only drop them
                with writing_lock:
                    if written.get(fh) != name:
                        writing.get(written.get(fh, ""), {}).pop(fh, None)
                        writing.setdefault(name, {})[fh] = None
                        written[fh] = name
            if fh in sync_handles:
                done = int(call("write", {"fh": fh, "off": offset}, data)[0]["n"])
            else:
                # Sent without waiting (see writes.py): an error comes back at close or fsync.
                done = writes.write(fh, offset, data)
                link.count_posted("write")
            links.changed(path)
            return done

        def flush(self, path: str, fh: int) -> int:
            if fh >= LOCAL_FH_BASE or fh in reading:
                # A read-only handle has nothing to write back and no error to report.
                link.answer_here("flush")
                return 0
            if writes.pending(fh):
                # close: the flush goes after the handle's writes; one wait for all of them.
                # Its reply brings the file's attributes, which replace what was guessed.
                since = cache.begin()
                name = wire(path) if path is not None else None
                slot = link.submit("flush", {"fh": fh, "seq": writes.next_seq(fh), "st": 1})
                header: Dict[str, Any] = {}
                try:
                    writes.settle(fh)
                    header = link.wait(slot)[0]
                except OSError as exc:
                    if name is not None:
                        written_files.drop(name)  # what failed to be written is not there
                    raise mfusepy.FuseOSError(exc.errno or errno.EIO)
                finally:
                    if name is not None:
                        st = header.get("st")
                        # (kept until told only if the host also holds the name's directory so)
                        if isinstance(st, dict) and cache.put(
                                name, st, watched=bool(header.get("w")) and cache.kept(name), since=since):
                            flushed[fh] = None
                        else:
                            cache.changed(name)
                        if fh in created and drops is not None:
                            drops.drop([name], wait=False)  # the kernel's copy of a guess, too
                return 0
            # Nothing sent and not waited for: the local close would report nothing
            # (the local file system keeps no error for a handle without writes).
            link.answer_here("flush")
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
            # A handle written through: nothing left to report (close did), so not
            # waited for either; numbered, so it comes after the handle's writes.
            sync_handles.pop(fh, None)
            created.pop(fh, None)
            clean = fh in flushed  # unwritten since its close brought the attributes: they stand
            flushed.pop(fh, None)
            link.post("release", {"fh": fh, "seq": writes.next_seq(fh)})
            writes.forget(fh)
            with writing_lock:
                name = written.pop(fh, None)
                if name is not None:
                    handles = writing.get(name, {})
                    handles.pop(fh, None)
                    if not handles:
                        writing.pop(name, None)
            if path is not None and not clean:
                cache.changed(wire(path))
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            if fh >= LOCAL_FH_BASE:
                return 0
            try:
                writes.settle(fh)
            except OSError as exc:
                raise mfusepy.FuseOSError(exc.errno or errno.EIO)
            call("fsync", {"fh": fh, "data": bool(datasync)})
            return 0

        def fallocate(self, path: Optional[str], mode: int, offset: int, size: int, fh: int) -> int:
            if fh >= LOCAL_FH_BASE:
                raise mfusepy.FuseOSError(errno.EBADF)
            drain(fh)
            flushed.pop(fh, None)
            if path is not None:
                written_files.drop(wire(path))
            call("fallocate", {"fh": fh, "mode": mode, "off": offset, "len": size})
            links.changed(path)
            return 0

        # Extended attributes: names travel as text (surrogate-escaped), values as bytes.
        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            if name == "security.capability" and no_capability(path):
                # Asked before every write (to drop privileges): answered here while the
                # file's ctime (which setting a capability changes) is the one seen without it.
                link.answer_here("getxattr")
                raise mfusepy.FuseOSError(errno.ENODATA)
            try:
                return call("getxattr", {"path": wire(path), "name": name})[1]
            except mfusepy.FuseOSError as exc:
                if name == "security.capability" and exc.errno == errno.ENODATA:
                    known = cache.get(wire(path))
                    ctime = known.get("st_ctime") if known is not None else None
                    if len(no_caps) > 10000:
                        no_caps.clear()
                    no_caps[path] = (time.monotonic() + 1.0, ctime)
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

    page_versions: Dict[bytes, Tuple[Any, ...]] = {}  # name -> version of the copy its kernel pages hold

    class MirrorFUSE(mfusepy.FUSE):
        """mfusepy drops renameat2 flags and ftruncate's handle; pass them on.

        Each callback's thread keeps its Python thread state (:func:`pin_thread_state`).

        And a read-only handle asks the kernel for no ``flush`` at its close
        (``noflush``, libfuse >= 3.11, kernel >= 5.16; ignored before): it has
        nothing to write back and no error to report, and each flush is a
        request through this process (214 of them for one ``ffmpeg -version``).

        An open through the host's copy of a file keeps the kernel's pages of
        the name (``keep_cache``) when the name's last open was through a copy
        of the same version (size, mtime, inode, ctime): every process of a
        build or a test run maps the same libraries, and without it each open
        dropped their pages and read them again through this process (a
        second ``ffmpeg -version`` in one session: 972 reads again). Any other
        open of the name, or a copy of another version, lets the kernel drop
        them as before; a change here drops them anyway (invalidation).
        """

        def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
            if not getattr(_pinned, "done", False):
                pin_thread_state()
            return super()._wrapper(func, *args, **kwargs)

        def fgetattr(self, path: Optional[bytes], buf: Any, fip: Any) -> int:
            # mfusepy zeroes the kernel's buffer with ctypes.memset, a foreign call that
            # lets go of the GIL mid-callback; with ten workers answering, taking it back
            # was a quarter of a warm getattr. A zeroed struct made here and copied in
            # (item assignment, a plain memcpy) keeps the GIL.
            fh = fip.contents.fh if fip else None
            attrs = self.operations.getattr(None if path is None else path.decode(self.encoding, self.errors), fh)
            st = mfusepy.c_stat()
            mfusepy.set_st_attrs(st, attrs, use_ns=self.use_ns)
            buf[0] = st
            return 0

        def _readdir(self, path: Optional[bytes], buf: Any, filler: Any, offset: int, fip: Any) -> int:
            # The same for libfuse's filler, called once per entry: it only copies the
            # entry into libfuse's buffer, so it is called without letting go of the GIL.
            return super()._readdir(path, buf, keeping_the_gil(filler), offset, fip)

        def open(self, path: bytes, fip: Any) -> int:
            result = super().open(path, fip)
            info = fip.contents
            copy = files.handles.get(info.fh) if files is not None and info.fh >= LOCAL_FH_BASE else None
            if hasattr(info, "noflush") and (copy is not None or info.fh in reading):
                info.noflush = 1
            if copy is None:
                page_versions.pop(path, None)
                return result
            st = copy[1]
            version = (st.get("st_size"), st.get("st_mtime"), st.get("st_ino"), st.get("st_ctime"))
            if page_versions.get(path) == version:
                info.keep_cache = 1
            page_versions[path] = version
            return result

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return self.operations.rename(old.decode(self.encoding, self.errors),
                                          new.decode(self.encoding, self.errors), flags)

        def truncate_fuse_3(self, path: Optional[bytes], length: int, fip: Any) -> int:
            fh = fip.contents.fh if fip else None
            return self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors),
                                            length, fh)

    return MirrorOperations(), MirrorFUSE


_pinned = threading.local()


def pin_thread_state() -> None:
    """Keep the calling libfuse worker thread's Python thread state until the thread ends.

    Every operation is a ctypes callback on a thread libfuse started. Such a
    thread has no Python thread state of its own, so each callback made one
    and threw it away at its end (``PyGILState_Ensure`` / ``Release`` with the
    count back at zero): that, not the operation, was most of a request's
    cost in a trivial file system. One more ``Ensure``, never released, keeps
    the count above zero and the state alive for every later callback on the
    thread. Measured on this machine: a trivial mfusepy file system under a C
    client, ``stat`` 96-120 → 55-68 µs and open + read + close 196-252 → 42-54
    µs; the agent on h3 (its own work per request is larger), ``find`` + ``cat``
    of the stdlib's .py files 1.38-2.20 → 1.20-1.40 s, a warm ``ffmpeg -version``
    360-388 → 305-345 ms. libfuse keeps its workers (at most 10 idle), so few
    states are ever left behind by threads that end.
    """
    ensure = ctypes.pythonapi.PyGILState_Ensure
    ensure.restype = ctypes.c_int
    ensure()
    _pinned.done = True


_GIL_KEEPING: Dict[Any, Any] = {}


def keeping_the_gil(function: Any) -> Any:
    """*function* (a ctypes C function pointer) as one whose calls keep the GIL.

    Only for a C function that neither blocks nor calls back into Python.
    """
    kind = type(function)
    prototype = _GIL_KEEPING.get(kind)
    if prototype is None:
        prototype = _GIL_KEEPING[kind] = ctypes.PYFUNCTYPE(function._restype_, *function._argtypes_)
    return ctypes.cast(function, prototype)


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
