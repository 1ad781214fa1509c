"""What the host keeps to save round trips: whole copies of files, fetched ahead.

Why apart: the caches decide what may be answered without asking this
machine, so their rules ("current" = same size, mtime and inode) are kept
together, away from the FUSE operations that consult them. Names and
attributes are kept by :mod:`.names` (until the local side says they changed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .. import protocol as P
from .link import Link
from .answers import absorb_answers, absorb_listings
from .basis import Staged, discard, stage, unlink_quietly
from .names import NameCache, absolute_names

LOG = logging.getLogger("remote_runner.mirror.agent")

#: File handles at or above this are copies in the :class:`FileCache`, not local handles.
LOCAL_FH_BASE = 1 << 48
#: libfuse 3's FUSE_CAP_CACHE_SYMLINKS (fuse_common.h).
FUSE_CAP_CACHE_SYMLINKS = 1 << 23
#: libfuse >= 3.16's FUSE_CAP_DIRECT_IO_ALLOW_MMAP: a ``direct_io`` file may be mapped shared.
FUSE_CAP_DIRECT_IO_ALLOW_MMAP = 1 << 28
#: Default size limit of the host's file cache (``boot`` may set another).
FILE_CACHE_LIMIT = 2 << 30
#: At most this many bytes are fetched ahead at a session's start.
PREFETCH_LIMIT = 512 << 20
PREFETCH_BATCH = 64 << 20
#: Batches fetched at once (the memory held is at most this many batches).
BATCHES_IN_FLIGHT = 2
#: A copy is current when [size, mtime_ns, ino, ctime_ns] match (older copies, keyed
#: without ctime, are never matched and are trimmed like any other).
META_FIELDS = 4


def copy_key(attrs: Dict[str, Any]) -> List[Any]:
    """The copy key of a name's attributes: what a whole copy of its file must match
    ([size, mtime_ns, ino, ctime_ns], as the local side's ``whole_meta``)."""
    return [attrs.get("st_size"), attrs.get("st_mtime"), attrs.get("st_ino"), attrs.get("st_ctime")]


class FileCache:
    """Whole copies of local files opened read-only, kept on this host between sessions.

    A program start opens hundreds of files (libraries, modules, data) and the
    kernel reads each in many small requests, one round trip apiece. Instead, a
    read-only open asks for the whole file (up to ``WHOLE_LIMIT``) with the
    size, mtime, inode and ctime of the copy held here; the local side answers "still
    current" without data, or sends the file (first chunk in the reply, the
    rest as parallel reads). Reads, flush and release are then served from the
    copy with no round trip. Copies are named ``<sha1 of path>-<size>-<mtime_ns>-<ino>-<ctime_ns>``
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
        #: Names fetched ahead this session, and those of them the command then opened:
        #: told to the local side at the end, which keeps in its profiles only what was used.
        self.fetched_ahead: Set[str] = set()
        self.used_ahead: Dict[str, None] = {}
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in os.listdir(directory):
            parts = name.split("-")
            if len(parts) == 1 + META_FIELDS and all(p.isdigit() for p in parts[1:]):
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
        """Return [size, mtime_ns, ino, ctime_ns] of the copy of *path*, if there is one."""
        entry = self._index.get(self.key(path))
        return entry[0] if entry else None

    def opened(self, path: str) -> None:
        """The command opened *path* through its copy here (see :attr:`used_ahead`)."""
        if path in self.fetched_ahead and len(self.used_ahead) < P.PROFILE_NAMES:
            self.used_ahead[path] = None

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
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            self._keep(path, meta, tmp)
        except BaseException:
            os.close(fd)
            unlink_quietly(tmp)
            raise
        return fd

    def adopt(self, path: str, meta: List[int], staged: Staged) -> Optional[int]:
        """Keep this host's own copy of *path* (see :mod:`.basis`) as its copy; return an fd on it."""
        try:
            fd = os.open(staged.tmp, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            discard(staged)
            return None
        try:
            self._keep(path, meta, staged.tmp)
        except OSError as exc:
            os.close(fd)
            discard(staged)
            LOG.warning("file cache: cannot keep a copy in %s: %s", self.directory, exc)
            return None
        return fd

    def _keep(self, path: str, meta: List[int], tmp: str) -> None:
        """Rename the finished copy *tmp* to *path*'s copy of version *meta*; drop the older one."""
        key = self.key(path)
        name = "-".join([key] + ["%d" % int(v) for v in meta[:META_FIELDS]])
        os.rename(tmp, os.path.join(self.directory, name))
        with self._lock:
            old = self._index.get(key)
            self._index[key] = (list(meta), name)
        if old is not None and old[1] != name:
            unlink_quietly(os.path.join(self.directory, old[1]))

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
            unlink_quietly(path)
            total -= size


def fetch_rest(link: Link, items: List[Tuple[Optional[int], bytes, int]]
               ) -> List[Optional[List[bytes]]]:
    """Complete whole files: per (handle, first chunk, size), all chunks; None if it failed.

    The remaining chunks of every file are requested at once: one round trip
    for any number of files. The local handles are then released without
    waiting (their numbers are never given again, so nothing can follow a
    release that it could overtake).
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
    for fh, _, _ in items:
        if fh is not None:
            link.post("release", {"fh": fh})
    for i, (_, _, size) in enumerate(items):
        chunks = out[i]
        if chunks is not None and sum(len(c) for c in chunks) != size:
            out[i] = None  # the file changed while it was sent
    return out


def prefetch(link: Link, files: FileCache, wanted: List[Tuple[str, List[int]]],
             after_batch: Optional[Callable[[], None]] = None) -> int:
    """Fetch the files *wanted* ((name, meta) the local side listed) into *files*, all at once.

    At most ``PREFETCH_LIMIT`` bytes, in batches of ``PREFETCH_BATCH`` bytes,
    ``BATCHES_IN_FLIGHT`` at a time (the memory it holds); a file that changed
    since it was listed is simply not stored. An open of a listed file waits
    until that file is stored (:meth:`FileCache.wait_for`) rather than
    fetching it a second time; *after_batch* runs after each batch. Returns
    how many copies were stored.
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
    # Two batches at a time: the next one's opens and first chunks travel while
    # this one's last chunks arrive, so the link never idles between batches.
    stored = [0]
    lock = threading.Lock()
    gate = threading.Semaphore(BATCHES_IN_FLIGHT)

    sizes = {name: meta[0] for name, meta in wanted}

    def run(batch: List[str]) -> None:
        try:
            count = _prefetch_batch(link, files, batch, sizes)
            with lock:
                stored[0] += count
        finally:
            files.arrived(batch)
            gate.release()
            if after_batch is not None:
                after_batch()

    running = []
    for batch in batches:
        if batch:
            gate.acquire()
            running.append(threading.Thread(target=run, args=(batch,), daemon=True, name="fetch-batch"))
            running[-1].start()
    for thread in running:
        thread.join()
    return stored[0]


def wanted_files(files: FileCache, whole: List[Any]) -> List[Tuple[str, List[int]]]:
    """Of the (name, [size, mtime_ns, ino, ctime_ns]) entries the local side listed, those with no current copy here."""
    return [(p, m) for p, m in whole if isinstance(p, str) and isinstance(m, list)
            and len(m) == META_FIELDS and all(isinstance(v, int) for v in m) and files.lookup(p) != m]


def validate(link: Link, paths: List[str]) -> Optional[Tuple[List[str], List[Any], List[Any], List[Any]]]:
    """Send one ``validate`` for *paths*; return (names, answers, whole, watched) or None if it failed."""
    reply = validate_all(link, paths)
    return None if reply is None else reply[:4]


def validate_all(link: Link, paths: List[str], dirs: Optional[List[List[str]]] = None, own: bool = False
                 ) -> Optional[Tuple[List[str], List[Any], List[Any], List[Any], List[Any], List[Any], List[Any]]]:
    """One ``validate`` for *paths* and the kept directory answers *dirs* ([directory, digest]).

    *own*: this host has a profile of its own for the command (the local side
    then seeds the answer with the command's own profile only).
    Returns (names, answers, whole, watched, directory answers, directories watched, directories
    the host may change without asking), or None.
    """
    args: Dict[str, Any] = {"dirs": dirs} if dirs else {}
    if own:
        args["own"] = 1
    try:
        _, data = link.call("validate", args, b"\0".join(P.name_from_wire(p) for p in paths))
        reply = json.loads(data.decode("utf-8"))
        return (list(reply["names"]), list(reply["answers"]), list(reply["whole"]),
                list(reply.get("w") or []), list(reply.get("dirs") or []), list(reply.get("dw") or []),
                absolute_names(reply.get("wr")))
    except (OSError, ValueError, KeyError, TypeError, P.ProtocolError) as exc:
        LOG.debug("validation skipped: %s", exc)
        return None


def fetch_ahead(link: Link, files: FileCache, cache: NameCache, listing: Dict[str, Any],
                since: Optional[int] = None) -> None:
    """Take a ``validate``-style *listing* (names, answers, whole files) and fetch its files.

    The answers are kept at once; the files are fetched in parallel batches
    while the caller goes on. Answers older than a second are renewed after
    each batch (one ``validate``), so lookups still find fresh ones when the
    last batch lands.
    """
    names, answered = list(listing.get("names") or []), [time.monotonic()]
    watched = list(listing.get("w") or [])
    absorb_answers(cache, names, list(listing.get("answers") or []), watched, since)
    absorb_listings(cache, listing.get("dirs"), since)
    wanted = wanted_files(files, list(listing.get("whole") or []))
    if not wanted:
        return

    def renew() -> None:
        if time.monotonic() - answered[0] > 1.0 and not all(watched):
            token = cache.begin()
            fresh = validate(link, names)
            if fresh is not None:
                answered[0] = time.monotonic()
                absorb_answers(cache, fresh[0], fresh[1], fresh[3], token)

    files.expect([name for name, _ in wanted])  # before the thread runs: the next open must wait
    threading.Thread(target=prefetch, args=(link, files, wanted, renew), daemon=True,
                     name="fetch-ahead").start()


def _prefetch_batch(link: Link, files: FileCache, batch: List[str], sizes: Dict[str, int]) -> int:
    """Fetch *batch*: each file that fits its first answer is stored as it comes (the batch is
    in the order the program will want it), the bigger ones once their rest is read.

    A file this host has of the same size at the same path is copied first and
    offered by its SHA-1 (:mod:`.basis`); one the local side calls the same is
    kept with no data sent.
    """
    staged = {name: copy for name, copy in ((n, stage(files.directory, n, sizes.get(n, 0))) for n in batch)
              if copy is not None}
    try:
        # O_NONBLOCK: a name replaced by a FIFO since it was listed must not block a local worker.
        replies = link.call_each("open", [dict({"path": name, "flags": os.O_RDONLY | os.O_NONBLOCK,
                                                "whole": True, "have": None, "ahead": 1},
                                               **({"basis": staged[name].digest} if name in staged else {}))
                                          for name in batch])
        items, names = [], []
        stored = 0
        for name, reply in zip(batch, replies):
            copy = staged.pop(name, None)
            if isinstance(reply, OSError):
                discard(copy)
                files.arrived([name])
                continue
            header, first = reply
            meta = header.get("whole")
            if meta and copy is not None and header.get("basis") == 1:
                stored += _adopt_ahead(link, files, name, meta, copy)
                continue
            discard(copy)
            if not meta:
                if "fh" in header:
                    link.post("release", {"fh": header["fh"]})
                files.arrived([name])
            elif "fh" in header:
                items.append((header["fh"], first, int(meta[0])))
                names.append((name, meta))
            else:
                stored += _store_ahead(files, name, meta, [first] if len(first) == int(meta[0]) else None)
        for (name, meta), chunks in zip(names, fetch_rest(link, items)):
            stored += _store_ahead(files, name, meta, chunks)
        return stored
    finally:
        for copy in staged.values():
            discard(copy)


def _store_ahead(files: FileCache, name: str, meta: List[int], chunks: Optional[List[bytes]]) -> int:
    """Keep a file fetched ahead (*chunks* None: it changed on the way); 1 if it was stored."""
    stored = 0
    if chunks is not None:
        fd = files.store_quietly(name, meta, chunks)
        if fd is not None:
            os.close(fd)
            files.fetched_ahead.add(name)
            stored = 1
    files.arrived([name])  # an open waiting for this one goes on
    return stored


def _adopt_ahead(link: Link, files: FileCache, name: str, meta: List[int], copy: Staged) -> int:
    """Keep this host's own copy of a file fetched ahead (the local side said it is the same)."""
    fd = files.adopt(name, meta, copy)
    if fd is not None:
        os.close(fd)
        files.fetched_ahead.add(name)
        link.answer_here("basis")
    files.arrived([name])
    return 0 if fd is None else 1


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
