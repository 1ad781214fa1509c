"""Inode numbers the host made up, kept for the files they stand for.

Why: a file created without waiting (``MountState.post_create``) is shown
to the program before this machine has made it, so the host numbers it
itself. When the real attributes arrive (the creation's reply, a listing of
its directory, a later lookup) they carry the local inode; a program that
compares inodes (``find``, ``tar``, ``git``'s index, hard-link detection)
must go on seeing the number it saw first. This table maps the local file
(st_dev, st_ino) to the made-up number and rewrites every answer about it.

Apart from the name cache (:mod:`.names`) because it is keyed by file, not
by name, and outlives any one name's entry.

Shipped to hosts inside the agent's zipapp (``rrmirror.host``): stdlib only, Python 3.8.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Tuple

#: Forget all numbers past this many (a file's number may then change once, as on a remount).
LIMIT = 200000


class InodeAliases:
    """(st_dev, local inode) -> made-up inode, and the names still waiting for their reply."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self.table: Dict[Tuple[Any, int], int] = {}
        #: Names created without waiting, not yet answered -> their made-up inode.
        self._expected: Dict[str, int] = {}

    def alias(self, attrs: Any) -> Any:
        """*attrs* with the inode the host gave the file, if it made one up (see :meth:`bind`)."""
        if self.table and isinstance(attrs, dict) and "st_ino" in attrs:
            made_up = self.table.get((attrs.get("st_dev"), attrs["st_ino"]))
            if made_up is not None:
                attrs["st_ino"] = made_up
        return attrs

    def adopt(self, path: str, attrs: Dict[str, Any]) -> None:
        """Local *attrs* of *path* arrived: give them the number the program saw.

        Another reply may bring a new name's local attributes before the
        creation's own (a listing of its directory, answered after it on the
        local side but read first here): they are bound to the made-up inode then.
        """
        if not self.table and not self._expected:
            return
        self.alias(attrs)
        expected = self._expected.get(path)
        if expected is not None and attrs.get("st_ino") != expected:
            self.bind(attrs, expected)

    def expect(self, path: str, made_up: Optional[int]) -> None:
        """Until the reply to its creation (*made_up* None), local attributes of *path* are its."""
        with self._lock:
            if made_up is None:
                self._expected.pop(path, None)
            elif len(self._expected) < self.limit:
                self._expected[path] = made_up

    def bind(self, attrs: Any, made_up: int) -> None:
        """The file the host numbered *made_up* has these (local) attributes: keep its number."""
        if not isinstance(attrs, dict) or not isinstance(attrs.get("st_ino"), int) or attrs["st_ino"] == made_up:
            return
        with self._lock:
            if len(self.table) > self.limit:
                self.table.clear()
            self.table[(attrs.get("st_dev"), attrs["st_ino"])] = made_up
        attrs["st_ino"] = made_up

    def unbind(self, made_up: int) -> None:
        """The creation that made up *made_up* failed: no local file answers to it."""
        with self._lock:
            for key in [k for k, v in self.table.items() if v == made_up]:
                del self.table[key]
