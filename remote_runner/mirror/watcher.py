"""Watch the local directories a host holds answers from, and tell it what changed (inotify).

Why: the host keeps names, attributes, directory listings and whole-file
copies of this machine's files. With short leases alone it must ask again
every few seconds (``git status`` re-stats thousands of files, ``tar`` re-lists
every directory). Instead, before answering anything about a path, the local
service watches the path's directory here; the kernel then reports every
change to a name in it (created, deleted, renamed, written, chmod'ed), and
the changed paths go down the channel as an ``inval`` frame. The host keeps
what a watched directory told it until such a frame drops it.

Correctness rule: a change visible here is never served stale by the host
after one more message. inotify queues an event inside the system call that
makes the change, so :meth:`ChangeWatcher.flush` (a non-blocking drain, under
the same lock as the background reader) run before every reply puts each
invalidation on the channel ahead of any reply computed after the change. A
directory is watched *before* its answer is computed, so a change racing the
answer is either in the answer or in a later event.

Limits: a watch is refused on file systems whose changes this kernel does not
see (network and pseudo file systems), past this session's share of
``fs.inotify.max_user_watches``, or when inotify itself is unavailable; the
answer then says "not watched" and the host falls back to a short lease for
it. An event-queue overflow invalidates everything the host holds.

stdlib only (ctypes on libc: the standard library has no inotify binding).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

LOG = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

#: Data or attributes of a name changed (the name itself stays).
CONTENT = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE
#: A name appeared, went away or was replaced.
NAMES = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
SELF_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT
#: IN_DONT_FOLLOW: a directory is watched under its own name, never through a symbolic link
#: (the service checks the way to it; a link would lead the watch elsewhere).
MASK = CONTENT | NAMES | SELF_GONE | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK

EVENT = struct.Struct("iIII")

#: File systems whose changes need not pass through this kernel (or are not
#: files at all): never watched, the host keeps leases for them.
UNWATCHABLE = frozenset((
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "fuse", "fuseblk", "sshfs", "davfs", "proc", "sysfs", "devpts", "debugfs", "tracefs",
    "securityfs", "cgroup", "cgroup2", "pstore", "bpf", "configfs", "fusectl", "mqueue",
    "autofs", "binfmt_misc", "hugetlbfs", "rpc_pipefs", "nsfs", "efivarfs", "selinuxfs",
))

#: This session's share of the user's watches (others on this machine need some too).
SHARE = 0.5
MAX_WATCHES = 200000
#: Directories whose last change is remembered for :meth:`ChangeWatcher.unchanged_since`.
CHANGED_LIMIT = 100000


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def user_watch_limit() -> int:
    """The user's inotify watch limit (``fs.inotify.max_user_watches``), 8192 if unreadable."""
    try:
        with open("/proc/sys/fs/inotify/max_user_watches") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return 8192


class FsTypes:
    """The file system type of a device number, from /proc/self/mountinfo (re-read on a miss)."""

    def __init__(self, mountinfo: str = "/proc/self/mountinfo") -> None:
        self.mountinfo = mountinfo
        self._types: Dict[int, str] = {}

    def _load(self) -> None:
        types: Dict[int, str] = {}
        try:
            with open(self.mountinfo, "rb") as handle:
                lines = handle.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return
        for line in lines:
            fields = line.split()
            try:
                major, minor = (int(x) for x in fields[2].split(":"))
                fstype = fields[fields.index("-") + 1]
            except (IndexError, ValueError):
                continue
            types[os.makedev(major, minor)] = fstype
        self._types = types

    def of(self, dev: int) -> str:
        if dev not in self._types:
            self._load()
        return self._types.get(dev, "")

    def watchable(self, dev: int) -> bool:
        fstype = self.of(dev)
        return bool(fstype) and fstype.split(".")[0] not in UNWATCHABLE


Changes = Tuple[List[bytes], List[bytes], bool]


class ChangeWatcher:
    """Watches directories for the host and reports what changed in them.

    *report* gets ``(paths, trees, everything)``: paths whose attributes (or
    presence) changed, paths to drop with everything under them, and whether
    the host must drop everything (the event queue overflowed). It is called
    under this object's lock, so reports keep the order of the changes.
    """

    def __init__(self, report: Optional[Callable[[List[bytes], List[bytes], bool], None]],
                 limit: Optional[int] = None) -> None:
        self.report = report
        self.limit = limit if limit is not None else min(MAX_WATCHES, int(user_watch_limit() * SHARE))
        self._lock = threading.RLock()
        self._paths: Dict[bytes, int] = {}   # watched directory -> wd
        self._wds: Dict[int, Set[bytes]] = {}  # wd -> the directory names it stands for
        #: directory -> its subdirectories that are watched or lead to one (so a tree is
        #: forgotten by walking it, not by scanning every watch: thousands in a big tree)
        self._under: Dict[bytes, Set[bytes]] = {}
        self._fs = FsTypes()
        self._closed = threading.Event()
        self.full = False
        self.events = 0
        self.reports = 0
        #: Events of the host's own changes, not reported back (see :meth:`own`).
        self.own_events = 0
        #: Change stamps (see :meth:`stamp`): the count of drains that found events, and per
        #: directory the drain that last saw a change to its entries or to itself.
        self._stamp = 0
        self._changed: Dict[bytes, int] = {}
        self._floor = 0
        self._libc = _libc()
        fd = self._libc.inotify_init1(ctypes.c_int(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, "inotify_init1: %s" % os.strerror(err))
        self.fd = fd
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def create(cls, report: Optional[Callable[[List[bytes], List[bytes], bool], None]],
               limit: Optional[int] = None) -> Optional["ChangeWatcher"]:
        """A watcher, or None when inotify is unavailable here (the host then keeps leases)."""
        try:
            return cls(report, limit)
        except (OSError, AttributeError) as exc:
            LOG.info("mirror: no inotify (%s): the host keeps short leases", exc)
            return None

    def __len__(self) -> int:
        return len(self._wds)

    def report_to(self, report: Callable[[List[bytes], List[bytes], bool], None]) -> None:
        """Send changes to *report* from now on.

        A watcher made before there is a host to tell (*report* None, see
        :meth:`~.sendahead.SendAhead.prepare`) drops its reports until then:
        the host holds nothing of this session yet, and what it kept from
        earlier ones is confirmed at ``validate``, which is answered after this.
        """
        with self._lock:
            self.report = report

    # -- watching ---------------------------------------------------------------
    def watch(self, directory: bytes) -> bool:
        """Make sure *directory* (absolute, normalised) is watched; tell whether it is.

        Pending events are handled first, so a name whose directory was just
        moved away is not taken for the old, still-watched one.
        """
        with self._lock:
            if self._closed.is_set():
                return False
            self._drain()
            if directory in self._paths:
                return True
            if self.full or len(self._wds) >= self.limit:
                self.full = True
                return False
            try:
                if not self._fs.watchable(os.stat(directory).st_dev):
                    return False
            except OSError:
                return False
            wd = self._libc.inotify_add_watch(ctypes.c_int(self.fd), ctypes.c_char_p(directory),
                                              ctypes.c_uint32(MASK))
            if wd < 0:
                err = ctypes.get_errno()
                if err == errno.ENOSPC:
                    self.full = True
                    LOG.info("mirror: inotify watches used up (%d here): leases for the rest", len(self._wds))
                return False
            self._paths[directory] = wd
            self._wds.setdefault(wd, set()).add(directory)
            node = directory
            while True:
                up = os.path.dirname(node)
                kids = self._under.setdefault(up, set())
                if up == node or node in kids:
                    break
                kids.add(node)
                node = up
            return True

    def watched(self, directory: bytes) -> bool:
        with self._lock:
            return directory in self._paths

    def stamp(self) -> int:
        """A mark of now, for :meth:`unchanged_since` (changes queued so far are drained first).

        An answer about a watched directory computed after this call is still
        the directory's answer as long as :meth:`unchanged_since` says so: any
        later change to one of its names, their attributes or contents, or to
        the directory itself, makes a new event -- the host's own changes too.
        """
        with self._lock:
            if not self._closed.is_set():
                self._drain()
            return self._stamp

    def unchanged_since(self, directory: bytes, stamp: int) -> bool:
        """Whether *directory* has been watched, with no change seen, since *stamp* (drains first)."""
        with self._lock:
            if self._closed.is_set():
                return False
            self._drain()
            return (stamp >= self._floor and directory in self._paths
                    and self._changed.get(directory, -1) <= stamp)

    def _forget_tree(self, top: bytes) -> None:
        """Stop standing for *top* and the directories under it (they moved or went away)."""
        found, stack = [], [top]
        while stack:
            node = stack.pop()
            if node in self._paths:
                found.append(node)
            stack.extend(self._under.pop(node, ()))
        self._under.get(os.path.dirname(top), set()).discard(top)
        for path in found:
            self._changed[path] = self._stamp  # watched again later: its old answers are gone
            wd = self._paths.pop(path)
            names = self._wds.get(wd)
            if names is not None:
                names.discard(path)
                if not names:
                    del self._wds[wd]
                    self._libc.inotify_rm_watch(ctypes.c_int(self.fd), ctypes.c_int(wd))
        self.full = False

    # -- events -----------------------------------------------------------------
    @contextlib.contextmanager
    def own(self, paths: Iterable[bytes]) -> Iterator[None]:
        """Changes made inside this block to *paths*, for the host, are not reported back to it.

        The host drops what its own request changes and learns the new state
        from the reply; an echo of the same change would only drop that again
        (and make its kernel forget the pages of a file being written). Events
        already queued are reported first; inotify queues an event inside the
        system call, so what this block did is queued when it ends, and is
        dropped there. A change made by another process to the same names
        *after* the block shows in an answer computed after it, or in a later
        event. The lock is held throughout, so the background reader cannot
        take the block's events first.
        """
        mine = set(paths)
        with self._lock:
            if not self._closed.is_set():
                self._drain()
            try:
                yield
            finally:
                if not self._closed.is_set():
                    self._drain(mine)

    def flush(self) -> None:
        """Report every change queued so far (call before sending a reply)."""
        with self._lock:
            if not self._closed.is_set():
                self._drain()

    def report_queued(self) -> bool:
        """:meth:`flush` for whoever waits on :attr:`fd`: False once a report failed (logged;
        the waiter stops reporting: a failing report must not end the link, nor go unsaid)."""
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - whatever the report raised
            LOG.exception("mirror: change report failed")
            return False
        return True

    def _read(self) -> bytes:
        chunks = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
            if len(data) < 65536 - 4096:
                break
        return b"".join(chunks)

    def _drain(self, mine: Set[bytes] = frozenset()) -> None:  # type: ignore[assignment]
        data = self._read()
        if not data:
            return
        paths: Dict[bytes, None] = {}
        trees: Dict[bytes, None] = {}
        everything = False
        self._stamp += 1
        if len(self._changed) > CHANGED_LIMIT:
            self._changed.clear()
            self._floor = self._stamp  # every stamp taken before now means "changed"
        offset = 0
        while offset + EVENT.size <= len(data):
            wd, mask, _cookie, length = EVENT.unpack_from(data, offset)
            name = data[offset + EVENT.size: offset + EVENT.size + length].rstrip(b"\0")
            offset += EVENT.size + length
            self.events += 1
            if mask & IN_Q_OVERFLOW:
                everything = True
                continue
            dirs = sorted(self._wds.get(wd, ()))
            for directory in dirs:
                self._mark(directory)
                child = directory.rstrip(b"/") + b"/" + name if name else b""
                if child in self._paths:  # a watched subdirectory: its own answer changed too
                    self._changed[child] = self._stamp
                if name:
                    path = directory.rstrip(b"/") + b"/" + name
                    if path in mine:  # the host's own change (see :meth:`own`)
                        self.own_events += 1
                        if mask & IN_ISDIR and mask & (IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO):
                            self._forget_tree(path)
                        continue
                    if mask & NAMES:
                        trees[path] = None
                        paths[directory] = None  # its mtime and link count changed
                        if mask & IN_ISDIR and mask & (IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO):
                            self._forget_tree(path)
                    elif mask & CONTENT:
                        paths[path] = None
                elif mask & (SELF_GONE | IN_IGNORED):
                    if directory in mine:
                        # The watched directory the host's own rmdir or rename took away: its
                        # own watch says so too, and that is the host's change as well (else
                        # the host forgot the removed name in its parent's listing, and the
                        # parent's rmdir, which needs the listing known empty, waited).
                        self.own_events += 1
                    else:
                        trees[directory] = None
                elif mask & CONTENT:
                    paths[directory] = None
            if not name and mask & (SELF_GONE | IN_IGNORED):
                # The watch no longer stands for these names: forget it (it is
                # added again, for what is there now, when the host asks).
                for directory in dirs:
                    self._forget_tree(directory)
                if self._wds.pop(wd, None) is not None and not mask & IN_IGNORED:
                    self._libc.inotify_rm_watch(ctypes.c_int(self.fd), ctypes.c_int(wd))
        if everything:
            self._floor = self._stamp  # every answer kept from before may be stale
            for wd in list(self._wds):
                self._libc.inotify_rm_watch(ctypes.c_int(self.fd), ctypes.c_int(wd))
            self._wds.clear()
            self._paths.clear()
            self._under.clear()
            self.full = False
        if (paths or trees or everything) and self.report is not None:
            self.reports += 1
            self.report(list(paths), list(trees), everything)

    def _mark(self, directory: bytes) -> None:
        """*directory*'s answer changed (its entries, or its own attributes in its parent's)."""
        self._changed[directory] = self._stamp
        parent = os.path.dirname(directory)
        if parent != directory:
            self._changed[parent] = self._stamp

    # -- background -------------------------------------------------------------
    def start(self) -> "ChangeWatcher":
        """Report changes as they happen, from a daemon thread (besides :meth:`flush`).

        For a link whose stream cannot be polled: otherwise the link's reader
        polls :attr:`fd` with it and reports (see ``LocalLink._wait_for_input``).
        """
        self._thread = threading.Thread(target=self._loop, daemon=True, name="mirror-watch")
        self._thread.start()
        return self

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self._closed.is_set():
            try:
                ready = poller.poll(500)
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            if ready and not self.report_queued():
                return

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._paths.clear()
            self._wds.clear()
            self._under.clear()
            try:
                os.close(self.fd)
            except OSError:
                pass


def kept_while_unchanged(watcher: Optional["ChangeWatcher"], table: Dict[Any, Tuple[int, Any]], key: Any,
                         directory: bytes, compute: Callable[[], Tuple[Any, bool]], limit: int,
                         still: Optional[Callable[[Any], bool]] = None) -> Any:
    """*compute* ()'s value for *key*, kept in *table* while *watcher* sees no change in *directory*.

    A value made while the directory was watched is given again as long as
    :meth:`ChangeWatcher.unchanged_since` its stamp (and *still* (value) holds,
    for what changes with no event there, e.g. a file with other names):
    exactly as long as the host may keep what it was told. *compute* returns
    (value, whether it may be kept); *table* is emptied when it reaches *limit*.
    """
    kept = table.get(key)
    if kept is not None and watcher is not None and watcher.unchanged_since(directory, kept[0]) \
            and (still is None or still(kept[1])):
        return kept[1]
    stamp = watcher.stamp() if watcher is not None and watcher.watched(directory) else None
    value, keep = compute()
    if stamp is not None and keep:
        if len(table) >= limit:
            table.clear()
        table[key] = (stamp, value)
    return value


def parents(paths: Iterable[bytes]) -> List[bytes]:
    """The distinct directories of *paths* (``/`` for ``/`` itself), in order."""
    out: Dict[bytes, None] = {}
    for path in paths:
        out[os.path.dirname(path) or b"/"] = None
    return list(out)


def inval_frame(paths: List[bytes], trees: List[bytes], everything: bool) -> Dict[str, object]:
    """The ``inval`` frame telling the host what a :class:`ChangeWatcher` reported."""
    from remote_runner.mirror import protocol as P
    header: Dict[str, object] = {"t": P.INVAL}
    if paths:
        header["p"] = [P.name_to_wire(p) for p in paths]
    if trees:
        header["tree"] = [P.name_to_wire(p) for p in trees]
    if everything:
        header["all"] = 1
    return header
