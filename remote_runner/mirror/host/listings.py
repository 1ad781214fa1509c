"""Whole directories the local side answered, kept on this host between sessions as hints.

Why: every ``exec`` is a new session whose name cache starts empty, so a
"warm" run asked again for every directory it reads (``git status`` lists
and ``lstat``'s each directory of the work tree; Python lists every
``sys.path`` entry): one round trip per directory. Here the directory
answers are kept, one small file per directory, and at the next session's
start the host offers, in its single ``validate`` request, each directory
the command used with the digest (sha1) of the answer it holds. The local
side lists the directory again (watching it first), compares digests and
answers "current" or sends the new listing; so one round trip confirms all
of them, and nothing of what is kept here is served unconfirmed.

The digest covers the exact bytes of the local side's answer: every name,
symlink target and attribute row, ctime included, so a file rewritten to the
same size with its mtime put back (``touch -d``) still makes the directory
"changed". What is kept is only a hint: a file here that is garbage,
truncated, for another directory or not matching its own digest is ignored
(the local side then sends the listing). Files are written under a temporary
name and renamed; at most ``LIMIT`` directories are kept (the least recently
used go).

An answer the session saw go stale is not written at its end: its
directory went away, was replaced, or gained or lost an entry (a test
suite's scratch directories, listed to be removed: 155 of one pytest run's
360). The next session's offer of it could only be answered "changed".
And the store is trimmed only once it is over ``LIMIT``, down to
``TRIM_TO``: trimming stats every kept file, and doing it at each session's
end, over a full store, cost the host ~0.2 s of CPU per ``exec`` (after its
exit, taken from the next one's start).

Shipped to hosts inside the agent's zipapp (``rrmirror.host``): stdlib only, Python 3.8.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Dict, List, Optional

from .basis import unlink_quietly


LOG = logging.getLogger("remote_runner.mirror.agent")

#: Most directories kept per local machine (their files are small: one listing each).
LIMIT = 8192
#: A trim leaves this share of LIMIT (the oldest go), so the next trims are sessions away.
TRIM_TO = 7 / 8
#: A kept answer bigger than this is not kept (the local side sends at most 768 KiB).
MAX_BYTES = 1 << 20


#: A directory the command only looked names up in (it never listed it) is offered whole
#: when its kept answer is at most this big, or at most ``BYTES_PER_NAME`` per name it used
#: there; else its names are confirmed one by one (see :meth:`ListingStore.worth_offering`).
LOOKUP_ONLY_BYTES, BYTES_PER_NAME = 16 << 10, 512

#: How every directory answer's bytes begin (``{"n": [names...], "a": ..., "l": ...}``).
ANSWER_START = b'{"n":['


def digest(payload: bytes) -> str:
    """The name both sides give a directory answer: sha1 of its bytes."""
    return hashlib.sha1(payload).hexdigest()


def encode(answer: Any) -> bytes:
    """A directory answer's bytes, as the local side encodes them (``listing.encode_answer``)."""
    return json.dumps(answer, separators=(",", ":")).encode("utf-8")


class ListingStore:
    """Directory answers of one local machine, one file per directory, kept between sessions."""

    def __init__(self, directory: str, limit: int = LIMIT) -> None:
        self.directory = directory
        self.limit = limit
        self._held: Dict[str, bytes] = {}   # loaded and checked this session
        self._digests: Dict[str, str] = {}  # their digests
        self._new: Dict[str, bytes] = {}    # answers received this session, written at save

    def _file(self, path: str) -> str:
        return os.path.join(self.directory, hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest())

    def load(self, path: str) -> Optional[bytes]:
        """The kept answer for directory *path* (its bytes), or None (none, or not usable).

        Checked against its own digest and for the shape of an answer only:
        its entries are read once, by the caller, when the local side
        confirms the digest (the bytes are then those the local side would
        send, so nothing else is ever taken as current).
        """
        if path in self._held:
            return self._held[path]
        try:
            with open(self._file(path), "rb") as handle:
                raw = handle.read(MAX_BYTES + 4096)
            head, _, payload = raw.partition(b"\n")
            meta = json.loads(head.decode("utf-8", "surrogateescape"))
            found = digest(payload)
            if (not isinstance(meta, dict) or meta.get("d") != path or meta.get("dg") != found
                    or not payload.startswith(ANSWER_START)):
                return None
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        try:
            os.utime(self._file(path))  # recently used: trimmed last
        except OSError:
            pass
        self._held[path] = payload
        self._digests[path] = found
        return payload

    def worth_offering(self, path: str, names: int) -> bool:
        """Whether to offer directory *path*, where the command only looked up *names* names.

        Confirming an answer costs the local side an ``lstat`` of every entry
        and this host the decoding of all of them: for the five names a
        program's start looks up among the 1,300 files of
        ``/usr/lib/x86_64-linux-gnu`` or the 1,100 of ``/usr/bin``, that is
        most of both sides' work at a warm start, and confirming the names
        themselves costs next to nothing. A directory with no kept answer is
        offered (the local side sends it, and its size is known next time).
        """
        payload = self.load(path)
        return payload is None or len(payload) <= max(LOOKUP_ONLY_BYTES, names * BYTES_PER_NAME)

    def offer(self, dirs: List[str]) -> List[List[str]]:
        """``[directory, digest of the answer kept ("" if none)]`` for ``validate``."""
        out = []
        for path in dirs:
            payload = self.load(path)
            out.append([path, self._digests.get(path, "") if payload is not None else ""])
        return out

    def keep(self, path: str, payload: bytes) -> None:
        """Remember a directory answer received this session (written by :meth:`save`)."""
        if len(payload) <= MAX_BYTES:
            self._new[path] = payload
            self._held[path] = payload
            self._digests[path] = digest(payload)

    def forget(self, path: str) -> None:
        """The session's answer for directory *path* went stale: do not write it at the end."""
        self._new.pop(path, None)

    def save(self) -> None:
        """Write this session's new answers (temporary name, then rename); drop the oldest above the limit."""
        new = list(self._new.items())  # (the link's thread may still forget one meanwhile)
        self._new.clear()
        if not new:
            return
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            for path, payload in new:
                head = json.dumps({"d": path, "dg": self._digests[path]}).encode("utf-8", "surrogateescape")
                fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
                try:
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(head + b"\n" + payload)
                    os.rename(tmp, self._file(path))
                except OSError:
                    unlink_quietly(tmp)
                    raise
            self._trim()
        except OSError as exc:
            LOG.debug("directory answers not kept in %s: %s", self.directory, exc)

    def _trim(self) -> None:
        if len(os.listdir(self.directory)) <= self.limit:
            return
        entries = []
        with os.scandir(self.directory) as it:
            for entry in it:
                try:
                    entries.append((entry.stat(follow_symlinks=False).st_mtime, entry.path))
                except OSError:
                    continue
        keep = max(1, int(self.limit * TRIM_TO))
        for _, path in sorted(entries)[:max(0, len(entries) - keep)]:
            unlink_quietly(path)
