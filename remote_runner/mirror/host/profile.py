"""The names a command looked up in its last sessions on this host, for a warm start.

Why apart: the profile outlives the session (a small JSON file next to the
file cache) and only its names are kept; how it is keyed decides which later
commands benefit from it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set

from .. import protocol as P
from .names import absolute_names

if TYPE_CHECKING:  # pragma: no cover
    from .caches import FileCache

LOG = logging.getLogger("remote_runner.mirror.agent")


class Profile:
    """The paths a command looked up in its last sessions, for a warm start of the next one.

    Kept next to the file cache, one small JSON file per command (its first two
    words and the mode), written under a temporary name and renamed: the names
    it looked up and the directories it looked up names in or listed (their
    answers are kept by :mod:`.listings` and confirmed at the next start), and
    which of those it listed. Only names are kept here: every answer is
    confirmed by the local side at start.
    """

    #: How long warm-start answers stand (NFS's acregmin is 3 s too).
    TTL = 3.0
    #: The sessions kept: commands with the same key differ (``sh -c true``, then
    #: ``sh -c 'python3 x.py'``), and one must not make the next start cold.
    SESSIONS = 3
    LIMIT = P.PROFILE_NAMES
    #: The most directories offered at a warm start.
    DIRS = 4096

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: Dict[str, None] = {}
        self.listed: Dict[str, None] = {}
        #: Directories the local side does not answer whole (too big, not served): not kept.
        self.unlisted: Set[str] = set()
        #: Directories the command made in this session: what lies in them (a test's
        #: ``tmp_path``, a build's scratch tree) is its own output, not kept (see :meth:`made`).
        self.created: Set[str] = set()
        #: The sessions read at start (load, load_dirs and load_listed share one read).
        self._loaded: Optional[List[Dict[str, Any]]] = None

    @classmethod
    def for_command(cls, files: Optional["FileCache"], boot: Dict[str, Any]) -> Optional["Profile"]:
        if files is None or not boot.get("argv"):
            return None
        name = P.profile_key(boot["argv"], bool(boot.get("files_only"))) + ".json"
        return cls(os.path.join(files.directory + ".profiles", name))

    def record(self, path: str) -> None:
        if len(self.seen) < self.LIMIT:
            self.seen[path] = None

    def made(self, path: str) -> None:
        """The command created directory *path*: it and every name below it are left out.

        A test suite makes hundreds of temporary directories per run; kept,
        they would be offered back at every later start (each a lookup and a
        listing on the local side) long after they are gone. A later run that
        reads what this one made looks it up itself, and keeps it then.
        """
        if len(self.created) < self.LIMIT:
            self.created.add(path)

    def gone(self, path: str) -> None:
        """The command removed *path* or renamed it away: left out as a directory it made is.

        A test suite's cleanup removes an earlier run's temporary tree (pytest
        renames it to ``garbage-*`` and lists each directory as it deletes it):
        kept, each was offered back at the next start, and listed there, for nothing.
        """
        self.made(path)

    def _made_here(self, path: str) -> bool:
        return P.made_in_session(path, self.created)

    def record_dir(self, path: str) -> None:
        """*path* was listed (``readdir``)."""
        if len(self.listed) < self.DIRS:
            self.listed[path] = None

    def _read(self) -> Any:
        try:
            with open(self.path, "rb") as handle:
                return json.loads(handle.read().decode("utf-8", "surrogateescape"))
        except (OSError, ValueError):
            return None

    def _sessions(self, fresh: bool = False) -> List[Dict[str, Any]]:
        """The sessions kept, the newest first (each a dict with ``names`` and ``dirs``).

        Read once for the start's loads; *fresh* reads the file again (:meth:`save`:
        another session of the same command may have saved meanwhile).
        """
        if fresh or self._loaded is None:
            self._loaded = self._parse()
        return self._loaded

    def _parse(self) -> List[Dict[str, Any]]:
        body = self._read()
        if isinstance(body, list):  # (older files: a list of names)
            body = {"names": body}
        if not isinstance(body, dict):
            return []
        earlier = body.get("earlier") if isinstance(body.get("earlier"), list) else []
        return [entry for entry in [body] + earlier[:self.SESSIONS - 1] if isinstance(entry, dict)]

    def _union(self, key: str, limit: int) -> List[str]:
        out: Dict[str, None] = {}
        for entry in self._sessions():
            paths = entry.get(key)
            if isinstance(paths, list):
                out.update(dict.fromkeys(p for p in paths if isinstance(p, str)))
        return list(out)[:limit]

    def load(self) -> List[str]:
        """The names looked up in the last sessions (none if the file is missing or not usable)."""
        return self._union("names", self.LIMIT)

    def load_dirs(self) -> List[str]:
        """The directories whose answers the last sessions used (see :mod:`.listings`)."""
        return absolute_names(self._union("dirs", self.DIRS * self.SESSIONS))[:self.DIRS]

    def load_listed(self) -> Optional[Set[str]]:
        """The directories the last sessions listed (``readdir``); None if a session kept
        no such list (a file from an older agent: every directory counts as listed)."""
        sessions = self._sessions()
        if not sessions or any(not isinstance(entry.get("listed"), list) for entry in sessions):
            return None
        return {path for entry in sessions for path in entry["listed"] if isinstance(path, str)}

    def dirs(self) -> List[str]:
        """This session's directories: those listed, and those it looked names up in."""
        out = dict(self.listed)
        for path in self.seen:
            if path != "/":
                out.setdefault(posixpath.dirname(path.rstrip("/")) or "/", None)
        return [d for d in out if self._keeps_dir(d)][:self.DIRS]

    def listed_dirs(self) -> List[str]:
        """This session's directories that were listed (the others only had names looked up)."""
        return [d for d in self.listed if self._keeps_dir(d)]

    def _keeps_dir(self, path: str) -> bool:
        """Whether directory *path* is kept: answered whole here, and not made by the command."""
        return path not in self.unlisted and not self._made_here(path)

    def save(self) -> None:
        if not self.seen and not self.listed:
            return
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".tmp-")
            with os.fdopen(fd, "wb") as handle:
                body: Dict[str, Any] = {"names": [p for p in self.seen if not self._made_here(p)],
                                        "dirs": self.dirs(), "listed": self.listed_dirs()}
                earlier = [{"names": e.get("names"), "dirs": e.get("dirs"), "listed": e.get("listed")}
                           for e in self._sessions(fresh=True)[:self.SESSIONS - 1]]
                if earlier:
                    body["earlier"] = earlier
                handle.write(json.dumps(body).encode("utf-8", "surrogateescape"))
            os.rename(tmp, self.path)
        except OSError as exc:
            LOG.debug("profile %s not saved: %s", self.path, exc)
