"""What one mount keeps between FUSE operations, and the one way every request goes out.

Why apart: a FUSE operation is a few lines of its own (:mod:`.operations`);
what makes it correct is shared by all of them and lives here. Every request
goes through :meth:`MountState.call`, which lets the writes sent to a name land
before the name is asked about, puts the request after the changes sent
without waiting, and drops from the name cache exactly what a change changed
(never all of it). Changes whose outcome the host already knows (an unlink, an
``rmdir`` of a directory known empty, a rename onto a name known free) go
without waiting, with the directory's attributes guessed until the reply
(:meth:`MountState.change`); new names and reopened files likewise, in
:mod:`.posted`. Read-only opens go through the host's copy of a
file when it is current (:meth:`MountState.open_whole`). The handle tables
(read-only, created, flushed, O_SYNC) say which later requests the host may
answer itself.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .. import protocol as P
from ..hardlinks import LinkNames
from .basis import discard, stage
from .caches import LOCAL_FH_BASE, FileCache, copy_key, fetch_ahead, fetch_rest
from .fresh import READ_AHEAD, FreshFiles
from .link import Link
from .kernel import KernelDrops
from .names import NameCache, absolute_names, parent as parent_of
from .profile import Profile
from .posted import NewNames
from .writes import DirectoryGuesses, PendingChanges, PendingWrites, predicted_directory
from .written import WrittenFiles

#: Operations changing names in a directory: once one succeeds there, the exports let the host change it.
ENTRY_OPS = frozenset(("mknod", "mkdir", "symlink", "link", "create", "unlink", "rmdir", "rename"))

#: Operations whose reply tells the host the state of the name they made or removed.
LEARNED_OPS = frozenset(("mkdir", "symlink", "mknod", "link", "create", "unlink", "rmdir",
                         "chmod", "chown", "utimens", "truncate"))

#: Names remembered as made by the mount in one session (see :meth:`MountState.post_chmod`).
MADE_LIMIT = 100000
#: Times a read through the link is made again while invalidations of its file cross it.
READ_AGAIN = 3
MUTATING_OPS = frozenset(("mknod", "mkdir", "unlink", "rmdir", "symlink", "link", "rename", "chmod",
                          "chown", "truncate", "utimens", "create", "write", "open", "release", "flush",
                          "fsync", "fallocate", "setxattr", "removexattr"))


class MountState(NewNames):
    """The caches, pending requests and handle tables of one mount, and the request path.

    *fault* is the exception a FUSE operation raises with an errno
    (mfusepy's ``FuseOSError``, passed in so this module needs no libfuse).
    """

    def __init__(self, link: Link, prefix: bytes, files: Optional[FileCache],
                 cache: Optional[NameCache], profile: Optional[Profile],
                 drops: Optional[KernelDrops], fault: Callable[[int], BaseException]) -> None:
        self.link = link
        self.prefix = prefix
        self.files = files
        self.cache = cache if cache is not None else NameCache()
        self.profile = profile
        self.drops = drops
        self.fault = fault
        self.writes = PendingWrites(link.submit, link.wait, link.abandon)
        self.changes = PendingChanges(link.submit, link.wait)
        self.changes.confirm(*link.changeable)
        self.sync_handles: Dict[int, None] = {}  # opened O_SYNC/O_DSYNC: every write waits
        self.created: Dict[int, Any] = {}  # handles of files this host created -> the file's inode
        self.flushed: Dict[int, None] = {}  # handles whose close brought the file's attributes, unwritten since
        self.written_files = WrittenFiles()  # files the host created or emptied: reads answered here
        self.guesses = DirectoryGuesses()  # directories whose attributes are guessed after unlink, rmdir
        self.reading: Dict[int, None] = {}  # local handles opened read-only: closing them changes nothing
        self.fresh = FreshFiles()  # handles read past the kernel's cache (see fresh.py)
        self.links = LinkNames()
        #: Names this mount created in the session (and not removed since): theirs to chmod.
        self.made: Set[str] = set()
        #: Files this mount created, or created-or-emptied (no capability either way: a truncate
        #: removes one) -> the name cache's token then (see :meth:`no_capability`).
        self.new_files: Dict[str, int] = {}
        #: paths without security.capability: until when, at which ctime
        self.no_caps: Dict[str, Tuple[float, Any]] = {}
        #: Wire path -> the ctime at which the local side said it has no extended attribute.
        self.bare: Dict[str, int] = {}
        #: Names this mount gave a file capability (``security.capability``).
        self.capable: Set[str] = set()
        self.writing: Dict[str, Dict[int, None]] = {}  # name -> handles that wrote to it (pipelined)
        self.written: Dict[int, str] = {}
        self.creating_in: Dict[str, Dict[int, None]] = {}  # directory -> handles of creates not yet answered
        self.writing_lock = threading.Lock()

    def wire(self, path: str) -> str:
        if path is None:  # an operation on an open file whose name libfuse no longer knows
            raise self.fault(errno.ESTALE)
        raw = path.encode("utf-8", "surrogateescape")
        full = (self.prefix.rstrip(b"/") + raw.rstrip(b"/")) if self.prefix else raw
        return P.name_to_wire(full or b"/")

    def learn_bare(self, path: str, entries: Any) -> None:
        """Keep which names beside *path* have no extended attribute, at which ctime (a getxattr answer)."""
        if not isinstance(entries, list):
            return
        base = parent_of(self.wire(path)).rstrip("/") + "/"
        if len(self.bare) > 100000:
            self.bare.clear()
        for entry in entries:
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) \
                    and isinstance(entry[1], int) and "/" not in entry[0]:
                self.bare[base + entry[0]] = entry[1]

    def bare_of_xattrs(self, path: str) -> bool:
        """Whether *path* has no extended attribute: so said while its ctime was the one known now."""
        where = self.wire(path)
        ctime = self.bare.get(where)
        if ctime is None:
            return False
        known = self.cache.get(where)
        return known is not None and not known.get("missing") and known.get("st_ctime") == ctime

    def no_capability(self, path: str) -> bool:
        where = self.wire(path)
        made = self.new_files.get(where)
        if made is not None and where not in self.capable and not self.cache.changed_there_since(where, made):
            return True  # made by this mount, given none here, and not changed on the local side since
        until, ctime = self.no_caps.get(path, (0.0, None))
        if until > time.monotonic():
            return True
        if ctime is None:
            return False
        known = self.cache.get(self.wire(path))  # kept until this file's attributes change
        return known is not None and known.get("st_ctime") == ctime

    def mutates(self, op: str, args: Dict[str, Any]) -> bool:
        if op == "open":
            return args.get("flags", 0) & (os.O_ACCMODE | os.O_TRUNC) != os.O_RDONLY
        if op in ("flush", "release"):
            return args.get("fh") not in self.reading
        return op in MUTATING_OPS

    def forget_changed(self, op: str, args: Dict[str, Any]) -> None:
        """Drop from the name cache exactly what *op* changed (never all of it)."""
        if op in ("unlink", "rename", "link", "truncate"):
            self.written_files.drop(*[args[k] for k in ("path", "old", "new", "target")
                                      if isinstance(args.get(k), str)])
        if op in ("mknod", "mkdir", "symlink", "create", "unlink", "rmdir"):
            self.cache.renamed(args["path"])
            self.unmade(args["path"], tree=op == "rmdir")
        elif op == "rename":
            self.cache.renamed(args["old"], args["new"])
            moved = args["old"] in self.made
            self.unmade(args["new"], tree=True)
            self.unmade(args["old"], tree=True)  # (names below a renamed directory are no longer known as made)
            if moved:
                self.remember_made(args["new"])
        elif op == "link":
            self.cache.renamed(args["path"])
            self.cache.changed(args["target"])
        elif op in ("chmod", "chown", "truncate", "utimens", "setxattr", "removexattr") and "path" in args:
            self.cache.changed(args["path"])
        elif op == "open" and args.get("flags", 0) & os.O_TRUNC:
            self.cache.changed(args["path"])


    def settle_names(self, args: Dict[str, Any]) -> None:
        """Before a request naming a file, let the writes sent to it land (its size, its data).

        The same for a create not waited for, before a request naming the new
        file, its directory or another name in it (a listing would miss it).
        """
        for fh in self._handles_naming(args):
            self.drain(fh)

    def after_names(self, args: Dict[str, Any]) -> None:
        """:meth:`settle_names` for a change not waited for, without waiting where it can.

        A handle numbered here (a create not waited for, and its writes) is
        named in the change's ``after_fh`` with its last request so far: the
        local side runs the change only after those (the file is there, its
        bytes written, so a ``utimens`` is not undone by a write that lands
        later). ``tar x`` sets each file's owner, mode and times right after
        writing it: two round trips per file before. Any other handle is
        drained here, as before. The one handle request that follows changes
        (a close's ``flush``, ``after``) takes its number only once it chose
        them, so a change and a flush never wait for each other.
        """
        after = []
        for fh in self._handles_naming(args):
            if P.posted_handle(fh):
                seq = self.writes.last_seq(fh)
                if seq:
                    after.append([fh, seq])
            else:
                self.drain(fh)
        if after:
            args["after_fh"] = after

    def _handles_naming(self, args: Dict[str, Any]) -> List[int]:
        """The handles writing to a name *args* names, or creating it or a name beside it."""
        if not self.writing and not self.creating_in:
            return []
        with self.writing_lock:
            names = [args[key] for key in ("path", "old", "new", "target") if isinstance(args.get(key), str)]
            handles = [fh for name in names for fh in self.writing.get(name, ())]
            if self.creating_in:
                handles += [fh for name in names for where in (name, parent_of(name))
                            for fh in self.creating_in.get(where, ())]
        return list(dict.fromkeys(handles))

    def read_through(self, path: Optional[str], fh: int, size: int, offset: int) -> bytes:
        """Read a file's bytes through the link, never older than an invalidation that crossed the read.

        The data was read on this machine before the reply left; an
        invalidation of the file read here meanwhile may be for a change made
        after that (the reply and the invalidation travel separately, the
        reply perhaps on a lane), and the kernel would keep the old bytes
        past it. So such a read is made again; after :data:`READ_AGAIN`
        tries, the last answer stands (a file rewritten without pause).
        """
        name = self.wire(path) if path is not None else None
        for _ in range(READ_AGAIN):
            since = self.cache.begin()
            data = self.call("read", {"fh": fh, "size": size, "off": offset})[1]
            if name is None or not self.cache.changed_since(name, since):
                break
        return data

    def call(self, op: str, args: Dict[str, Any], payload: bytes = b"") -> Tuple[Dict[str, Any], bytes]:
        self.settle_names(args)
        self.after_changes(args)
        since = self.cache.begin()
        try:
            header, data = self.link.call(op, args, payload)
        except OSError as exc:
            raise self.fault(exc.errno or errno.EIO)
        finally:
            if self.mutates(op, args):
                self.forget_changed(op, args)
        if op in ENTRY_OPS:
            self.changes.confirm(*self.changed_dirs(op, args))
            if op in ("mknod", "mkdir", "symlink", "create"):
                self.remember_made(args["path"])
        # Listed directories the local side says the host may change: their first
        # removal or new name need not wait either (LocalFileService._may_change).
        self.changes.confirm(*absolute_names(header.get("wr")))
        if op == "open" and "fh" in header and not self.mutates(op, args):
            self.reading[header["fh"]] = None
        elif op == "release":
            self.reading.pop(args.get("fh"), None)
        elif "w" in header and op in LEARNED_OPS:
            self.learn(op, args, header)
        for item in header.get("push") or ():
            try:
                self.cache.put(item[0], item[1], watched=bool(item[2]) if len(item) > 2 else False, since=since)
            except (IndexError, TypeError, AttributeError):
                continue
        return header, data

    def after_changes(self, args: Dict[str, Any]) -> None:
        """Have the local side carry out the request of *args* after the changes not yet confirmed."""
        after = self.changes.after()
        if after is not None:
            args["after"] = after

    def learn(self, op: str, args: Dict[str, Any], header: Dict[str, Any], since: Optional[int] = None) -> None:
        """Keep what the reply to the host's own change says of the name it made or removed.

        The local side sent it after the change (and did not echo the change
        back, see watcher.own); every ``inval`` sent before the reply has
        been applied by the time the reply is read, so the answer is current.
        *since*: for a reply taken later than it was read, a token from before the
        change was sent (an ``inval`` read meanwhile wins).
        """
        watched = bool(header.get("w"))
        since = self.cache.begin() if since is None else since
        if op in ("unlink", "rmdir"):
            self.cache.put(args["path"], None, watched=watched, since=since)
        elif isinstance(header.get("st"), dict):
            link = args.get("target") if op == "symlink" and isinstance(args.get("target"), str) else None
            self.cache.put(args["path"], header["st"], watched=watched, since=since, link=link)
            if op == "mkdir" and header.get("empty"):
                self.cache.put_listing(args["path"], [], watched=True, since=since)
        if isinstance(header.get("dst"), dict):
            self.cache.put(parent_of(args["path"]), header["dst"], watched=watched, since=since)

    def changed_dirs(self, op: str, args: Dict[str, Any]) -> List[str]:
        if op == "rename":
            return list(dict.fromkeys((parent_of(args["old"]), parent_of(args["new"]))))
        return [parent_of(args["path"])]

    def check_changes(self, op: str, args: Dict[str, Any], wait: bool = True) -> None:
        """Raise the error of an earlier change sent without waiting in the same directory."""
        try:
            self.changes.check(*self.changed_dirs(op, args), wait=wait)
        except OSError as exc:
            raise self.fault(exc.errno or errno.EIO)

    def outcome_known(self, op: str, args: Dict[str, Any]) -> bool:
        """Whether the host knows what the local side will answer (the kernel checked the rest).

        rmdir: the directory is known empty (its whole listing is held).
        rename: the new name is known missing, a non-directory, or an empty
        directory (the kernel refuses a directory over a file and the reverse).
        """
        if op == "unlink":
            return True
        if op == "rmdir":
            return self.cache.names(args["path"]) == []
        if args.get("flags") or args.get("hide"):
            return False
        target = self.cache.get(args["new"])
        if target is None:
            return False
        return (bool(target.get("missing")) or not stat.S_ISDIR(int(target.get("st_mode", 0)))
                or self.cache.names(args["new"]) == [])

    def change(self, op: str, args: Dict[str, Any]) -> None:
        """An unlink, rmdir or rename: sent without waiting where its outcome is known here."""
        dirs = self.changed_dirs(op, args)
        if not self.changes.may_post(*dirs) or not self.outcome_known(op, args):
            self.check_changes(op, args)
            self.call(op, args)
            return
        self.check_changes(op, args, wait=False)
        self.settle_names(args)  # a file's own writes land before it is renamed or removed
        gone = args["old"] if op == "rename" else args["path"]
        kept = self.cache.kept(gone)
        # unlink, rmdir: the directory's attributes are guessed until the reply brings them
        # (a rename's reply does not: its directories are asked for again).
        folder = dirs[0]
        before = self.cache.get(folder) if op != "rename" else None
        guess = predicted_directory(before, op, time.time_ns())
        folder_kept = guess is not None and self.cache.kept(folder)
        self.forget_changed(op, args)
        if op == "rmdir" or op == "rename":
            self.changes.forget(gone)
        done = None
        if guess is not None:
            token, since = self.guesses.begin(folder), self.cache.begin()
            self.cache.put(folder, guess, watched=folder_kept, since=since)
            done = lambda header: self.learned(folder, token, since, op, args, header)  # noqa: E731
        try:
            self.changes.post(op, args, dirs, undo=lambda: self.forget_changed(op, args), done=done)
            self.link.count_posted(op)
        except OSError as exc:
            self.forget_changed(op, args)  # (the guess too)
            raise self.fault(exc.errno or errno.EIO)
        # What the change makes of the name, as the local side will find it.
        self.cache.put(gone, None, watched=kept, since=self.cache.begin())

    def remember_made(self, name: str) -> None:
        if len(self.made) >= MADE_LIMIT:
            self.made.clear()  # (only a speed-up is lost: their chmods wait again)
        self.made.add(name)

    def remember_new_file(self, name: str) -> None:
        """Wire *name* is a file this mount just created (or emptied): it has no capability."""
        if len(self.new_files) >= MADE_LIMIT:
            self.new_files.clear()
        self.new_files[name] = self.cache.begin()

    def unmade(self, name: str, tree: bool = False) -> None:
        """*name* was removed or replaced: it (and with *tree*, all below it) is no longer known as made."""
        self.made.discard(name)
        self.new_files.pop(name, None)
        if tree:
            below = name.rstrip("/") + "/"
            self.made.difference_update([made for made in self.made if made.startswith(below)])
            # (each set is cleared on its own when full: one may hold names the other lost)
            for made in [made for made in self.new_files if made.startswith(below)]:
                del self.new_files[made]

    def learned(self, folder: str, token: int, since: int, op: str, args: Dict[str, Any],
                header: Dict[str, Any]) -> None:
        """The reply to a change sent without waiting: its directory's real attributes replace the
        guess, unless a later change there made a newer one (its own reply will)."""
        if self.guesses.end(folder, token):
            self.learn(op, args, header, since)
            if self.drops is not None and self.guesses.given(folder):
                self.drops.drop([folder], wait=False)  # the kernel's copy of the guess, too

    def drain(self, fh: Optional[int]) -> None:
        """Wait for the handle's pipelined writes (a read-back or size change needs them)."""
        if fh is not None and fh < LOCAL_FH_BASE and self.writes.pending(fh):
            self.writes.drain(fh)

    def local_fd(self, fh: int) -> int:
        entry = self.files.handles.get(fh) if self.files is not None else None
        if entry is None:
            raise self.fault(errno.EBADF)
        return entry[0]

    def open_whole(self, path: str, flags: int) -> int:
        """Open read-only through the host's copy of the file (see :class:`FileCache`)."""
        assert self.files is not None
        self.files.wait_for(path, self.link.request_timeout)
        have = self.files.lookup(path)
        known = self.cache.get(path)
        if have is not None and known is not None and not known.get("missing") and copy_key(known) == have:
            # What the host holds of the name (watched, or within its lease) matches our copy.
            fd = self.files.open_copy(path, have)
            if fd is not None:
                self.link.answer_here("open")
                self.files.opened(path)
                return self.fresh.reopened(self.files.add_handle(fd, known), path, have)
        fh = self._open_asking(path, flags, have, known)
        self.settle_kernel()
        return fh

    def read_fresh(self, path: Optional[str], fh: int, size: int, offset: int) -> bytes:
        """A read of a fresh handle: from what an earlier read brought, else :data:`READ_AHEAD` asked."""
        name = self.wire(path) if path is not None else None
        kept = self.fresh.kept(fh, offset, size, name, self.cache.changed_since)
        if kept is not None:
            self.link.answer_here("read")
            return kept
        since = self.cache.begin()
        data = self.read_through(path, fh, max(size, READ_AHEAD), offset)
        self.fresh.keep(fh, offset, data, since)
        return data[:size]

    def settle_kernel(self) -> None:
        """Wait until the kernel forgot what every invalidation read so far dropped here.

        For an open answered by this machine: the file may have been replaced
        there, and the kernel may still hold the size it had before (its
        ``inval`` is carried out by the dispatch thread, apart from the reply).
        Returned before that, the handle's reads would be cut at, or padded
        with zeros up to, the old size: bytes of neither version. Once the
        kernel forgot it, it asks for the size again before reading past it,
        and a short read shrinks it (see :meth:`KernelDrops.settle`).
        """
        if self.drops is not None:
            self.drops.settle()

    def _open_asking(self, path: str, flags: int, have: Any, known: Optional[Dict[str, Any]]) -> int:
        """:meth:`open_whole` when this machine must answer: the file whole, or a handle there."""
        assert self.files is not None
        fd = None
        # No copy yet: this host's own file of that path and size may be the same (see basis.py).
        staged = (stage(self.files.directory, path, known.get("st_size"))
                  if have is None and known is not None and not known.get("missing") else None)
        try:
            while True:
                since = self.cache.begin()
                args = {"path": path, "flags": flags, "whole": True, "have": have}
                if staged is not None:
                    args["basis"] = staged.digest
                header, first = self.call("open", args)
                if isinstance(header.get("libs"), dict):  # a program: its libraries (or siblings) come next
                    fetch_ahead(self.link, self.files, self.cache, header["libs"], since)
                meta = header.get("whole")
                if not meta:  # not eligible (too big, changing, not a regular file)
                    return self.fresh.opened(int(header["fh"]), header)
                if staged is not None and header.get("basis") == 1:
                    fd, staged = self.files.adopt(path, meta, staged), None
                    if fd is not None:
                        self.link.answer_here("basis")
                        break
                    continue  # it could not be kept: ask for the data
                if first or "fh" in header:
                    break
                fd = self.files.open_copy(path, meta)  # our copy is current
                if fd is not None or have is None:
                    break
                have = None  # another session dropped the copy: ask for the data
        finally:
            discard(staged)
        if fd is None:
            fd = self.fetch_whole(path, meta, header.get("fh"), first)
        if fd is None:  # fall back to reading through the link
            header = self.call("open", {"path": path, "flags": flags})[0]
            return self.fresh.opened(int(header["fh"]), header)
        self.cache.put(path, header["st"], watched=bool(header.get("w")), since=since)
        return self.fresh.opened(self.files.add_handle(fd, header["st"]), header, path, meta)

    def fetch_whole(self, path: str, meta: List[int], fh: Optional[int], first: bytes) -> Optional[int]:
        """Receive the rest of a whole file (all chunks requested at once); store it, return an fd.

        None when the file changed while it was sent or the copy cannot be stored.
        """
        assert self.files is not None
        chunks = fetch_rest(self.link, [(fh, first, meta[0])])[0]
        if chunks is None:
            return None
        return self.files.store_quietly(path, meta, chunks)

    def stop_writing(self, fh: int) -> None:
        """*fh* writes no name any more (released, or its open never went out)."""
        with self.writing_lock:
            name = self.written.pop(fh, None)
            if name is not None:
                handles = self.writing.get(name, {})
                handles.pop(fh, None)
                if not handles:
                    self.writing.pop(name, None)

    def track_written(self, name: str, fh: int) -> None:
        """*fh* opened *name* empty: keep what it writes to answer reads (see WrittenFiles)."""
        if self.cache.kept(name):  # a change made by this machine will be reported (watched)
            self.written_files.start(name, fh, self.cache.begin())


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
