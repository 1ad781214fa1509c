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

A command's own profile helps only a command run before. So knowledge is also
shared (:class:`ProfileSet`): per executable (``python3 b.py`` starts with the
interpreter, stdlib and site-packages every earlier ``python3`` run looked up,
whatever its script) and per directory tree (the working directory: ``pytest``,
``make`` and the project's own scripts share the project's files). A session
loads the union, its own command first, and adds what it learned to all three.
The union goes only to a host that has no profile of its own for the command:
one that ran it before is sent the command's own profile, since the shared
ones grow with every command run in the tree (thousands of names a warm
``true`` would have looked up here and absorbed there).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from remote_runner.cachedir import cache_dir
from remote_runner.mirror.protocol import PROFILE_NAMES, ProtocolError, name_from_wire, name_to_wire, profile_key

#: At most this many names and files are kept per command.
NAME_LIMIT = PROFILE_NAMES
FILE_LIMIT = 2000
#: The most directories :class:`OfferedDirs` keeps (a host offers at most 4,096 at once).
DIR_LIMIT = 4096
#: A command's own profile keeps its last this many sessions (see :class:`CommandProfile`).
SESSIONS = 3


def profiles_dir() -> str:
    return cache_dir("profiles")


class CommandProfile:
    """The names and whole files of one command, in ``<profiles_dir>/<key>.json``.

    A command's own profile keeps its last :data:`SESSIONS` sessions, not only
    the last one: commands that share a key (the first two words: ``sh -c``,
    ``python3 -m``) differ, and one ``sh -c true`` must not make the next
    ``sh -c 'python3 x.py'`` ask for every file of the interpreter again (at 0
    ms on the lab: a first Python start of 307 ms instead of 64-74). The shared
    profiles (``sessions=1``) gather everything anyway.
    """

    def __init__(self, path: str, sessions: int = 1) -> None:
        self.path = path
        self.sessions = sessions

    @classmethod
    def for_command(cls, argv_wire: Sequence[str], files_only: bool) -> "CommandProfile":
        return cls(os.path.join(profiles_dir(), profile_key(argv_wire, files_only) + ".json"), SESSIONS)

    def _sessions(self) -> List[Tuple[List[str], List[str]]]:
        """(names, files) of each session kept, the newest first."""
        try:
            with open(self.path, "rb") as handle:
                data = json.loads(handle.read().decode("ascii"))
        except (OSError, ValueError):
            return []
        if not isinstance(data, dict):
            return []
        out = []
        for entry in [data] + list(data.get("earlier") or [])[:max(0, self.sessions - 1)]:
            if (isinstance(entry, dict) and isinstance(entry.get("names"), list)
                    and isinstance(entry.get("files"), list)):
                out.append(([n for n in entry["names"] if isinstance(n, str)][:NAME_LIMIT],
                            [n for n in entry["files"] if isinstance(n, str)][:FILE_LIMIT]))
        return out

    def load(self) -> Tuple[List[str], List[str]]:
        """Return (names, files) as wire names, the newest session's first; empty when there is none."""
        names: Dict[str, None] = {}
        files: Dict[str, None] = {}
        for got_names, got_files in self._sessions():
            names.update(dict.fromkeys(got_names))
            files.update(dict.fromkeys(got_files))
        return list(names)[:NAME_LIMIT], list(files)[:FILE_LIMIT]

    def save(self, names: Sequence[str], files: Sequence[str]) -> None:
        """Make this session the newest (temporary file + rename); an empty session keeps the old ones."""
        if not names:
            return
        names, files = living(names), living(files)
        earlier = [{"names": living(n), "files": living(f)} for n, f in self._sessions()[:self.sessions - 1]]
        body: Dict[str, object] = {"names": list(names)[:NAME_LIMIT], "files": list(files)[:FILE_LIMIT]}
        if earlier:
            body["earlier"] = earlier
        _write_json(self.path, body)


class OfferedDirs:
    """The directories a host offered back at the command's last ``validate``, in ``<key>.dirs.json``.

    A host keeps whole-directory answers between sessions and offers them for
    confirmation at ``validate``; which ones, only it knows. The local side
    lists exactly those ahead, during the next handshake (see
    :meth:`~remote_runner.mirror.sendahead.SendAhead.prepare`), so it keeps the
    last host's list: a guess for the next session, never trusted for anything else.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def for_profile(cls, profile: "CommandProfile") -> "OfferedDirs":
        return cls(profile.path[:-len(".json")] + ".dirs.json")

    def load(self) -> List[str]:
        try:
            with open(self.path, "rb") as handle:
                data = json.loads(handle.read().decode("ascii"))
        except (OSError, ValueError):
            return []
        return [d for d in data if isinstance(d, str)][:DIR_LIMIT] if isinstance(data, list) else []

    def save(self, dirs: Sequence[str]) -> None:
        """Replace the list (temporary file + rename); none offered keeps the old one."""
        if dirs:
            _write_json(self.path, list(dirs)[:DIR_LIMIT])


def _write_json(path: str, data: object) -> None:
    """Replace *path* with *data* as ASCII JSON (non-UTF-8 names travel as escaped surrogates),
    through a temporary file and a rename."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(json.dumps(data).encode("ascii"))
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def living(names: Sequence[str]) -> List[str]:
    """*names* whose directory still exists here, in order.

    A test suite's ``tmp_path``, a build's scratch directory: a session looks
    up thousands of names in trees that are gone by the next one. Kept, they
    would fill the profiles to their limit (a pytest run's shared profiles had
    grown to 20,000 names and 2.7 MB each, read and written at every start and
    end, each name looked up again for the host) and crowd out what every run
    needs. One ``stat`` per distinct directory.
    """
    alive: Dict[bytes, bool] = {}
    out = []
    for name in names:
        try:
            raw = name_from_wire(name)
        except ProtocolError:
            continue
        directory = os.path.dirname(raw.rstrip(b"/")) or b"/"
        known = alive.get(directory)
        if known is None:
            known = alive[directory] = os.path.isdir(directory)
        if known:
            out.append(name)
    return out


def _shared_key(kind: str, what: bytes, files_only: bool) -> str:
    return hashlib.sha1(b"%s|%d|%s" % (kind.encode(), files_only, what)).hexdigest()


def executable_of(argv_wire: Sequence[str], cwd: str, path: Optional[str] = None) -> Optional[bytes]:
    """The program *argv_wire* runs, as this machine resolves it (PATH, symlinks), or None."""
    if not argv_wire:
        return None
    first = os.fsdecode(name_from_wire(argv_wire[0]))
    if "/" in first:
        found: Optional[str] = os.path.join(cwd, first)
    else:
        found = shutil.which(first, path=path if path is not None else os.environ.get("PATH"))
    return os.fsencode(os.path.realpath(found)) if found else None


def command_names(argv0: str, path: Optional[str], cwd: str) -> List[str]:
    """The names the host looks up to start *argv0* (wire names): a seed for the first ``validate``.

    The working directory, the program named by a path, and, for a bare
    name, each ``PATH`` candidate in turn (with its directories) up to the
    one that runs here, and where a link leads: a command never
    mirrored before otherwise pays a round trip per ``PATH`` entry before its
    first instruction (``ffmpeg``: 7). Only names: every answer is a fresh
    lookup, and one not served is answered as such.
    """
    wanted: Dict[bytes, None] = {}

    def add(raw: bytes) -> None:
        parts = [p for p in raw.split(b"/") if p]
        for i in range(1, len(parts) + 1):
            wanted.setdefault(b"/" + b"/".join(parts[:i]), None)

    add(os.fsencode(os.path.abspath(cwd)))
    if "/" in argv0:
        program = os.path.abspath(os.path.join(cwd, argv0))
        add(os.fsencode(program))
        add(os.fsencode(os.path.realpath(program)))  # (a link's target is looked up next)
    elif argv0:
        for entry in (path or "").split(os.pathsep):
            candidate = os.path.abspath(os.path.join(entry or cwd, argv0))
            add(os.fsencode(candidate))
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                add(os.fsencode(os.path.realpath(candidate)))
                break
    return [name_to_wire(raw) for raw in wanted]


class ProfileSet:
    """A command's own profile, with those it shares: its executable's and its directory tree's."""

    def __init__(self, own: CommandProfile, shared: Sequence[CommandProfile]) -> None:
        self.own = own
        self.shared = list(shared)
        #: :meth:`seeds` as read (a session reads them at its start and again at its end).
        self._read: Optional[Tuple[Tuple[List[str], List[str]], Tuple[List[str], List[str]]]] = None

    @classmethod
    def for_command(cls, argv_wire: Sequence[str], files_only: bool, cwd: str) -> "ProfileSet":
        shared = []
        program = executable_of(argv_wire, cwd)
        if program is not None:
            shared.append(CommandProfile(os.path.join(
                profiles_dir(), "exe-" + _shared_key("exe", program, files_only) + ".json")))
        shared.append(CommandProfile(os.path.join(
            profiles_dir(), "tree-" + _shared_key("tree", os.fsencode(os.path.realpath(cwd)), files_only)
            + ".json")))
        return cls(CommandProfile.for_command(argv_wire, files_only), shared)

    @property
    def paths(self) -> List[str]:
        return [self.own.path] + [p.path for p in self.shared]

    def load(self) -> Tuple[List[str], List[str]]:
        """The union of the three (the command's own first), within the limits."""
        return self.seeds()[0]

    def seeds(self) -> Tuple[Tuple[List[str], List[str]], Tuple[List[str], List[str]]]:
        """(the union, the command's own profile alone): each file read once, until :meth:`save`."""
        if self._read is None:
            self._read = self._union()
        return self._read

    def _union(self) -> Tuple[Tuple[List[str], List[str]], Tuple[List[str], List[str]]]:
        own = self.own.load()
        names: dict = {}
        files: dict = {}
        for got_names, got_files in [own] + [profile.load() for profile in self.shared]:
            names.update(dict.fromkeys(got_names))
            files.update(dict.fromkeys(got_files))
        return (list(names)[:NAME_LIMIT], list(files)[:FILE_LIMIT]), own

    def save(self, names: Sequence[str], files: Sequence[str]) -> None:
        """The command's own profile becomes this session's; the shared ones gain it, newest first."""
        self._read = None
        self.own.save(names, files)
        if not names:
            return
        for profile in self.shared:
            old_names, old_files = profile.load()
            profile.save(list(dict.fromkeys(list(names) + old_names)),
                         list(dict.fromkeys(list(files) + old_files)))
