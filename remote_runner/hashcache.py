"""SHA-1s of local source files, remembered across runs while the file's stat is the same.

A rerun compares every source with its copy on the host by SHA-1; hashing the
whole local tree each time costs as much as the host-side check the manifest
(:mod:`remote_runner.manifest`) saves. So the hashes are kept under
``$XDG_CACHE_HOME/remote-runner/sha1/`` (``~/.cache/...``), keyed by the absolute
path and the full stat (size, mtime_ns, ctime_ns, inode, device): any write,
``touch -d`` or replacement changes the ctime or the inode, so a cached hash is
never used for content it was not computed from. A hash is only kept when the
file's stat was the same before and after reading it.

The cache is split into 256 bucket files by the SHA-1 of each file's
directory, and a run reads only the buckets of the directories it looks up. One
file held every source this user ever copied: at 31,000 entries (5.7 MB, two
thirds of them for files long gone) reading it cost 50 ms of every rerun, more
than the whole difference to rsync's; a tree of 56 directories now reads a fifth
of that, and a run's cost follows its own sources, not the user's history.

Within one process a file is hashed at most once, however many hosts want it
(threads wanting the same file wait for the one hashing it). :meth:`save` runs
under ``flock`` (two runs at once keep both their entries) and costs what the
run added, not what the cache holds: each bucket is a base line (the bucket
when it was last rewritten) followed by one journal line per save, each with
that save's new entries (a later line wins). Rewriting and checking every entry
on each save took 70 ms at 8,500 entries, at the end of every run that hashed
one file. Once a bucket's journal outgrows its base (or :data:`JOURNAL_MIN`), a
save rewrites that bucket instead: merged, without entries whose file changed or
is gone, replaced atomically. A line cut short by a crash is skipped (the next
save starts on a line of its own); a bucket that cannot be read or parsed counts
as empty; one that cannot be written only costs the next run its hashing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from remote_runner.cachedir import cache_dir
from remote_runner.digests import is_sha1

LOG = logging.getLogger(__name__)

Key = Tuple[int, int, int, int, int]
#: Seconds :meth:`LocalHashes.save` waits for another run's lock before giving up.
LOCK_WAIT = 10.0
#: Journal bytes a save may leave after a bucket's base line, at least (see the module docstring).
JOURNAL_MIN = 16 << 10
#: The single file earlier versions kept every entry in; removed at the first save.
OLD_FILE = "sha1-cache.json"


def default_path() -> str:
    """``$XDG_CACHE_HOME/remote-runner/sha1`` (``~/.cache`` by default): the buckets' directory."""
    return cache_dir("sha1")


def bucket_of(name: str) -> str:
    """The bucket holding absolute path *name*: two hex digits of its directory's SHA-1."""
    folder = os.path.dirname(name)
    bucket = _buckets.get(folder)
    if bucket is None:  # (a run looks up thousands of files in a few directories)
        bucket = _buckets[folder] = hashlib.sha1(
            folder.encode("utf-8", "surrogateescape")).hexdigest()[:2]
    return bucket


#: Directory -> its bucket, for :func:`bucket_of` (a few hundred directories per run).
_buckets: Dict[str, str] = {}


def stat_key(st: os.stat_result) -> Key:
    """What must stay equal for a remembered hash to hold."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def hash_file(path: str) -> Tuple[str, Optional[Key]]:
    """Return (hex SHA-1, stat key) of *path*; the key is None when the file changed meanwhile."""
    with open(path, "rb") as handle:
        before = stat_key(os.fstat(handle.fileno()))
        digest, _ = _sha1_of(handle.fileno())
        after = stat_key(os.fstat(handle.fileno()))
    steady = before == after == stat_key(os.stat(path))
    return digest, before if steady else None


def _sha1_of(fd: int) -> Tuple[str, int]:
    """(hex SHA-1, bytes read) of what descriptor *fd* holds, read from its start."""
    digest, offset = hashlib.sha1(), 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return digest.hexdigest(), offset
        digest.update(chunk)
        offset += len(chunk)


class LocalHashes:
    """The local SHA-1 cache (one per process is enough: :data:`LOCAL`)."""

    def __init__(self, path: Optional[str] = None) -> None:
        #: The buckets' directory (:func:`default_path` when None).
        self.path = path
        self._lock = threading.Lock()
        #: bucket -> its entries, for the buckets read so far
        self._loaded: Dict[str, Dict[str, Any]] = {}
        self._new: Dict[str, List] = {}
        self._busy: Dict[str, threading.Lock] = {}

    def sha1(self, path: str, rehash: bool = False) -> str:
        """The hex SHA-1 of local file *path*: remembered, or computed (and remembered).

        *rehash* ignores what earlier runs remembered (this run's own hashes still count).
        """
        name = os.path.abspath(path)
        with self._lock:
            busy = self._busy.setdefault(name, threading.Lock())
        with busy:
            key = stat_key(os.stat(name))
            known = self._lookup(name, key, rehash)
            if known is not None:
                return known
            digest, steady = hash_file(name)
            if steady is not None:
                with self._lock:
                    self._new[name] = [*steady, digest]
            return digest

    def sha1_of_open(self, path: str, fd: int) -> Optional[str]:
        """The hex SHA-1 of the file open as *fd* (named *path*): remembered, or read through *fd*.

        None when the file changed while it was read.
        """
        name = os.path.abspath(path)
        key = stat_key(os.fstat(fd))
        known = self._lookup(name, key, False)
        if known is not None:
            return known
        digest, size = _sha1_of(fd)
        if stat_key(os.fstat(fd)) != key or size != key[0]:
            return None
        with self._lock:
            self._new[name] = [*key, digest]
        return digest

    def remember(self, path: str, fd: int, data: bytes, before: Key) -> None:
        """Remember the SHA-1 of *data*, read whole from *fd* (named *path*) after its stat *before*.

        Kept only when the file's stat after the read is still *before* and its size is
        the data's (as :func:`hash_file` keeps a hash); a file this run or an earlier one
        hashed for that stat already (the copy step's comparison) is not hashed again.
        """
        if before[0] != len(data) or stat_key(os.fstat(fd)) != before:
            return
        name = os.path.abspath(path)
        if self._lookup(name, before, False) is None:
            digest = hashlib.sha1(data).hexdigest()
            with self._lock:
                self._new[name] = [*before, digest]

    def known(self, path: str, seen: Optional[Key] = None) -> Optional[str]:
        """The SHA-1 of *path* if this run or an earlier one computed it for its current stat.

        *seen*: its stat key as the caller's plan took it (the hash then matches
        what that plan said of the file: its size), instead of a new ``stat``.
        """
        name = os.path.abspath(path)
        if seen is None:
            try:
                seen = stat_key(os.stat(name))
            except OSError:
                return None
        return self._lookup(name, seen, False)

    def _lookup(self, name: str, key: Key, rehash: bool) -> Optional[str]:
        with self._lock:
            entry = self._new.get(name)
            if entry is None and not rehash:
                bucket = bucket_of(name)
                loaded = self._loaded.get(bucket)
                if loaded is None:
                    loaded = self._loaded[bucket] = _read(self._bucket_file(bucket))
                entry = loaded.get(name)
        if entry is not None and _matches(entry, key):
            return entry[5]
        return None

    def save(self) -> None:
        """Put this process's new hashes in the cache: per bucket, one journal line or a rewrite."""
        with self._lock:
            new = dict(self._new)
        if not new:
            return
        by_bucket: Dict[str, Dict[str, List]] = {}
        for name, entry in new.items():
            by_bucket.setdefault(bucket_of(name), {})[name] = entry
        folder = self._file()
        kept: Dict[str, Dict[str, Any]] = {}  # bucket -> its entries, for those rewritten
        saved: List[str] = []
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            with open(os.path.join(folder, ".lock"), "a") as lock:
                if not _lock(lock.fileno()):
                    LOG.debug("local hash cache %s is locked by another run; not updated", folder)
                    return
                for bucket, entries in sorted(by_bucket.items()):
                    path = self._bucket_file(bucket)
                    line = (json.dumps({"entries": entries}) + "\n").encode()
                    if not _append(path, line):
                        kept[bucket] = _rewrite(path, entries)
                    saved.append(bucket)
                if self.path is None:
                    _retire(os.path.join(os.path.dirname(folder), OLD_FILE))
        except OSError as exc:
            LOG.debug("could not write the local hash cache %s: %s", folder, exc)
        with self._lock:
            for bucket in saved:
                entries = by_bucket[bucket]
                if bucket in kept:
                    self._loaded[bucket] = kept[bucket]
                elif bucket in self._loaded:
                    self._loaded[bucket].update(entries)
                for name, entry in entries.items():
                    if self._new.get(name) == entry:
                        del self._new[name]

    def _file(self) -> str:
        return self.path or default_path()

    def _bucket_file(self, bucket: str) -> str:
        return os.path.join(self._file(), bucket + ".json")


def _lock(fd: int) -> bool:
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def _append(path: str, line: bytes) -> bool:
    """Add journal *line* to the bucket file at *path*; False when it should be rewritten instead.

    That is when it is missing or empty, or when the journal would outgrow the
    base line and :data:`JOURNAL_MIN`. A last line cut short (no newline) is
    ended first, so it stays one unreadable line of its own.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        base = _first_line_length(fd, size)
        if not size or size - base + len(line) > max(JOURNAL_MIN, base):
            return False
        if os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        while line:
            line = line[os.write(fd, line):]
    finally:
        os.close(fd)
    return True


def _first_line_length(fd: int, size: int) -> int:
    """Bytes of the file's first line, its newline included (the whole file if it has none)."""
    offset = 0
    while offset < size:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            break
        end = chunk.find(b"\n")
        if end >= 0:
            return offset + end + 1
        offset += len(chunk)
    return offset


def _rewrite(path: str, new: Dict[str, List]) -> Dict[str, Any]:
    """Replace the bucket file at *path* by one base line: its entries and *new*, those still
    describing their file; return them."""
    entries = _read(path)
    entries.update(new)
    kept = {p: e for p, e in entries.items() if _valid(e) and _current(p, e)}
    fd, tmp = tempfile.mkstemp(prefix=".bucket.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": 1, "entries": kept}, handle)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return kept


def _read(path: str) -> Dict[str, Any]:
    """The entries of the bucket file at *path* (none if it is unreadable), each checked when used.

    A run looks up only its own sources; checking every entry of a bucket as it
    is read would cost a stat per file someone once copied. Lines that do not
    parse (cut short by a crash, or garbage) are skipped.
    """
    entries: Dict[str, Any] = {}
    try:
        with open(path, "rb") as handle:
            lines = handle.read().split(b"\n")
    except OSError:
        return entries
    for line in lines:
        try:
            part = json.loads(line)["entries"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(part, dict):
            entries.update(part)
    return entries


def _retire(path: str) -> None:
    """Remove the single cache file of earlier versions (and its lock), if it is still there."""
    for name in (path, path + ".lock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _matches(entry: Any, key: Key) -> bool:
    """Whether *entry* (as read: anything) holds the SHA-1 for stat *key* and is well formed
    (:func:`_valid`, asked only of the entry whose stat is the one looked up)."""
    return type(entry) is list and len(entry) == 6 and tuple(entry[:5]) == key and _valid(entry)


def _valid(entry: Any) -> bool:
    """Whether a cache entry read from the file is well formed: [size, mtime, ctime, ino, dev, sha1]."""
    return (type(entry) is list and len(entry) == 6 and all(type(x) is int for x in entry[:5])
            and is_sha1(entry[5]))


def _current(path: str, entry: List) -> bool:
    """Whether *entry* still describes the file at *path*."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and stat_key(st) == tuple(entry[:5])


#: The cache every run of this process uses.
LOCAL = LocalHashes()
