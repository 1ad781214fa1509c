"""What a command looked up and read last time, kept on this machine, to seed any host.

A host that has run a command before validates the names it recorded (see the
agent's ``Profile``). A host that never has would pay one round trip per
lookup and per file: hundreds for a program with many libraries. So this side
keeps the same knowledge per command (its first two words and the mode, the
same key the agent uses): the names looked up, and the files sent whole. At
the next session's ``validate`` the local side answers for these names too,
and lists the files with their size, mtime and inode, so the agent fetches the
ones its cache lacks all at once, before the command starts, instead of one by
one as the loader asks. Only names are stored; every answer is a fresh lookup.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import List, Sequence, Tuple

from remote_runner.mirror.protocol import PROFILE_NAMES, profile_key

#: At most this many names and files are kept per command.
NAME_LIMIT = PROFILE_NAMES
FILE_LIMIT = 2000


def profiles_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "remote-runner", "profiles")


class CommandProfile:
    """The names and whole files of one command, in ``<profiles_dir>/<key>.json``."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def for_command(cls, argv_wire: Sequence[str], files_only: bool) -> "CommandProfile":
        return cls(os.path.join(profiles_dir(), profile_key(argv_wire, files_only) + ".json"))

    def load(self) -> Tuple[List[str], List[str]]:
        """Return (names, files) as wire names; empty when there is no usable profile."""
        try:
            with open(self.path, "rb") as handle:
                data = json.loads(handle.read().decode("ascii"))
            names = [n for n in data["names"] if isinstance(n, str)][:NAME_LIMIT]
            files = [n for n in data["files"] if isinstance(n, str)][:FILE_LIMIT]
        except (OSError, ValueError, KeyError, TypeError):
            return [], []
        return names, files

    def save(self, names: Sequence[str], files: Sequence[str]) -> None:
        """Replace the profile (temporary file + rename); an empty session keeps the old one."""
        if not names:
            return
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                # ASCII JSON: non-UTF-8 names travel as escaped surrogates.
                handle.write(json.dumps({"names": list(names)[:NAME_LIMIT],
                                         "files": list(files)[:FILE_LIMIT]}).encode("ascii"))
            os.rename(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
