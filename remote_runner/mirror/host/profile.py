"""The names a command looked up in its last session on this host, for a warm start.

Why apart: the profile outlives the session (a small JSON file next to the
file cache) and only its names are kept; how it is keyed decides which later
commands benefit from it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .. import protocol as P

if TYPE_CHECKING:  # pragma: no cover
    from .caches import FileCache

LOG = logging.getLogger("remote_runner.mirror.agent")


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
    def for_command(cls, files: Optional["FileCache"], boot: Dict[str, Any]) -> Optional["Profile"]:
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
