"""New names and reopened files the host does not wait for: made-up handles and inodes.

Why apart: :mod:`.state` is the one request path every operation takes; this
is what the host does *instead* of asking, where it already knows the answer.
A test suite or a build makes names by the thousand (temporary files and
directories, ``.o`` files, pytest's numbered directories and ``current``
links) in directories it has just changed, and reads back what it wrote. Each
waited for the local side: a round trip per name, 20 ms at 10 ms each way.

* ``create``, ``mkdir``, ``symlink`` of a name known missing, in a directory
  this machine already changed for the host, are sent without waiting. The
  host numbers the handle (a range the local side accepts once,
  ``protocol.POSTED_HANDLES``) and makes up the inode (from
  :data:`MADE_UP_INODES`); the name's attributes are those the local side
  will give it. The made-up inode stays the file's for the session: every
  later answer about its local inode is rewritten to it (``InodeAliases.bind``),
  so ``fstat``, ``stat``, a hard link and a later ``stat`` agree.
* A create's outcome is taken like a write's (its error comes at close, as
  on NFS); a mkdir's or symlink's like a posted unlink's (at the next change
  in its directory or the new one). Nor does it wait for the answers to the
  changes sent before it in the directory (a temporary directory's mkdir,
  its files, their unlinks, its rmdir: a round trip each otherwise): an
  earlier one's error is raised by the first change there made once it came,
  and the local side makes nothing sent without waiting after a failure in
  the same directory (:mod:`remote_runner.mirror.failedchanges`).
* A read-only open of a file the host wrote and closed, whose bytes it
  holds, is answered at once (:meth:`NewNames.post_reading`); so is an open
  that empties a file this mount made (:meth:`NewNames.post_emptying`).
* A ``chmod`` of a name the mount made in the session, or this machine's user owns
  (:meth:`NewNames.post_chmod`).

Shipped to hosts inside the agent's zipapp (``rrmirror.host``): stdlib only, Python 3.8.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import protocol as P
from .names import parent as parent_of
from .writes import predicted_directory

#: Inode numbers the host gives the files it creates without waiting (see aliases.py):
#: far above what local file systems hand out.
MADE_UP_INODES = 1 << 60
#: A name longer than this is created waiting for the local side's answer: file systems
#: limit a name's length (255 bytes mostly, 143 on eCryptfs) and say ENAMETOOLONG at once.
POSTED_NAME_MAX = 143
#: Numbers of the handles and inodes the host makes up, for the agent's whole life.
_made_up = itertools.count(1)


class NewNames:
    """(Mixed into :class:`~.state.MountState`) the operations the host does not wait for.

    Uses the mount's caches, pending tables and request path (``link``,
    ``cache``, ``changes``, ``writes``, ``written_files``, ``writing``...).
    """

    link: Any
    cache: Any
    changes: Any
    writes: Any
    written_files: Any
    guesses: Any
    profile: Any
    drops: Any
    fault: Any
    made: Any
    new_files: Dict[str, int]
    created: Dict[int, Any]
    reading: Dict[int, None]
    writing: Dict[str, Dict[int, None]]
    written: Dict[int, str]
    creating_in: Dict[str, Dict[int, None]]
    writing_lock: Any

    def room_for(self, name: str) -> Optional[Dict[str, Any]]:
        """The attributes of *name*'s directory if *name* may be made there without waiting, else None.

        That is: the local side's user is known, the name is short enough,
        known missing (the directory's listing, kept coherent, says so), and
        in a directory where this machine already made a change for the host
        (the exports let it write there) whose attributes are held.
        """
        folder = parent_of(name)
        if self.link.local_ids is None or not self.changes.may_post(folder) or not short_name(name):
            return None
        known, where = self.cache.get(name), self.cache.get(folder)
        if known is None or not known.get("missing") or where is None or where.get("missing") \
                or not stat.S_ISDIR(int(where.get("st_mode", 0))):
            return None
        return where

    def show_new(self, op: str, args: Dict[str, Any], where: Dict[str, Any], attrs: Dict[str, Any],
                 now: int, link: Optional[str] = None) -> Tuple[int, Optional[int]]:
        """Show the name *op* makes (its *attrs*) at once, and its directory (*where*) changed.

        The name stands for its made-up inode until the reply (``InodeAliases.expect``);
        a new directory is known empty. Returns (a name-cache token from
        before the change, the token of the directory's guessed attributes or None).
        """
        name = args["path"]
        folder = parent_of(name)
        kept, folder_kept = self.cache.kept(name), self.cache.kept(folder)
        guess = predicted_directory(where, op, now)
        self.forget_changed(op, args)
        since = self.cache.begin()
        self.cache.inodes.expect(name, attrs["st_ino"])
        self.cache.put(name, attrs, watched=kept, since=since, link=link)
        if op == "mkdir":
            self.cache.put_listing(name, [], watched=kept, since=since)
        token = self.guesses.begin(folder) if guess is not None else None
        if guess is not None:
            self.cache.put(folder, guess, watched=folder_kept, since=since)
        self.remember_made(name)
        return since, token

    def unshow_new(self, op: str, args: Dict[str, Any], made_up: int, token: Optional[int]) -> None:
        """The change :meth:`show_new` showed failed: nothing of what it showed stands."""
        self.cache.inodes.expect(args["path"], None)
        self.cache.inodes.unbind(made_up)
        self.forget_changed(op, args)
        if token is not None:
            self.guesses.end(parent_of(args["path"]), token)

    def post_create(self, name: str, mode: int, flags: int, ctx: List[int]) -> Optional[int]:
        """Create a file without waiting where the outcome is known here; its handle, or None (wait).

        Where :meth:`room_for` says so. The handle and the inode are numbered
        here; the new file's attributes follow from the request (type and
        mode, the local user or the caller as owner, the group of a set-group-ID
        directory, empty, now). The create is the handle's first request, so
        its writes follow it on the local side, and its outcome is taken like
        a write's: a failure (the name taken here meanwhile, a full disk)
        is reported at close, as on NFS. Requests naming the file, its
        directory or a name beside it wait for the answer first. Not for
        ``O_SYNC``/``O_DSYNC``, which ask to wait.
        """
        folder = parent_of(name)
        where = None if flags & (os.O_SYNC | os.O_DSYNC) else self.room_for(name)
        if where is None:
            return None
        ids = self.link.local_ids
        # An earlier change there not waited for reports its error here, if it is in.
        self.check_changes("create", {"path": name}, wait=False)
        fh, made_up = new_handle(), MADE_UP_INODES + next(_made_up)
        if fh is None:
            return None
        now = time.time_ns()
        args: Dict[str, Any] = {"path": name, "mode": mode, "flags": flags, "ctx": ctx, "fh": fh}
        self.after_changes(args)
        since, token = self.show_new("create", args, where, new_file(where, mode, ctx, ids, made_up, now), now)
        self.created[fh] = made_up
        with self.writing_lock:
            self.writing.setdefault(name, {})[fh] = None
            self.written[fh] = name
            self.creating_in.setdefault(folder, {})[fh] = None

        def done(header: Optional[Dict[str, Any]]) -> None:
            self.cache.inodes.expect(name, None)
            with self.writing_lock:
                waiting = self.creating_in.get(folder, {})
                waiting.pop(fh, None)
                if not waiting:
                    self.creating_in.pop(folder, None)
            if header is None:  # failed: nothing of the guess stands (the error comes at close)
                self.unshow_new("create", args, made_up, token)
                self.written_files.drop(name)
                return
            st = header.get("st")
            self.cache.inodes.bind(st, made_up)
            if not isinstance(st, dict) or st.get("st_size") != 0:
                self.written_files.drop(name)  # not the empty file it was taken for (made here meanwhile)
            if token is not None:
                self.learned(folder, token, since, "create", args, header)
            elif "w" in header:
                self.learn("create", args, header, since)

        try:
            self.writes.opened(fh, lambda seq: self.link.submit("create", dict(args, seq=seq)), done)
        except OSError as exc:
            done(None)
            raise self.fault(exc.errno or errno.EIO)
        self.link.count_posted("create")
        self.track_written(name, fh)
        return fh

    def post_made(self, op: str, args: Dict[str, Any]) -> bool:
        """A ``mkdir`` or ``symlink`` sent without waiting where its outcome is known here; False: wait.

        Where :meth:`room_for` says so; the new name gets an inode made up here and the attributes the
        local side will give it; a new directory is known empty and may be
        changed at once. Sent as the unlinks are (:meth:`change`): numbered,
        requests sent after it come after it on the local side, and a failure
        is raised by the next change in the directory or in the new one.
        """
        name = args["path"]
        folder = parent_of(name)
        where = self.room_for(name)
        if where is None:
            return False
        ids = self.link.local_ids
        self.check_changes(op, args, wait=False)  # (an earlier change's error, if in, is reported by this one)
        made_up, now = MADE_UP_INODES + next(_made_up), time.time_ns()
        attrs = new_file(where, int(args.get("mode", 0o777)), args.get("ctx") or [], ids, made_up, now)
        target = None
        if op == "mkdir":
            attrs.update(st_mode=stat.S_IFDIR | (int(args["mode"]) & 0o7777) | (
                int(where.get("st_mode", 0)) & stat.S_ISGID), st_nlink=2, st_size=4096, st_blocks=8)
        else:
            target = args["target"]
            attrs.update(st_mode=stat.S_IFLNK | 0o777, st_size=len(P.name_from_wire(target)))
        since, token = self.show_new(op, args, where, attrs, now, link=target)
        dirs = [folder]
        if op == "mkdir":
            dirs.append(name)
            self.changes.confirm(name)  # made here through this machine: its export lets the host write
            if self.profile is not None:
                self.profile.made(name)

        def done(header: Dict[str, Any]) -> None:
            self.cache.inodes.expect(name, None)
            self.cache.inodes.bind(header.get("st"), made_up)
            if op == "mkdir" and not header.get("empty"):
                self.cache.invalidate(trees=[name])  # someone was quicker here: ask what it holds
            # (its listing was kept from the start, with what the host made in it since)
            learned = {k: v for k, v in header.items() if k != "empty"}
            if token is not None and self.guesses.end(folder, token):
                # the reply to the latest change there: the directory's real attributes too
                self.learn(op, args, learned, since)
                if self.drops is not None and self.guesses.given(folder):
                    self.drops.drop([folder], wait=False)
            else:
                learned.pop("dst", None)
                self.learn(op, args, learned, since)

        def undo() -> None:
            self.unshow_new(op, args, made_up, token)
            self.changes.forget(name)

        try:
            self.changes.post(op, args, dirs, undo=undo, done=done)
        except OSError as exc:
            undo()
            raise self.fault(exc.errno or errno.EIO)
        self.link.count_posted(op)
        return True

    def post_emptying(self, name: str, flags: int) -> Optional[int]:
        """An open for writing that empties (``O_TRUNC``) a file this mount made, not waited for;
        its handle, or None (wait).

        gcc's driver makes its temporary file (``mkstemp``: a create not
        waited for) and closes it; ``cc1`` then opens it again with ``O_TRUNC``
        to write the assembly into it: one waited open per compiled file. The
        file is a regular file with one name that this mount made in the
        session, nothing on this machine changed since, and no handle here
        writes: the local side's user owns it, the kernel checked the
        permissions, and the open leaves the same file empty, its times now.
        Its outcome is taken like a write's, as a create's is: a failure (the
        file changed here meanwhile) is reported at close.
        """
        if flags & (os.O_SYNC | os.O_DSYNC) or not flags & os.O_TRUNC or flags & os.O_ACCMODE == os.O_RDONLY:
            return None
        made = self.new_files.get(name)
        if made is None or name not in self.made or self.cache.changed_there_since(name, made) \
                or not short_name(name) or not self.changes.may_post(parent_of(name)):
            return None
        known = self.cache.get(name)
        if known is None or known.get("missing") or not stat.S_ISREG(int(known.get("st_mode", 0))) \
                or int(known.get("st_nlink", 1)) != 1:
            return None
        with self.writing_lock:
            if name in self.writing:  # written through another handle: its writes and this truncation race
                return None
        args = self._numbered_open(name, flags)
        if args is None:
            return None
        fh = args["fh"]
        now = time.time_ns()
        guess = dict(known, st_size=0, st_blocks=0, st_mtime=now,
                     st_ctime=max(now, int(known.get("st_ctime", 0)) + 1))
        kept, since = self.cache.kept(name), self.cache.begin()
        self.written_files.drop(name)
        self.cache.put(name, guess, watched=kept, since=since)
        self.created[fh] = guess.get("st_ino")
        with self.writing_lock:
            self.writing.setdefault(name, {})[fh] = None
            self.written[fh] = name

        def done(header: Optional[Dict[str, Any]]) -> None:
            if header is None:  # failed: the guess does not stand (the error comes at close)
                self.written_files.drop(name)
                self.cache.invalidate(paths=[name])

        try:
            self.writes.opened(fh, lambda seq: self.link.submit("open", dict(args, seq=seq)), done)
        except OSError as exc:
            done(None)
            self.created.pop(fh, None)
            self.stop_writing(fh)  # (a failed open gets no release)
            raise self.fault(exc.errno or errno.EIO)
        self.link.count_posted("open")
        self.track_written(name, fh)
        return fh

    def post_reading(self, name: str, flags: int) -> Optional[int]:
        """A read-only open of a file the host wrote and closed, not waited for; its handle, or None.

        Its bytes are all known here (:class:`~.written.WrittenFiles`: a test
        reading back the fixture it wrote, ``as`` the ``.s`` that ``cc1``
        wrote), so its reads need no local handle. One is opened all the
        same, numbered here, for a read the bytes kept here no longer answer
        (the file changed on this machine): that read first waits for the open.
        """
        with self.writing_lock:
            if name in self.writing:  # still open for writing somewhere
                return None
        if not self.written_files.holds(name, self.cache.changed_since) or not short_name(name):
            return None
        known = self.cache.get(name)
        if known is None or known.get("missing") or not stat.S_ISREG(int(known.get("st_mode", 0))):
            return None
        args = self._numbered_open(name, flags)
        if args is None:
            return None
        fh = args["fh"]
        try:
            self.writes.opened(fh, lambda seq: self.link.submit("open", dict(args, seq=seq)), lambda _: None)
        except OSError:
            return None
        self.reading[fh] = None  # (one the host numbered: see P.posted_handle)
        self.link.count_posted("open")
        return fh

    def _numbered_open(self, name: str, flags: int) -> Optional[Dict[str, Any]]:
        """The request of an open not waited for, its handle numbered here (``fh``); None: none left."""
        fh = new_handle()
        if fh is None:
            return None
        args: Dict[str, Any] = {"path": name, "flags": flags, "fh": fh}
        self.after_changes(args)
        return args

    def forget_handle(self, fh: int) -> None:
        """*fh* is released: no request waits for its create any more."""
        with self.writing_lock:
            for where in [d for d, handles in self.creating_in.items() if fh in handles]:
                self.creating_in[where].pop(fh, None)
                if not self.creating_in[where]:
                    del self.creating_in[where]

    def post_chmod(self, args: Dict[str, Any]) -> bool:
        """Send a chmod without waiting when it cannot fail here; False: the caller waits for it.

        That is a regular file (with one name) or a directory this mount
        created in the session, or one this machine's user owns (or any, where
        it runs as root), in a directory where changes are sent on (the
        export is writable, see ``PendingChanges.may_post``). Until the reply, the
        name's attributes are guessed (new mode, ctime moved on): the kernel
        asks for them right after every chmod. A test suite's temporary files
        (CPython's test_tempfile: 430 chmods) then cost no round trip each; a
        failure (the file replaced here meanwhile) surfaces at the next
        change in its directory, as a posted unlink's does.
        """
        return self._post_setattr("chmod", args, lambda known: {
            "st_mode": stat.S_IFMT(int(known.get("st_mode", 0))) | (int(args["mode"]) & 0o7777)})

    def post_utimens(self, args: Dict[str, Any]) -> bool:
        """Send a utimens without waiting, on the same terms as :meth:`post_chmod`.

        ``cp -a``, ``tar x`` and ``rsync`` set the times of every file they
        make: one round trip each (with the ACL ``cp -a`` sets, 20 s for 250
        files at 10 ms each way). "Now" is guessed with this host's clock until
        the answer brings the local side's.
        """
        times = args.get("ns")
        if times is None:
            times = [P.UTIME_NOW, P.UTIME_NOW]
        if not (isinstance(times, list) and len(times) == 2 and all(isinstance(t, int) for t in times)):
            return False

        def changed(known: Dict[str, Any]) -> Dict[str, Any]:
            now = time.time_ns()
            return {key: (now if t == P.UTIME_NOW else known.get(key, 0) if t == P.UTIME_OMIT else t)
                    for key, t in zip(("st_atime", "st_mtime"), times)}
        return self._post_setattr("utimens", args, changed)

    def post_chown(self, args: Dict[str, Any]) -> bool:
        """Send a chown without waiting, on the terms of :meth:`post_chmod`, when it cannot fail.

        That is when the local side runs as root (``tar x`` as root gives each
        file its owner back), or the owner and group asked are its own; and not
        for a set-user- or set-group-ID file, whose mode the chown changes.
        """
        ids, uid, gid = self.link.local_ids, args.get("uid"), args.get("gid")
        if ids is None or not isinstance(uid, int) or not isinstance(gid, int):
            return False
        if ids[0] != 0 and (uid not in (-1, ids[0]) or gid not in (-1, ids[1])):
            return False
        known = self.cache.get(args["path"])
        if known is None or int(known.get("st_mode", 0)) & (stat.S_ISUID | stat.S_ISGID):
            return False
        return self._post_setattr("chown", args, lambda known: {
            "st_uid": known.get("st_uid", 0) if uid == -1 else uid,
            "st_gid": known.get("st_gid", 0) if gid == -1 else gid})

    def _post_setattr(self, op: str, args: Dict[str, Any], changed: Callable[[Dict[str, Any]], Dict[str, Any]]) -> bool:
        """Post *op* on a name this mount made or this machine's user owns, guessing its attributes
        with *changed* (see post_chmod)."""
        name, folder = args["path"], parent_of(args["path"])
        known = self.cache.get(name)
        if known is None or known.get("missing") or not self.changes.may_post(folder):
            return False
        ids = self.link.local_ids
        if name not in self.made and not (ids is not None and ids[0] in (0, known.get("st_uid"))):
            return False  # (another user's file: only its owner or root may change it)
        mode = int(known.get("st_mode", 0))
        if not (stat.S_ISDIR(mode) or (stat.S_ISREG(mode) and int(known.get("st_nlink", 1)) == 1)):
            return False
        self.check_changes(op, args, wait=False)
        self.after_names(args)  # a create of the file not answered yet comes first
        kept = self.cache.kept(name)
        self.forget_changed(op, args)
        guess = dict(known, **changed(known))
        guess["st_ctime"] = max(time.time_ns(), int(known.get("st_ctime", 0)) + 1)
        token, since = self.guesses.begin(name), self.cache.begin()
        self.cache.put(name, guess, watched=kept, since=since)

        def done(header: Dict[str, Any]) -> None:
            if self.guesses.end(name, token):  # the reply of the latest change: real attributes
                self.learn(op, args, header, since)
        try:
            self.changes.post(op, args, [folder], undo=lambda: self.forget_changed(op, args), done=done)
            self.link.count_posted(op)
        except OSError as exc:
            self.forget_changed(op, args)
            raise self.fault(exc.errno or errno.EIO)
        return True


def new_handle() -> Optional[int]:
    """A handle number for the local side to take (None once the range is used up)."""
    fh = P.POSTED_HANDLES[0] + next(_made_up)
    return fh if P.posted_handle(fh) else None


def short_name(path: str) -> bool:
    """Whether the last name of wire *path* is short enough to be created without waiting."""
    return len(P.name_from_wire(path.rsplit("/", 1)[-1])) <= POSTED_NAME_MAX


def new_file(folder: Dict[str, Any], mode: int, ctx: List[int], local_ids: Tuple[int, int],
             inode: int, now_ns: int) -> Dict[str, Any]:
    """The attributes a regular file created now in *folder* gets on the local side.

    The local side creates it as its own user (*local_ids*), and when that
    is root gives it to the calling user (*ctx*) unless that is root too; a
    set-group-ID directory gives its group. The mode is the request's (the
    host's umask is already applied).
    """
    uid, gid = local_ids
    if uid == 0 and len(ctx) == 2 and list(ctx) != [0, 0] and min(ctx) >= 0:
        uid, gid = int(ctx[0]), int(ctx[1])
    if int(folder.get("st_mode", 0)) & stat.S_ISGID:
        gid = int(folder.get("st_gid", gid))
    return {"st_mode": stat.S_IFREG | (mode & 0o7777), "st_ino": inode, "st_dev": folder.get("st_dev", 0),
            "st_nlink": 1, "st_uid": uid, "st_gid": gid, "st_size": 0, "st_atime": now_ns,
            "st_mtime": now_ns, "st_ctime": now_ns, "st_blocks": 0,
            "st_blksize": folder.get("st_blksize", 4096), "st_rdev": 0}
