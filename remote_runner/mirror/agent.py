"""The remote half of the mirror: mount the local file system over FUSE and run a command in it.

This module is shipped to the host inside a zipapp (with ``protocol.py`` and
``mfusepy.py``), so it must stay stdlib-only and Python 3.8 compatible, and
it imports mfusepy only after choosing the libfuse version explicitly.

One process does everything, so a lost link cleans up everything:

1. it reads one ``boot`` frame on stdin (the whole session);
2. enters a private mount namespace (root) or a user + mount namespace with
   the local uid mapped onto the connecting user (non-root), before any
   thread exists, since unshare(2) refuses a multi-threaded caller;
3. mounts the FUSE mirror (every operation becomes a ``req`` frame answered
   by the local service; many in flight, matched by id), binds the host's
   /dev, /proc, /sys and /run into it;
4. runs the command chrooted into the mirror (or, in files-only mode, on the
   host's own root with the local trees mounted at their own paths), as a
   process-group leader, while this process is a child subreaper: when the
   command ends or the link drops, every remaining descendant is killed.

``daemon`` mode keeps the mirror for many commands: it listens on a UNIX
socket in a private 0700 directory, and ``attach`` (run in a screen window)
hands its stdio over with SCM_RIGHTS and exits with the command's status.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import platform
import queue
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

try:
    from . import protocol as P
    from .hardlinks import LinkNames, path_invalidator
except ImportError:  # pragma: no cover - run as a plain script
    import protocol as P  # type: ignore
    from hardlinks import LinkNames, path_invalidator  # type: ignore

LOG = logging.getLogger("remote_runner.mirror.agent")

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414
SPECIAL_DIRS = ("dev", "proc", "sys", "run")
DEFAULT_HEARTBEAT = 5.0
DEFAULT_DEADLINE = 20.0
REQUEST_TIMEOUT = 60.0
#: File handles at or above this are copies in the :class:`FileCache`, not local handles.
LOCAL_FH_BASE = 1 << 48
#: libfuse 3's FUSE_CAP_CACHE_SYMLINKS (fuse_common.h).
FUSE_CAP_CACHE_SYMLINKS = 1 << 23
#: Default size limit of the host's file cache (``boot`` may set another).
FILE_CACHE_LIMIT = 2 << 30
#: At most this many bytes are fetched ahead at a session's start.
PREFETCH_LIMIT = 512 << 20
PREFETCH_BATCH = 64 << 20
EXIT_LINK = 254

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(res: int, what: str) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def unshare(flags: int) -> None:
    """Call unshare(2)."""
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: Optional[bytes], target: bytes, fstype: Optional[bytes], flags: int) -> None:
    """Call mount(2)."""
    _check(_libc.mount(source, target, fstype, ctypes.c_ulong(flags), None), "mount %r" % target)


def umount(target: bytes, flags: int = MNT_DETACH) -> None:
    """Call umount2(2)."""
    _check(_libc.umount2(target, ctypes.c_int(flags)), "umount %r" % target)


def prctl(option: int, arg: int) -> None:
    """Call prctl(2) with one argument."""
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), 0, 0, 0), "prctl")


# ---------------------------------------------------------------------------
# Link: frames over stdin/stdout, request multiplexing, heartbeat.
# ---------------------------------------------------------------------------
class Link:
    """The framed channel to the local side."""

    def __init__(self, in_fd: int, out_fd: int, heartbeat: float = DEFAULT_HEARTBEAT,
                 deadline: float = DEFAULT_DEADLINE) -> None:
        self.reader = P.FdReader(in_fd)
        self.writer = P.FrameWriter(P.fd_write_all(out_fd))
        self.heartbeat = heartbeat
        self.deadline = deadline
        self.request_timeout = REQUEST_TIMEOUT
        self.lost = threading.Event()
        self.lost_reason = ""
        self.last_rx = time.monotonic()
        self._pending: Dict[int, List[Any]] = {}
        self._lock = threading.Lock()
        self._next = 1
        self.handlers: Dict[str, Callable[[Dict[str, Any], bytes], None]] = {}

    def send(self, header: Dict[str, Any], payload: bytes = b"") -> None:
        """Send a frame; a broken pipe marks the link lost."""
        if self.lost.is_set():
            return
        try:
            self.writer.send(header, payload)
        except OSError as exc:
            self.mark_lost("write failed: %s" % exc)

    def mark_lost(self, reason: str) -> None:
        """Fail every pending request and wake everyone waiting on the link."""
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for slot in pending:
            slot[0].set()

    def call(self, op: str, args: Dict[str, Any], payload: bytes = b"",
             timeout: Optional[float] = None) -> Tuple[Dict[str, Any], bytes]:
        """Run one file-system request; raise OSError with the remote errno (EIO on link loss or timeout)."""
        return self._wait(self._submit(op, args, payload), timeout)

    def call_many(self, op: str, many: List[Dict[str, Any]],
                  timeout: Optional[float] = None) -> List[Any]:
        """Send every request of *many* at once, then wait for all (one round trip, not N).

        Returns (header, payload) per request, or the OSError it failed with.
        """
        slots = [self._submit(op, args, b"") for args in many]
        results: List[Any] = []
        for slot in slots:
            try:
                results.append(self._wait(slot, timeout))
            except OSError as exc:
                results.append(exc)
        return results

    def _submit(self, op: str, args: Dict[str, Any], payload: bytes) -> List[Any]:
        if self.lost.is_set():
            raise OSError(errno.EIO, "link lost")
        with self._lock:
            rid = self._next
            self._next += 1
            slot: List[Any] = [threading.Event(), None, b"", rid]
            self._pending[rid] = slot
        self.send({"t": P.REQ, "id": rid, "op": op, "a": args}, payload)
        return slot

    def _wait(self, slot: List[Any], timeout: Optional[float]) -> Tuple[Dict[str, Any], bytes]:
        end = time.monotonic() + (self.request_timeout if timeout is None else timeout)
        while not slot[0].wait(min(1.0, max(0.0, end - time.monotonic()))):
            if self.lost.is_set() or time.monotonic() >= end:
                break
        with self._lock:
            self._pending.pop(slot[3], None)
        header = slot[1]
        if header is None:
            raise OSError(errno.EIO, "link lost or request timed out")
        if header.get("e"):
            raise OSError(int(header["e"]), os.strerror(int(header["e"])))
        return header, slot[2]

    def read_loop(self) -> None:
        """Dispatch incoming frames until the stream ends."""
        try:
            while True:
                header, payload = P.read_frame(self.reader)
                self.last_rx = time.monotonic()
                kind = header["t"]
                if kind == P.REP:
                    with self._lock:
                        slot = self._pending.get(header.get("id"))
                    if slot is not None:
                        slot[1], slot[2] = header, payload
                        slot[0].set()
                elif kind == P.PING:
                    self.send({"t": P.PONG})
                elif kind == P.PONG:
                    pass
                elif kind == P.BYE:
                    self.mark_lost("local side ended the session")
                    return
                else:
                    handler = self.handlers.get(kind)
                    if handler is not None:
                        handler(header, payload)
                    else:
                        LOG.debug("ignoring frame %r", kind)
        except P.LinkClosed:
            self.mark_lost("connection closed")
        except (P.ProtocolError, OSError) as exc:
            self.mark_lost("link error: %s" % exc)

    def heartbeat_loop(self) -> None:
        """Ping the local side; declare the link lost after *deadline* of silence."""
        while not self.lost.wait(self.heartbeat):
            if time.monotonic() - self.last_rx > self.deadline:
                self.mark_lost("no frame for %.0f s" % self.deadline)
                return
            self.send({"t": P.PING})

    def start(self) -> None:
        """Start the reader and heartbeat threads."""
        for target in (self.read_loop, self.heartbeat_loop):
            threading.Thread(target=target, daemon=True).start()


# ---------------------------------------------------------------------------
# FUSE operations: each one is a request to the local service.
# ---------------------------------------------------------------------------
def choose_libfuse() -> str:
    """Pick libfuse 3 when present (else 2) and tell mfusepy explicitly; return the choice."""
    if os.environ.get("FUSE_LIBRARY_PATH"):
        return os.environ["FUSE_LIBRARY_PATH"]
    for name, soname in (("fuse3", "libfuse3.so.3"), ("fuse", "libfuse.so.2")):
        if ctypes.util.find_library(name):
            os.environ["FUSE_LIBRARY_NAME"] = name
            return name
        try:
            ctypes.CDLL(soname)
        except OSError:
            continue
        os.environ["FUSE_LIBRARY_PATH"] = soname
        return soname
    raise OSError(errno.ENOENT, "neither libfuse3 nor libfuse2 is installed on this host")


MUTATING_OPS = frozenset(("mknod", "mkdir", "unlink", "rmdir", "symlink", "link", "rename", "chmod",
                          "chown", "truncate", "utimens", "create", "write", "open", "release", "flush",
                          "fsync", "fallocate", "setxattr", "removexattr"))


#: What :class:`AttrCache` holds for a path known not to exist.
MISSING: Dict[str, int] = {"missing": 1}


class AttrCache:
    """Attributes the local side sent ahead (readdir entries, ``push`` lists, a warm start).

    Saves one round trip per entry for ``ls -l``, import probing and the like;
    an entry serves one lookup within its time to live (default *ttl*), and
    may say the path does not exist (:data:`MISSING`). It also remembers the
    attributes (and symlink targets) last received for a path (:meth:`recent`):
    an open right after the kernel's lookup can then use the host's copy of a
    file without asking again. Any operation that may change metadata empties
    it: correctness first.
    """

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        # path -> (expires, received, attributes)
        self._entries: Dict[str, Tuple[float, float, Dict[str, Any]]] = {}
        self._seen: Dict[str, Tuple[float, float, Dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def _stamp(self, when: Optional[float], ttl: Optional[float]) -> Tuple[float, float]:
        received = time.monotonic() if when is None else when
        return received + (self.ttl if ttl is None else ttl), received

    def put(self, path: str, attrs: Optional[Dict[str, Any]], when: Optional[float] = None,
            ttl: Optional[float] = None) -> None:
        """Keep *attrs* for *path*, received at *when* (default now), for one lookup."""
        if attrs:
            expires, received = self._stamp(when, ttl)
            with self._lock:
                if len(self._entries) > 4 * P.PROFILE_NAMES:
                    self._entries.clear()
                self._entries[path] = (expires, received, attrs)

    def get(self, path: str) -> Optional[Dict[str, Any]]:
        with self._lock:
            entry = self._entries.pop(path, None)
        if entry is None or entry[0] < time.monotonic():
            return None
        self.note(path, entry[2], entry[1], ttl=entry[0] - entry[1])
        return entry[2]

    def note(self, path: str, attrs: Dict[str, Any], when: Optional[float] = None,
             kind: str = "st", ttl: Optional[float] = None) -> None:
        """Record *attrs* (or a symlink target: *kind* ``link``) as received for *path* at *when*."""
        expires, received = self._stamp(when, ttl)
        with self._lock:
            if len(self._seen) > 4 * P.PROFILE_NAMES:
                self._seen.clear()
            self._seen[kind + ":" + path] = (expires, received, attrs)

    def recent(self, path: str, kind: str = "st") -> Optional[Tuple[float, Dict[str, Any]]]:
        """Return (received, attributes) still valid for *path*, if any."""
        with self._lock:
            entry = self._seen.get(kind + ":" + path)
        if entry is None or time.monotonic() >= entry[0]:
            return None
        return entry[1], entry[2]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._seen.clear()


class FileCache:
    """Whole copies of local files opened read-only, kept on this host between sessions.

    A program start opens hundreds of files (libraries, modules, data) and the
    kernel reads each in many small requests, one round trip apiece. Instead, a
    read-only open asks for the whole file (up to ``WHOLE_LIMIT``) with the
    size, mtime and inode of the copy held here; the local side answers "still
    current" without data, or sends the file (first chunk in the reply, the
    rest as parallel reads). Reads, flush and release are then served from the
    copy with no round trip. Copies are named ``<sha1 of path>-<size>-<mtime_ns>-<ino>``
    in a 0700 directory per local machine and user, written under a temporary
    name and renamed, so sessions running at once can share it; the oldest
    are dropped when it outgrows its limit.
    """

    def __init__(self, directory: str, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.handles: Dict[int, Tuple[int, Dict[str, int]]] = {}
        self._index: Dict[str, Tuple[List[int], str]] = {}
        self._lock = threading.Lock()
        self._next_fh = LOCAL_FH_BASE
        #: Files being fetched ahead: an open of one waits for it instead of asking again.
        self._pending: Dict[str, threading.Event] = {}
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in os.listdir(directory):
            parts = name.split("-")
            if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
                self._index[parts[0]] = ([int(p) for p in parts[1:]], name)

    @staticmethod
    def key(path: str) -> str:
        return hashlib.sha1(P.name_from_wire(path)).hexdigest()

    def expect(self, paths: List[str]) -> None:
        """Mark *paths* as on their way (see :meth:`wait_for`)."""
        with self._lock:
            for path in paths:
                self._pending.setdefault(path, threading.Event())

    def arrived(self, paths: List[str]) -> None:
        """*paths* are stored, or will not be: wake whoever waits for them."""
        with self._lock:
            events = [self._pending.pop(path, None) for path in paths]
        for event in events:
            if event is not None:
                event.set()

    def wait_for(self, path: str, timeout: float) -> None:
        """If *path* is being fetched ahead, wait (at most *timeout* s) until it is done."""
        event = self._pending.get(path)
        if event is not None:
            event.wait(timeout)

    def lookup(self, path: str) -> Optional[List[int]]:
        """Return [size, mtime_ns, ino] of the copy of *path*, if there is one."""
        entry = self._index.get(self.key(path))
        return entry[0] if entry else None

    def open_copy(self, path: str, meta: List[int]) -> Optional[int]:
        """Open the copy of *path* if it matches *meta* (another session may have dropped it)."""
        entry = self._index.get(self.key(path))
        if entry is None or entry[0] != meta:
            return None
        try:
            fd = os.open(os.path.join(self.directory, entry[1]), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            os.utime(fd)  # recently used: trimmed last
        except OSError:
            pass
        return fd

    def store(self, path: str, meta: List[int], chunks: List[bytes]) -> int:
        """Write a new copy of *path* (temporary name, then rename); return an fd on it."""
        key = self.key(path)
        name = "%s-%d-%d-%d" % (key, meta[0], meta[1], meta[2])
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.rename(tmp, os.path.join(self.directory, name))
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        with self._lock:
            old = self._index.get(key)
            self._index[key] = (list(meta), name)
        if old is not None and old[1] != name:
            _unlink_quietly(os.path.join(self.directory, old[1]))
        return fd

    def store_quietly(self, path: str, meta: List[int], chunks: List[bytes]) -> Optional[int]:
        """:meth:`store`, or None (with a warning) when the copy cannot be written."""
        try:
            return self.store(path, meta, chunks)
        except OSError as exc:
            LOG.warning("file cache: cannot store a copy in %s: %s", self.directory, exc)
            return None

    def add_handle(self, fd: int, st: Dict[str, int]) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = (fd, st)
        return fh

    def release(self, fh: int) -> None:
        with self._lock:
            entry = self.handles.pop(fh, None)
        if entry is not None:
            os.close(entry[0])

    def trim(self) -> None:
        """Drop the least recently used copies while the cache is over its limit."""
        try:
            entries = []
            with os.scandir(self.directory) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    entries.append((st.st_mtime, st.st_size, e.path))
        except OSError:
            return
        total = sum(e[1] for e in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit * 0.8:
                break
            _unlink_quietly(path)
            total -= size


def fetch_rest(link: Link, items: List[Tuple[Optional[int], bytes, int]]
               ) -> List[Optional[List[bytes]]]:
    """Complete whole files: per (handle, first chunk, size), all chunks; None if it failed.

    The remaining chunks of every file are requested at once, then the local
    handles released: one or two round trips for any number of files.
    """
    requests, owners = [], []
    for i, (fh, first, size) in enumerate(items):
        if fh is not None:
            for off in range(len(first), size, P.WHOLE_CHUNK):
                requests.append({"fh": fh, "size": P.WHOLE_CHUNK, "off": off})
                owners.append(i)
    out: List[Optional[List[bytes]]] = [[first] for _, first, _ in items]
    for owner, result in zip(owners, link.call_many("read", requests) if requests else []):
        chunks = out[owner]
        if isinstance(result, OSError) or chunks is None:
            out[owner] = None
        else:
            chunks.append(result[1])
    handles = [{"fh": fh} for fh, _, _ in items if fh is not None]
    if handles:
        link.call_many("release", handles)
    for i, (_, _, size) in enumerate(items):
        chunks = out[i]
        if chunks is not None and sum(len(c) for c in chunks) != size:
            out[i] = None  # the file changed while it was sent
    return out


def prefetch(link: Link, files: FileCache, wanted: List[Tuple[str, List[int]]],
             after_batch: Optional[Callable[[], None]] = None) -> int:
    """Fetch the files *wanted* ((name, meta) the local side listed) into *files*, all at once.

    At most ``PREFETCH_LIMIT`` bytes, in batches of ``PREFETCH_BATCH`` bytes
    (the memory it holds at a time); a file that changed since it was listed
    is simply not stored. An open of a listed file waits for its batch
    (:meth:`FileCache.wait_for`) rather than fetching it a second time;
    *after_batch* runs after each batch. Returns how many copies were stored.
    """
    files.expect([name for name, _ in wanted])
    try:
        return _prefetch(link, files, wanted, after_batch)
    finally:
        files.arrived([name for name, _ in wanted])


def _prefetch(link: Link, files: FileCache, wanted: List[Tuple[str, List[int]]],
              after_batch: Optional[Callable[[], None]]) -> int:
    batches: List[List[str]] = [[]]
    total = size = 0
    for name, meta in wanted:
        if total + meta[0] > PREFETCH_LIMIT:
            continue
        if batches[-1] and size + meta[0] > PREFETCH_BATCH:
            batches.append([])
            size = 0
        batches[-1].append(name)
        size += meta[0]
        total += meta[0]
    stored = 0
    for batch in batches:
        if batch:
            stored += _prefetch_batch(link, files, batch)
            files.arrived(batch)
            if after_batch is not None:
                after_batch()
    return stored


def wanted_files(files: FileCache, whole: List[Any]) -> List[Tuple[str, List[int]]]:
    """Of the (name, [size, mtime_ns, ino]) entries the local side listed, those with no current copy here."""
    return [(p, m) for p, m in whole if isinstance(p, str) and isinstance(m, list)
            and len(m) == 3 and files.lookup(p) != m]


def validate(link: Link, paths: List[str]) -> Optional[Tuple[List[str], List[Any], List[Any]]]:
    """Send one ``validate`` for *paths*; return (names, answers, whole) or None if it failed."""
    try:
        _, data = link.call("validate", {}, b"\0".join(P.name_from_wire(p) for p in paths))
        reply = json.loads(data.decode("utf-8"))
        return list(reply["names"]), list(reply["answers"]), list(reply["whole"])
    except (OSError, ValueError, KeyError, TypeError, P.ProtocolError) as exc:
        LOG.debug("validation skipped: %s", exc)
        return None


def remember_answers(cache: "AttrCache", names: List[Any], answers: List[Any], when: float) -> None:
    """Keep ``validate``-style answers (attributes, "missing", link targets) for ``Profile.TTL`` s."""
    for path, answer in zip(names, answers):
        if not isinstance(path, str):
            continue
        if answer is None:
            cache.put(path, MISSING, when, Profile.TTL)
        elif isinstance(answer, list) and len(answer) == 2 and isinstance(answer[0], dict):
            cache.put(path, answer[0], when, Profile.TTL)
            if isinstance(answer[1], str):
                cache.note(path, {"link": answer[1]}, when, kind="link", ttl=Profile.TTL)


def fetch_ahead(link: Link, files: FileCache, cache: "AttrCache", listing: Dict[str, Any]) -> None:
    """Take a ``validate``-style *listing* (names, answers, whole files) and fetch its files.

    The answers are kept at once; the files are fetched in parallel batches
    while the caller goes on. Answers older than a second are renewed after
    each batch (one ``validate``), so lookups still find fresh ones when the
    last batch lands.
    """
    names, answered = list(listing.get("names") or []), [time.monotonic()]
    remember_answers(cache, names, list(listing.get("answers") or []), answered[0])
    wanted = wanted_files(files, list(listing.get("whole") or []))
    if not wanted:
        return

    def renew() -> None:
        if time.monotonic() - answered[0] > 1.0:
            fresh = validate(link, names)
            if fresh is not None:
                answered[0] = time.monotonic()
                remember_answers(cache, fresh[0], fresh[1], answered[0])

    files.expect([name for name, _ in wanted])  # before the thread runs: the next open must wait
    threading.Thread(target=prefetch, args=(link, files, wanted, renew), daemon=True,
                     name="fetch-ahead").start()


def _prefetch_batch(link: Link, files: FileCache, batch: List[str]) -> int:
    # O_NONBLOCK: a name replaced by a FIFO since it was listed must not block a local worker.
    replies = link.call_many("open", [{"path": name, "flags": os.O_RDONLY | os.O_NONBLOCK,
                                       "whole": True, "have": None} for name in batch])
    items, names = [], []
    for name, reply in zip(batch, replies):
        if isinstance(reply, OSError):
            continue
        header, first = reply
        if not header.get("whole"):
            if "fh" in header:
                link.call_many("release", [{"fh": header["fh"]}])
            continue
        items.append((header.get("fh"), first, int(header["whole"][0])))
        names.append((name, header["whole"]))
    stored = 0
    for (name, meta), chunks in zip(names, fetch_rest(link, items)):
        if chunks is not None:
            fd = files.store_quietly(name, meta, chunks)
            if fd is not None:
                os.close(fd)
                stored += 1
    return stored


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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
                    return entry[1]
            if fh is not None and fh:
                args["fh"] = fh
            if "fh" not in args:
                if profile is not None:
                    profile.record(args["path"])
                cached = cache.get(args["path"])
                if cached is MISSING or (cached is not None and cached.get("missing")):
                    raise mfusepy.FuseOSError(errno.ENOENT)
                if cached is not None:
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
                return os.pread(local_fd(fh), size, offset)
            return call("read", {"fh": fh, "size": size, "off": offset})[1]

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            done = int(call("write", {"fh": fh, "off": offset}, bytes(data))[0]["n"])
            links.changed(path)
            return done

        def flush(self, path: str, fh: int) -> int:
            if fh >= LOCAL_FH_BASE:
                return 0
            call("flush", {"fh": fh})
            return 0

        def release(self, path: str, fh: int) -> int:
            if fh >= LOCAL_FH_BASE:
                files.release(fh)
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


class Mount:
    """One FUSE mount served through the link, run in its own thread."""

    def __init__(self, link: Link, mountpoint: str, prefix: bytes, system: bool,
                 files: Optional[FileCache] = None, cache: Optional[AttrCache] = None,
                 profile: Optional["Profile"] = None) -> None:
        self.link = link
        self.mountpoint = mountpoint
        self.prefix = prefix
        self.system = system
        self.files = files
        self.cache = cache
        self.profile = profile
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None
        self.ops = None

    def start(self, timeout: float = 30.0) -> None:
        """Mount and wait until the kernel has the file system."""
        ops, fuse_cls = make_operations(self.link, self.prefix, self.files, self.cache, self.profile)
        self.ops = ops
        # Correctness first: short caching, as the local side may change files too.
        timeouts = 1.0
        options = dict(foreground=True, fsname="remote-runner", subtype="mirror",
                       default_permissions=True, use_ino=True,
                       attr_timeout=timeouts, entry_timeout=timeouts, negative_timeout=timeouts)
        if os.geteuid() == 0:
            # Commands that switch users (su, sudo -u) still reach their files; the
            # kernel checks permissions (default_permissions) and the mount is
            # only visible in our private mount namespace.
            options["allow_other"] = True

        def run() -> None:
            try:
                fuse_cls(ops, self.mountpoint, **options)
            except BaseException as exc:  # reported to the waiter below
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True, name="fuse")
        self.thread.start()
        end = time.monotonic() + timeout
        while not ops.mounted.wait(0.05):
            if not self.thread.is_alive():
                raise OSError(errno.EIO, "FUSE mount at %s failed: %s" % (self.mountpoint, self.error))
            if self.link.lost.is_set():
                raise OSError(errno.EIO, "link lost while mounting")
            if time.monotonic() > end:
                raise OSError(errno.ETIMEDOUT, "FUSE mount at %s did not come up" % self.mountpoint)

    def stop(self) -> None:
        """Unmount lazily; the FUSE loop ends once the kernel lets go."""
        try:
            umount(os.fsencode(self.mountpoint), MNT_DETACH)
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join(2.0)


# ---------------------------------------------------------------------------
# Namespaces and the mirror root.
# ---------------------------------------------------------------------------
def check_fuse_device() -> None:
    """Fail clearly when /dev/fuse is missing or not usable by this user."""
    if not os.path.exists("/dev/fuse"):
        raise OSError(errno.ENODEV, "/dev/fuse is missing on this host (no FUSE support in its kernel "
                      "or container)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        raise OSError(errno.EACCES, "/dev/fuse (mode %04o) is not readable and writable by uid %d; "
                      "connect as root or make /dev/fuse 0666" % (mode, os.geteuid()))


def enter_namespaces(local_uid: int, local_gid: int) -> str:
    """Enter a private mount namespace (with a user namespace when not root); return the mode."""
    if os.geteuid() == 0:
        unshare(CLONE_NEWNS)
        mode = "root"
    else:
        uid, gid = os.geteuid(), os.getegid()
        try:
            unshare(CLONE_NEWUSER | CLONE_NEWNS)
        except OSError as exc:
            raise OSError(exc.errno, "cannot create a user namespace as uid %d (%s); the mirror needs "
                          "root on the host or unprivileged user namespaces "
                          "(kernel.unprivileged_userns_clone=1, user.max_user_namespaces>0, no AppArmor "
                          "restriction)" % (uid, exc.strerror))
        with open("/proc/self/setgroups", "w") as fh:
            fh.write("deny")
        with open("/proc/self/uid_map", "w") as fh:
            fh.write("%d %d 1\n" % (local_uid, uid))
        with open("/proc/self/gid_map", "w") as fh:
            fh.write("%d %d 1\n" % (local_gid, gid))
        mode = "userns"
    mount(b"none", b"/", None, MS_REC | MS_PRIVATE)
    return mode


def bind_specials(root: str) -> None:
    """Bind the host's /dev, /proc, /sys and /run over the mirror's."""
    for name in SPECIAL_DIRS:
        source = "/" + name
        target = os.path.join(root, name)
        if not os.path.isdir(source):
            continue
        try:
            if not os.path.isdir(target):
                continue
        except OSError:
            continue
        mount(os.fsencode(source), os.fsencode(target), None, MS_BIND | MS_REC)
        try:
            mount(None, os.fsencode(target), None, MS_SLAVE | MS_REC)
        except OSError:
            pass


def unmount_under(root: str) -> None:
    """Lazily unmount *root* and everything below it, deepest first."""
    targets = []
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            for line in fh:
                point = line.split()[4].decode("utf-8", "surrogateescape")
                point = point.replace("\\040", " ")
                if point == root or point.startswith(root.rstrip("/") + "/"):
                    targets.append(point)
    except OSError:
        return
    for point in sorted(targets, key=len, reverse=True):
        try:
            umount(os.fsencode(point), MNT_DETACH)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Processes.
# ---------------------------------------------------------------------------
def children_of(pid: int) -> List[int]:
    """List the direct children of *pid* (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(name))
    return out


def kill_descendants(exclude: Tuple[int, ...] = ()) -> None:
    """Kill and reap every descendant of this (subreaper) process."""
    me = os.getpid()
    for _ in range(50):
        victims = [pid for pid in children_of(me) if pid not in exclude]
        if not victims:
            return
        for pid in victims:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in victims:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass


def command_user(mode: str, boot: Dict[str, Any]) -> Optional[Tuple[int, int, List[int]]]:
    """The ids the command runs with when they are not this agent's own: (uid, gid, groups) or None.

    The command runs as the local user, so the host's kernel makes the
    permission checks the local kernel would make for that user: in a user
    namespace the local ids are already the agent's; as root on the host, a
    local user other than root gets its uid, gid and supplementary groups.
    """
    if mode != "root":
        return None
    try:
        uid, gid = int(boot.get("uid", 0)), int(boot.get("gid", 0))
        groups = [int(g) for g in boot.get("groups") or [gid]][:256]
    except (TypeError, ValueError):
        return None
    if uid == 0 or uid < 0 or gid < 0:
        return None
    return uid, gid, groups


class Command:
    """The command: spawned chrooted (or not), stdio wired to fds or pipes."""

    def __init__(self, spec: Dict[str, Any], root: Optional[str],
                 stdio: Optional[Tuple[int, int, int]] = None,
                 user: Optional[Tuple[int, int, List[int]]] = None) -> None:
        self.spec = spec
        self.root = root
        self.tty = bool(spec.get("tty")) and stdio is None
        self.master: Optional[int] = None
        argv = [P.name_from_wire(a) for a in spec["argv"]]
        env = {P.name_from_wire(k): P.name_from_wire(v) for k, v in (spec.get("env") or {}).items()}
        cwd = P.name_from_wire(spec.get("cwd") or "/")
        root_b = os.fsencode(root) if root else None
        slave: Optional[int] = None
        if stdio is not None:
            stdin, stdout, stderr = stdio
        elif self.tty:
            self.master, slave = os.openpty()
            set_winsize(self.master, int(spec.get("rows") or 24), int(spec.get("cols") or 80))
            stdin = stdout = stderr = slave
        else:
            stdin = stdout = stderr = subprocess.PIPE
        tty = self.tty
        umask = int(spec.get("umask", 0o022))

        def prepare() -> None:
            # Runs in the child between fork and exec: only plain syscalls here.
            os.umask(umask)
            if root_b is not None:
                os.chroot(root_b)
            try:
                os.chdir(cwd)
            except OSError:
                os.chdir(b"/")
            if user is not None:  # before PR_SET_PDEATHSIG: a change of ids clears it
                os.setgroups(user[2])
                os.setgid(user[1])
                os.setuid(user[0])
            if tty:
                import fcntl
                fcntl.ioctl(0, TIOCSCTTY, 0)
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

        try:
            self.proc = subprocess.Popen(
                argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env,
                start_new_session=True, preexec_fn=prepare, close_fds=True)
        finally:
            if slave is not None:
                os.close(slave)

    def signal(self, signum: int) -> None:
        """Deliver *signum* to the command's process group."""
        try:
            os.killpg(self.proc.pid, signum)
        except OSError:
            try:
                self.proc.send_signal(signum)
            except OSError:
                pass

    def kill_group(self) -> None:
        """SIGKILL whatever is left of the command's process group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Set a terminal's window size."""
    import fcntl
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def exit_code(returncode: int) -> int:
    """Turn a Popen return code into a shell-style status."""
    return 128 - returncode if returncode < 0 else returncode


# ---------------------------------------------------------------------------
# Sessions.
# ---------------------------------------------------------------------------
class Profile:
    """The paths a command looked up in its last session, for a warm start of the next one.

    Kept next to the file cache, one small JSON list per command (its first two
    words and the mode), written under a temporary name and renamed. Only the
    names are kept: every answer comes fresh from the local side at start.
    """

    #: How long warm-start answers stand (NFS's acregmin is 3 s too).
    TTL = 3.0
    LIMIT = P.PROFILE_NAMES

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: Dict[str, None] = {}

    @classmethod
    def for_command(cls, files: Optional[FileCache], boot: Dict[str, Any]) -> Optional["Profile"]:
        if files is None or not boot.get("argv"):
            return None
        name = P.profile_key(boot["argv"], bool(boot.get("files_only"))) + ".json"
        return cls(os.path.join(files.directory + ".profiles", name))

    def record(self, path: str) -> None:
        if len(self.seen) < self.LIMIT:
            self.seen[path] = None

    def load(self) -> List[str]:
        try:
            with open(self.path, "rb") as handle:
                paths = json.loads(handle.read().decode("utf-8", "surrogateescape"))
        except (OSError, ValueError):
            return []
        return [p for p in paths if isinstance(p, str)][:self.LIMIT] if isinstance(paths, list) else []

    def save(self) -> None:
        if not self.seen:
            return
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".tmp-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(json.dumps(list(self.seen)).encode("utf-8", "surrogateescape"))
            os.rename(tmp, self.path)
        except OSError as exc:
            LOG.debug("profile %s not saved: %s", self.path, exc)


def open_file_cache(boot: Dict[str, Any]) -> Optional[FileCache]:
    """Return the host's file cache for the local machine named in *boot* (None: no cache).

    Opened before entering namespaces, as the connecting user, under
    ``$XDG_CACHE_HOME`` (default ``~/.cache``)``/remote-runner/files/<origin>``.
    """
    origin = boot.get("cache")
    if not isinstance(origin, str) or not origin.isalnum():
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(base, "remote-runner", "files", origin)
    try:
        return FileCache(directory, int(boot.get("cache_limit") or FILE_CACHE_LIMIT))
    except (OSError, ValueError) as exc:
        LOG.warning("file cache %s unusable (%s): reading files through the link", directory, exc)
        return None


class Session:
    """One mirror on this host: namespaces, mounts, and the command(s) run in it."""

    def __init__(self, link: Link, boot: Dict[str, Any]) -> None:
        self.link = link
        self.boot = boot
        self.files_only = bool(boot.get("files_only"))
        self.mounts: List[Mount] = []
        self.root: Optional[str] = None
        self.workdir = tempfile.mkdtemp(prefix="rr-mirror-")
        os.chmod(self.workdir, 0o700)
        self.created: List[str] = []
        self.user: Optional[Tuple[int, int, List[int]]] = None
        self.files = open_file_cache(boot)
        self.cache = AttrCache()
        self.profile = Profile.for_command(self.files, boot)

    def setup(self) -> None:
        """Enter namespaces and mount the mirror (or the exported trees)."""
        check_fuse_device()
        lib = choose_libfuse()
        mode = enter_namespaces(int(self.boot.get("uid", os.getuid())), int(self.boot.get("gid", os.getgid())))
        self.user = command_user(mode, self.boot)
        LOG.debug("namespaces: %s, libfuse: %s, command ids: %s", mode, lib, self.user)
        self.link.start()
        if self.files is not None:
            threading.Thread(target=self.files.trim, daemon=True, name="cache-trim").start()
        self.warm()  # before mounting: the mount's own lookups are answered too
        if self.files_only:
            for export in self.boot.get("exports") or []:
                path = P.name_from_wire(export)
                self._ensure_dir(path)
                m = Mount(self.link, os.fsdecode(path), path, system=False, files=self.files,
                          cache=self.cache, profile=self.profile)
                m.start()
                self.mounts.append(m)
        else:
            self.root = os.path.join(self.workdir, "root")
            os.mkdir(self.root)
            m = Mount(self.link, self.root, b"", system=True, files=self.files, cache=self.cache,
                      profile=self.profile)
            m.start()
            self.mounts.append(m)
            bind_specials(self.root)

    def warm(self) -> int:
        """Validate known names in one request and fetch missing files at once; return the names.

        The names are those the mount itself looks up (the root and the
        directories the host's own are bound over), those this command looked
        up here last time, and those the local side saw it look up anywhere
        (its own profile). The answers (attributes, "missing", symlink targets)
        are fresh local lookups, kept for ``Profile.TTL`` seconds, so the
        program's start finds them here instead of asking one by one. Files the
        profile lists that this host has no current copy of are fetched
        together, before the command starts.
        """
        if self.files is None:
            return 0
        known = self.profile.load() if self.profile is not None else []
        if not self.files_only:
            known = list(dict.fromkeys(["/"] + ["/" + d for d in SPECIAL_DIRS] + known))
        reply = validate(self.link, known)
        if reply is None:
            return 0
        names, answers, whole = reply
        wanted = wanted_files(self.files, whole)
        if wanted:
            started = time.monotonic()
            prefetch(self.link, self.files, wanted)
            if time.monotonic() - started > 0.5:  # answers grew old while files came in
                fresh = validate(self.link, names)
                if fresh is not None:
                    names, answers = fresh[0], fresh[1]
        remember_answers(self.cache, names, answers, time.monotonic())
        return len(names)

    def _ensure_dir(self, path: bytes) -> None:
        missing = []
        cur = path
        while not os.path.isdir(cur) and cur not in (b"/", b""):
            missing.append(cur)
            cur = os.path.dirname(cur)
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            self.created.append(os.fsdecode(d))

    def teardown(self) -> None:
        """Save the lookup profile, unmount everything and remove what we created."""
        if self.profile is not None:
            self.profile.save()
        if self.root:
            unmount_under(self.root)
        for m in reversed(self.mounts):
            m.stop()
        for d in reversed(self.created):
            try:
                os.rmdir(d)
            except OSError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)


def _pump(fd: int, send: Callable[[bytes], None]) -> None:
    """Copy from *fd* to *send* until EOF (EIO on a pty counts as EOF)."""
    while True:
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break
        send(data)


def run_exec(link: Link, boot: Dict[str, Any]) -> int:
    """Run one command in the mirror with its stdio carried over the link."""
    session = Session(link, boot)
    command: Optional[Command] = None
    # Input that arrives while the mirror is being mounted waits for the command.
    stdin_queue: "queue.Queue[Optional[bytes]]" = queue.Queue()
    early_signals: List[int] = []
    started: List[Command] = []
    lock = threading.Lock()

    def on_stdin(header: Dict[str, Any], payload: bytes) -> None:
        stdin_queue.put(payload if payload else None)

    def on_signal(header: Dict[str, Any], payload: bytes) -> None:
        with lock:
            if started:
                started[0].signal(int(header.get("n", signal.SIGTERM)))
            else:
                early_signals.append(int(header.get("n", signal.SIGTERM)))

    def on_winch(header: Dict[str, Any], payload: bytes) -> None:
        with lock:
            if started and started[0].master is not None:
                set_winsize(started[0].master, int(header["rows"]), int(header["cols"]))

    link.handlers[P.STDIN] = on_stdin
    link.handlers[P.SIGNAL] = on_signal
    link.handlers[P.WINCH] = on_winch
    try:
        session.setup()
        try:
            command = Command(boot, session.root, user=session.user)
        except OSError as exc:
            # Like a shell: 127 for a missing program, 126 when it cannot be run.
            name = P.name_from_wire(boot["argv"][0]) if boot.get("argv") else b"?"
            link.send({"t": P.STDERR}, b"remote-runner: %s: %s\n" % (name, (exc.strerror or str(exc)).encode()))
            status = 127 if exc.errno == errno.ENOENT else 126
            link.send({"t": P.EXIT, "status": status})
            return status
        cmd = command
        with lock:
            started.append(cmd)
            for signum in early_signals:
                cmd.signal(signum)
        in_fd = cmd.master if cmd.master is not None else cmd.proc.stdin.fileno()

        def feed_stdin() -> None:
            while True:
                data = stdin_queue.get()
                if data is None:
                    if cmd.master is None:
                        try:
                            cmd.proc.stdin.close()
                        except OSError:
                            pass
                    else:
                        try:
                            os.write(cmd.master, b"\x04")
                        except OSError:
                            pass
                    return
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(in_fd, view):]
                except OSError:
                    return

        threading.Thread(target=feed_stdin, daemon=True).start()
        pumps = []
        if cmd.master is not None:
            pumps.append((cmd.master, P.STDOUT))
        else:
            pumps.append((cmd.proc.stdout.fileno(), P.STDOUT))
            pumps.append((cmd.proc.stderr.fileno(), P.STDERR))
        threads = []
        for fd, kind in pumps:
            t = threading.Thread(target=_pump, args=(fd, lambda d, k=kind: link.send({"t": k}, d)),
                                 daemon=True)
            t.start()
            threads.append(t)
        link.send({"t": P.READY, "pid": cmd.proc.pid})

        while True:
            try:
                returncode = cmd.proc.wait(0.2)
                break
            except subprocess.TimeoutExpired:
                if link.lost.is_set():
                    LOG.warning("link lost (%s): killing the command", link.lost_reason)
                    cmd.kill_group()
                    kill_descendants()
                    cmd.proc.wait()
                    return EXIT_LINK
        cmd.kill_group()
        kill_descendants()
        for t in threads:
            t.join(5.0)
        status = exit_code(returncode)
        link.send({"t": P.EXIT, "status": status})
        return status
    except OSError as exc:
        LOG.debug("exec failed", exc_info=True)
        link.send({"t": P.FAIL, "msg": str(exc), "errno": exc.errno})
        if command is not None:
            command.kill_group()
        kill_descendants()
        return EXIT_LINK
    finally:
        session.teardown()


# -- daemon mode ---------------------------------------------------------------
def run_daemon(link: Link, boot: Dict[str, Any]) -> int:
    """Keep the mirror and run registered jobs for ``attach`` clients until the link ends."""
    session = Session(link, boot)
    jobs: Dict[str, Dict[str, Any]] = {}
    jobs_cond = threading.Condition()
    running: Dict[int, Command] = {}

    def on_job(header: Dict[str, Any], payload: bytes) -> None:
        with jobs_cond:
            jobs[str(header["job"])] = header
            jobs_cond.notify_all()

    link.handlers[P.JOB] = on_job
    try:
        session.setup()
    except OSError as exc:
        link.send({"t": P.FAIL, "msg": str(exc), "errno": exc.errno})
        session.teardown()
        return EXIT_LINK
    sock_dir = tempfile.mkdtemp(prefix="rr-mirror-sock-")
    os.chmod(sock_dir, 0o700)
    sock_path = os.path.join(sock_dir, "agent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(16)

    def serve_client(conn: socket.socket) -> None:
        command: Optional[Command] = None
        try:
            msg, fds = recv_fds(conn)
            request = json.loads(msg.decode("utf-8"))
            with jobs_cond:
                jobs_cond.wait_for(lambda: str(request.get("job")) in jobs or link.lost.is_set(), 30.0)
                spec = jobs.pop(str(request.get("job")), None)
            if spec is None or len(fds) != 3:
                conn.sendall(json.dumps({"error": "unknown job %r" % request.get("job")}).encode() + b"\n")
                return
            try:
                command = Command(spec, session.root, stdio=(fds[0], fds[1], fds[2]), user=session.user)
            except OSError as exc:
                conn.sendall(json.dumps({"error": str(exc), "status": 127}).encode() + b"\n")
                return
            finally:
                for fd in fds:
                    os.close(fd)
            running[command.proc.pid] = command
            conn.sendall(json.dumps({"pid": command.proc.pid}).encode() + b"\n")
            threading.Thread(target=_relay_signals, args=(conn, command), daemon=True).start()
            returncode = command.proc.wait()
            command.kill_group()
            if link.lost.is_set():
                reply = {"error": "link lost (%s): the mirror is gone, the command was stopped"
                         % link.lost_reason, "status": EXIT_LINK}
            else:
                reply = {"status": exit_code(returncode)}
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except (OSError, ValueError) as exc:
            LOG.debug("attach client failed: %s", exc)
        finally:
            if command is not None:
                running.pop(command.proc.pid, None)
            conn.close()

    def accept_loop() -> None:
        while not link.lost.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve_client, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    link.send({"t": P.READY, "socket": sock_path, "pid": os.getpid()})
    link.lost.wait()
    LOG.debug("daemon ending: %s", link.lost_reason)
    server.close()
    for command in list(running.values()):
        command.kill_group()
    kill_descendants()
    shutil.rmtree(sock_dir, ignore_errors=True)
    session.teardown()
    return 0


def _relay_signals(conn: socket.socket, command: Command) -> None:
    buf = b""
    while True:
        try:
            data = conn.recv(4096)
        except OSError:
            return
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                command.signal(int(json.loads(line.decode("utf-8"))["sig"]))
            except (ValueError, KeyError, TypeError):
                continue


def recv_fds(conn: socket.socket, maxfds: int = 3) -> Tuple[bytes, List[int]]:
    """Receive one message line plus file descriptors (SCM_RIGHTS)."""
    fds = array.array("i")
    msg, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(maxfds * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
    return msg, list(fds)


def attach(sock_path: str, job: str) -> int:
    """Hand our stdio to the daemon, forward signals, exit with the command's status."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(sock_path)
        msg = json.dumps({"job": job}).encode("utf-8") + b"\n"
        conn.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    except OSError as exc:
        sys.stderr.write("remote-runner mirror: cannot reach the mirror agent at %s: %s\n" % (sock_path, exc))
        return EXIT_LINK

    def forward(signum: int, _frame: Any) -> None:
        try:
            conn.sendall(json.dumps({"sig": signum}).encode() + b"\n")
        except OSError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    buf = b""
    while True:
        try:
            data = conn.recv(4096)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            sys.stderr.write("remote-runner mirror: the mirror agent went away (link lost)\n")
            return EXIT_LINK
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            reply = json.loads(line.decode("utf-8"))
            if "error" in reply:
                sys.stderr.write("remote-runner mirror: %s\n" % reply["error"])
                return int(reply.get("status", EXIT_LINK))
            if "status" in reply:
                return int(reply["status"])


# ---------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------
def _claim_stdio() -> Tuple[int, int]:
    """Move the link off fds 0/1 so nothing else (libfuse, children) can write into it."""
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    for fd in (in_fd, out_fd):
        os.set_inheritable(fd, False)
    return in_fd, out_fd


def serve(mode: str) -> int:
    """Run the agent's framed session on stdin/stdout."""
    in_fd, out_fd = _claim_stdio()
    link = Link(in_fd, out_fd)
    link.send({"t": P.HELLO, "v": P.PROTOCOL_VERSION, "machine": platform.machine(),
               "lz4": P.lz4_available(), "uid": os.geteuid(), "python": sys.version.split()[0],
               "executable": sys.executable, "agent": os.path.abspath(sys.argv[0])})
    try:
        header, _ = P.read_frame(link.reader)
    except P.ProtocolError as exc:
        LOG.error("no boot frame: %s", exc)
        return EXIT_LINK
    if header.get("t") != P.BOOT:
        return EXIT_LINK
    problem = P.check_version(header.get("v"))
    if problem is None and header.get("machine") != platform.machine():
        problem = "local machine is %s but this host is %s" % (header.get("machine"), platform.machine())
    if problem:
        link.send({"t": P.FAIL, "msg": problem})
        return EXIT_LINK
    link.writer.compress = bool(header.get("compress")) and P.lz4_available()
    link.heartbeat = float(header.get("hb") or DEFAULT_HEARTBEAT)
    link.deadline = float(header.get("deadline") or DEFAULT_DEADLINE)
    link.request_timeout = float(header.get("rq") or REQUEST_TIMEOUT)
    logging.getLogger().setLevel(logging.DEBUG if header.get("debug") else logging.WARNING)
    logging.getLogger("fuse").setLevel(logging.DEBUG if header.get("debug_fuse") else logging.WARNING)
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError:
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, f: link.mark_lost("agent got signal %d" % s))
    if mode == "daemon":
        return run_daemon(link, header)
    return run_exec(link, header)


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``exec`` / ``daemon`` / ``attach``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="agent: %(levelname)s: %(message)s")
    if not argv:
        sys.stderr.write("usage: agent (exec | daemon | attach --socket S --job J)\n")
        return 2
    if argv[0] in ("exec", "daemon"):
        code = serve(argv[0])
        sys.stderr.flush()
        os._exit(code)
    if argv[0] == "attach":
        opts = dict(zip(argv[1::2], argv[2::2]))
        if "--socket" not in opts or "--job" not in opts:
            sys.stderr.write("usage: agent attach --socket S --job J\n")
            return 2
        return attach(opts["--socket"], opts["--job"])
    sys.stderr.write("unknown agent mode %r\n" % argv[0])
    return 2


if __name__ == "__main__":
    sys.exit(main())
