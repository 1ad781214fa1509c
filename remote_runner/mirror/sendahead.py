"""What the host gets before it asks: many lookups at once, whole files, a program's libraries.

Why apart: each answer sent ahead saves a round trip, but only what every
local user could read may be copied to a host (the rules are :mod:`.sharing`);
the ``validate`` / whole-file / ``libs`` answers that follow them are
here, mixed into :class:`~.service.LocalFileService`, which provides
``_path`` (the exports' check), ``exports``, ``handles``, ``public`` and the session's
``looked_up`` / ``sent_whole`` / ``seed``.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from remote_runner import hashcache
from remote_runner.digests import is_sha1
from remote_runner.mirror import elf, interpreters
from remote_runner.mirror.host.basis import BASIS_MIN
from remote_runner.mirror import protocol as P
from remote_runner.mirror.listing import VALIDATE_DIRS
from remote_runner.mirror.replies import OpError, Reply
from remote_runner.mirror.sharing import sendable_whole, whole_meta
from remote_runner.mirror.watcher import kept_while_unchanged

#: Siblings (:meth:`SendAhead._add_siblings`): only of a file this small, each at most this
#: small, at most this many bytes and files per directory, and bytes per session.
SIBLING_FILE_LIMIT = 512 << 10
SIBLING_DIR_BYTES, SIBLING_DIR_FILES = 8 << 20, 512
SIBLING_SESSION_BYTES = 32 << 20
#: A lookup of a file this small in a read-only tree brings the file itself
#: (:meth:`SendAhead._add_file`), at most this many bytes per session.
LOOKUP_FILE_LIMIT, LOOKUP_SESSION_BYTES = 16 << 10, 4 << 20


def _single(st: os.stat_result) -> bool:
    """Whether a change to this file can only come through its one name (a directory's can't come
    through another): else, written through another name, it changes with no event here."""
    return st.st_nlink == 1 or stat.S_ISDIR(st.st_mode)


#: Seconds a ``validate`` waits for :meth:`SendAhead.prepare` to put down what it is doing.
PREPARE_WAIT = 2.0
#: The most directories :meth:`SendAhead.prepare` lists (those with the most names first).
PREPARE_DIRS = 256
#: Descriptors :meth:`SendAhead.prepare` keeps open between its steps (see _release_some).
PREPARE_FDS = 32


def walk(path: bytes, hops: int = 40) -> List[bytes]:
    """The paths a kernel looks up to reach absolute *path*, symlinks followed, in order.

    Ends early at a name that does not exist; the last entry is the file
    reached (when it exists).
    """
    out: List[bytes] = []
    parts = [p for p in path.split(b"/") if p]
    current = b""
    while parts:
        part = parts.pop(0)
        if part == b".":
            continue
        if part == b"..":
            current = os.path.dirname(current).rstrip(b"/")  # "/usr" -> "" (the root)
            continue
        here = current + b"/" + part
        out.append(here)
        try:
            st = os.lstat(here)
        except OSError:
            break
        if not stat.S_ISLNK(st.st_mode):
            current = here
            continue
        hops -= 1
        try:
            target = os.readlink(here)
        except OSError:
            break
        if hops < 0:
            break
        if target.startswith(b"/"):
            current = b""
        parts = [p for p in target.split(b"/") if p] + parts
    return out


class SendAhead:
    """The service's answers that carry more than was asked (mixed into LocalFileService)."""

    def op_validate(self, a: Dict[str, Any], names: bytes) -> Reply:
        """Look many names up at once: the host's warm start, seeded with the command's profile.

        The reply (JSON) has ``names`` (the host's names, then the profile's),
        ``answers`` (per name ``[attributes, link target]``, ``null`` if it does
        not exist, ``0`` if it is not exported or cannot be looked up) and
        ``whole``: ``[name, [size, mtime_ns, ino, ctime_ns]]`` of the profile's files that
        would be sent whole now, so the host can fetch those it lacks at once.
        With ``dirs`` in the request (the directory answers the host kept
        from earlier sessions), ``dirs`` / ``dw`` confirm or renew each one
        and say whether it is watched; names in those directories are then
        not answered one by one.
        """
        # A host with a profile of its own for the command asks for what that
        # command used: the names other commands of the same executable or
        # tree used would only cost lookups here and answers there.
        if self.preparing is not None:  # what it worked out is kept; the rest is done here
            self.prepared.wait(PREPARE_WAIT)
            self.prepare_stop.set()
            self.preparing.join(PREPARE_WAIT)
        seed_names, seed_files = self.own_seed if a.get("own") else self.seed
        self.seed = self.own_seed = ([], [])
        if isinstance(a.get("dirs"), list):  # (for the next session's prepare: a guess, nothing more)
            self.offered_dirs = [d[0] for d in a["dirs"][:VALIDATE_DIRS]
                                 if isinstance(d, list) and d and isinstance(d[0], str)]
        dirs, dirs_watched = self._confirm_listings(a.get("dirs"))  # (see listing.py)
        whole_dirs = {os.path.normpath(P.name_from_wire(item[0]))
                      for item, answer in zip(a.get("dirs") or (), dirs) if answer != 0}
        asked = [P.name_to_wire(raw) for raw in names.split(b"\0")] if names else []
        # A name in a directory answered whole needs no answer of its own.
        order = [name for name in dict.fromkeys(asked + seed_names)
                 if name == "/" or os.path.dirname(os.path.normpath(P.name_from_wire(name))) not in whole_dirs]
        watched = [1 if self._watch_parent(name) else 0 for name in order]  # before answering
        answers = [self._lookup(name) for name in order]
        for name in asked:
            self._note(self.looked_up, name)
        whole = []
        for name in seed_files:
            meta = self._whole_meta(name)
            if meta is not None:
                whole.append([name, meta])
                self._note(self.sent_whole, name)
        body = {"names": order, "answers": answers, "whole": whole, "w": watched,
                "dirs": dirs, "dw": dirs_watched,
                # the directories answered whole the host may change without asking (listing.py)
                "wr": [item[0] for item, answer in zip(a.get("dirs") or (), dirs)
                       if answer != 0 and self._may_change(item[0])]}
        return Reply(payload=json.dumps(body, separators=(",", ":")).encode(), compressible=True)

    def _lookup(self, name: str) -> Any:
        """One ``validate`` answer for wire *name* (kept like :meth:`_whole_meta`'s)."""
        return self._kept(self._lookups, name, lambda: self._look(name))

    def _look(self, name: str) -> Tuple[Any, bool]:
        try:
            path = self._path({"path": name})
            st = os.lstat(path)
        except OpError:
            return 0, False
        except OSError as exc:
            missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
            return (None if missing else 0), missing
        link = None
        if stat.S_ISLNK(st.st_mode):
            try:
                link = P.name_to_wire(os.readlink(path))
            except OSError:
                return [P.stat_to_wire(st), None], False
        return [P.stat_to_wire(st), link], _single(st)

    def _whole_meta(self, name: str) -> Optional[List[int]]:
        """The copy key (:func:`whole_meta`) if wire *name* would be sent whole now, else None.

        Never for a file its open would call ``fresh`` (put in place here while
        the command runs, with an old mtime: ``rsync -a``, ``cp -p``). The host
        reads such a file past its kernel's page cache only when an open's reply
        says so (:mod:`.host.fresh`); a copy sent ahead of the open (with a
        lookup, a program's libraries, a directory's small files) was opened from
        the host's copy without it, and a read of that handle could be cut at
        the size of the version that replaced it (seen as 1 read in ~4,000 of a
        file replaced every 2 ms).
        """
        def meta() -> Tuple[Optional[List[int]], bool]:
            try:
                raw = P.name_from_wire(name)
                st = os.lstat(self._path({"path": name}))
            except (OpError, OSError, P.ProtocolError):
                return None, False
            if self.freshness_of(st, raw).get("fresh"):
                return None, False  # (and not kept: it settles in seconds)
            if sendable_whole(st) and self.public.reachable(raw, self.exports):
                return whole_meta(st), _single(st)
            return None, _single(st)
        return self._kept(self._metas, name, meta)

    def _kept(self, table: Dict[str, Tuple[int, Any]], name: str,
              compute: Callable[[], Tuple[Any, bool]]) -> Any:
        """*compute* () for wire *name*, kept in *table* while the name's directory is unchanged.

        Like a directory's answer (see :meth:`_listing`): made while the directory
        was watched, given again while the watcher has seen no change there since
        (a write, chmod, rename or replacement of the name is one), so what
        :meth:`prepare` found serves the ``validate`` as is. *compute* says
        whether its answer may be kept: not an error, nor a file with other
        names (written through one of those, it changes with no event here).
        """
        try:
            directory = os.path.dirname(os.path.normpath(P.name_from_wire(name))) or b"/"
        except P.ProtocolError:
            return compute()[0]
        return kept_while_unchanged(self.watcher, table, name, directory, compute, P.PROFILE_NAMES)

    def prepare(self, files: Sequence[str], dirs: Sequence[str] = (), names: Sequence[str] = (),
                more_files: Sequence[str] = (), program: Optional[str] = None) -> None:
        """Work out ahead, from the profiles, what the host's ``validate`` will ask (wire names).

        Run while the connection and the agent start (a few round trips of
        waiting, none of them this machine's): directories are watched and
        listed, names looked up, files' copy keys found, and all of it kept
        until a change (see :meth:`_listing`, :meth:`_kept`). The ``validate``
        that follows then finds them instead of listing dozens of directories
        and stat'ing hundreds of files while the host waits. Nothing is sent.

        First what the ``validate`` of a host that ran the command before
        needs: the command's own *files* and the directories the last host
        offered back (*dirs*, :class:`~.profile.OfferedDirs`); the ``validate``
        waits for those. Then guesses, given up as soon as it arrives
        (:attr:`prepare_stop`): the libraries of the command's *program* (what
        its open will list), the *names*' answers, the *more_files* of the
        profiles the command shares, the directories holding the most names.
        """
        def listed(wire_dirs: Sequence[Any]) -> List[Callable[[], Any]]:
            out: List[Callable[[], Any]] = []
            for wire in wire_dirs:
                try:
                    raw = os.path.normpath(P.name_from_wire(wire)) if isinstance(wire, str) else wire
                except P.ProtocolError:
                    continue
                out.append(lambda d=raw: self._watch(d) and self._listing(d))
            return out

        def folders() -> Iterator[bytes]:
            for name in list(names) + list(files) + list(more_files):
                try:
                    yield os.path.dirname(os.path.normpath(P.name_from_wire(name))) or b"/"
                except P.ProtocolError:
                    continue
        busiest = [folder for folder, _ in Counter(folders()).most_common(PREPARE_DIRS)]

        def key(name: str) -> Any:
            self._watch_parent(name)  # (first: a key is kept only while its directory is watched)
            return self._whole_meta(name)

        needed = [lambda name=name: key(name) for name in files] + listed(dirs)
        guesses = ([lambda: self._libraries_ahead(program)] if program is not None else []) + (
                   [lambda name=name: self._watch_parent(name) and self._lookup(name) for name in names]
                   + [lambda name=name: key(name) for name in more_files]
                   + listed(busiest))
        try:
            for step in needed:
                step()
                self._release_some()
            self.prepared.set()
            for step in guesses:
                if self.prepare_stop.is_set():
                    return
                step()
                self._release_some()
        finally:
            self.prepared.set()
            self.request_fds.release()

    def _release_some(self) -> None:
        """Between prepare's steps: close the directories reached once there are many (the
        files of one directory, looked at one after the other, share its descriptor)."""
        if self.request_fds.open_count() > PREPARE_FDS:
            self.request_fds.release()

    @staticmethod
    def _note(seen: Dict[str, None], name: str) -> None:
        if len(seen) < P.PROFILE_NAMES:
            seen[name] = None

    def _push(self, reply: Reply, paths: Sequence[bytes]) -> None:
        """Add ``push`` entries (path, attributes) for those of *paths* that exist and are exported."""
        entries = []
        for path in paths:
            wire = P.name_to_wire(path)
            try:
                watched = 1 if self._watch_parent(wire) else 0
                entries.append([wire, P.stat_to_wire(os.lstat(self._path({"path": wire}))), watched])
            except (OpError, OSError):
                continue
        if entries:
            reply.fields["push"] = entries

    def _add_libraries(self, reply: Reply, name: str) -> None:
        """To the open of a program sent whole, add what the loader will look up and open next.

        ``libs`` has the shape of a ``validate`` reply: every name the host's
        kernel will look up on the way to each library (symlinks followed),
        its answer, and the libraries that can be sent whole with their
        [size, mtime_ns, ino, ctime_ns], so the host fetches them all at once instead of
        one round trip per library (see :mod:`remote_runner.mirror.elf`).
        Once per program per session, not in files-only mode. The open already
        checked *name* against the exports; each library's names are checked by
        their own lookups (a name not served is answered 0, and never sent whole).
        """
        if self.roots is not None or name in self._expanded:
            return  # files-only: the host runs its own programs, with its own libraries
        self._expanded[name] = None
        body = self._libraries(name, self._closures.pop(name, None))
        if body is None or len(json.dumps(body)) > P.MAX_HEADER // 2:
            return
        for n in body["names"]:
            self._note(self.looked_up, n)
        for n, _ in body["whole"]:
            if n.endswith(".pyc"):  # an interpreter's library, sent as siblings are (see _save_profile)
                self.listed_siblings.add(n)
            else:
                self._note(self.sent_whole, n)
        reply.fields["libs"] = body

    def _libraries(self, name: str, found: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
        """The ``libs`` body for program *name* (None: nothing to send whole); *found*: its loader list.

        :meth:`prepare` makes it once ahead for the command's program, while
        the connection starts (~50 ms for ``ffmpeg``'s 214 libraries): the
        loader list is kept for the open, the answers and copy keys as long
        as their directories do not change (:meth:`_kept`).
        """
        if found is None:
            found = self._loader_list(name)
        listed = [p for p in found if p.endswith("/")]  # directories to answer whole
        names: Dict[str, None] = {}
        whole = []
        probed: Dict[bytes, None] = {}
        for library in (p for p in found if not p.endswith("/")):
            walked = walk(os.fsencode(library))
            for path in walked:
                names.setdefault(P.name_to_wire(path), None)
            meta = self._whole_meta(P.name_to_wire(walked[-1])) if walked else None
            if meta is not None:
                whole.append([P.name_to_wire(walked[-1]), meta])
                if ".so" in os.path.basename(library):  # (not the loader's cache, a locale file)
                    probed.setdefault(os.path.dirname(os.fsencode(library)), None)
        if not whole:
            return None
        # A directory the loader searches by path is first probed for builds by CPU level.
        for folder in probed:
            for sub in elf.PROBED_SUBDIRS:
                for path in walk(folder + b"/" + sub):
                    names.setdefault(P.name_to_wire(path), None)
        dirs = self._listings_ahead([(d, walk(os.fsencode(d.rstrip("/")))) for d in listed], names)
        watched = [1 if self._watch_parent(n) else 0 for n in names]
        body = {"names": list(names), "answers": [self._lookup(n) for n in names], "whole": whole,
                "w": watched}
        if dirs:
            body["dirs"] = dirs
        return body

    @staticmethod
    def _loader_list(name: str) -> List[str]:
        """What the loader opens or tries for *name*: its libraries; for a program its own files
        too, those the C library reads for the locale and time zone (:func:`~.elf.libc_files`), and
        an interpreter's own (:mod:`.interpreters`; a directory to answer whole ends in ``/``);
        OpenSSL's configuration for anything linked with it (:func:`~.elf.openssl_files`)."""
        path = os.fsdecode(P.name_from_wire(name))
        misses: List[str] = []
        libraries = elf.closure(path, misses)
        # (a miss is walked to its missing name: a negative answer, nothing sent whole)
        if not libraries:
            return []
        own = elf.loader_files(path)  # (none for a library: its process has them already)
        if own:
            own += elf.libc_files(libraries, os.environ) + interpreters.startup_files(path, os.environ)
        own += elf.openssl_files(libraries, os.environ)  # (a program's, or a module it loads)
        return libraries + own + list(dict.fromkeys(misses))

    def _libraries_ahead(self, name: str) -> None:
        """(:meth:`prepare`) Work out *name*'s libraries before the host opens it."""
        if self.roots is None and name not in self._expanded:
            found = self._loader_list(name)
            self._libraries(name, found)  # (the answers and keys are kept, see _kept)
            self._closures[name] = found

    def _add_package(self, reply: Reply, raw: bytes) -> None:
        """To a lookup of a package's ``__init__<tag>.so``, add its compiled ``__init__`` and siblings.

        That is the first name Python looks for in a package's directory; the
        answer already brings the directory and its ``__pycache__``, but the
        ``__init__`` bytecode opened next was asked for on its own (one round
        trip per package on a first run: 9 for ``import json, email.parser,
        http.client, decimal, sqlite3``). It is listed now, with the package's
        other modules compiled for the same interpreter (the tag of the name
        looked up), as the open of one of them would list them.
        """
        directory, base = os.path.split(raw)
        if not (base.startswith(b"__init__.") and base.endswith(b".so")):
            return
        parts = base[len(b"__init__."):-len(b".so")].split(b"-")
        cache = os.path.join(directory, b"__pycache__")
        for count in (2, 1):
            wire = P.name_to_wire(os.path.join(cache, b"__init__." + b"-".join(parts[:count]) + b".pyc"))
            meta = self._whole_meta(wire)
            if meta is not None:
                self._add_siblings(reply, wire, meta[0], itself=True)
                return

    def _add_siblings(self, reply: Reply, name: str, size: int, itself: bool = False) -> None:
        """To the open of a small file sent whole, add the files of its kind beside it.

        A program reading one small file of a directory usually reads more of
        the same kind next: Python a module's ``.cpython-311.pyc`` after
        another, ``ld.so`` one ``gconv`` module after another, a program its
        ``.mo`` catalogues, a test suite its fixtures. A first run that has no
        profile yet would pay a round trip for each; so the reply lists, in the
        shape of ``libs`` (names, answers, whole files), the directory's other
        regular files whose name ends as this one's does (after its first dot),
        which the host fetches at once while the program goes on. Each is
        checked as an open of its own would be (exports, settled, public); the
        budget (``SIBLING_*``) bounds what an unneeded push costs. Once per
        directory per session, never in files-only mode (the host's own
        programs, only named files), and not for a file without a kind.
        *itself*: *name* is not being opened; it is listed first.
        """
        raw = P.name_from_wire(name)
        directory, base = os.path.split(raw)
        dot = base.find(b".", 1)
        if (self.roots is not None or size > SIBLING_FILE_LIMIT or dot < 0
                or directory in self._sibling_dirs or self._sibling_bytes >= SIBLING_SESSION_BYTES):
            return
        self._sibling_dirs[directory] = None
        watched = 1 if self._watch(directory) else 0  # before anything is answered about it
        suffix = base[dot:]
        try:
            with os.scandir(self._path({"path": P.name_to_wire(directory)})) as entries:
                candidates = sorted(e.name for e in entries
                                    if e.name.endswith(suffix) and e.name != base and e.is_file(follow_symlinks=False))
            if itself:
                candidates.insert(0, base)
        except (OpError, OSError):
            return
        budget = min(SIBLING_DIR_BYTES, SIBLING_SESSION_BYTES - self._sibling_bytes)
        names, whole = [], []
        for candidate in candidates:
            wire = P.name_to_wire(os.path.join(directory, candidate))
            meta = self._whole_meta(wire)
            if meta is None or meta[0] > SIBLING_FILE_LIMIT or meta[0] > budget:
                continue
            budget -= meta[0]
            self._sibling_bytes += meta[0]
            names.append(wire)
            whole.append([wire, meta])
            if len(whole) >= SIBLING_DIR_FILES:
                break
        if whole:
            self.listed_siblings.update(names)
            reply.fields["libs"] = {"names": names, "answers": [self._lookup(n) for n in names],
                                    "whole": whole, "w": [watched] * len(names)}

    def _add_file(self, reply: Reply, raw: bytes, st: os.stat_result) -> None:
        """To a first lookup of a small file in a read-only tree, add the file (``file``: its copy key).

        What the C library and interpreters look up in system trees they read
        whole at once (``locale.alias``, ``gconv-modules.cache``, a zone file,
        a ``.pth``, ``openssl.cnf``): sent with the lookup, the open that
        follows is answered on the host. Only a lookup that asks for its
        directory reaches this (the next ones there are answered from that
        listing), only files a whole copy may be made of (:mod:`.sharing`),
        none in a writable tree (the cwd: build tools and version control stat
        far more files there than they read), within ``LOOKUP_SESSION_BYTES``
        a session, and not in files-only mode. The bytes end the payload.
        """
        if (self.roots is not None or not 0 < st.st_size <= LOOKUP_FILE_LIMIT
                or self._lookup_bytes + st.st_size > LOOKUP_SESSION_BYTES):
            return
        export = self.exports.find(raw)
        if export is None or export.writable:
            return
        wire = P.name_to_wire(raw)
        meta = self._whole_meta(wire)
        if meta is None:
            return
        try:
            fd = os.open(self._path({"path": wire}), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OpError, OSError):
            return
        try:
            data = os.pread(fd, meta[0] + 1, 0)
            if whole_meta(os.fstat(fd)) != meta or len(data) != meta[0]:
                return  # changed since it was looked at
        finally:
            os.close(fd)
        self._lookup_bytes += len(data)
        self._note(self.sent_whole, wire)
        reply.fields["file"] = meta
        reply.payload += data
        reply.compressible = True

    def _whole(self, fd: int, have: Any, path: bytes, basis: Any = None) -> Reply:
        """Answer a whole-file open: "current" (no data), or the file's first chunk.

        Only settled, world-readable regular files qualify: not empty (pseudo
        files report size 0), not over ``WHOLE_LIMIT``, not private (no copy of
        a 0600 file, or of one inside a private directory, stays on a host), and
        not modified in the last
        ``SETTLED_SECONDS`` (a log being written keeps being read through the
        link, so ``tail -f`` sees it grow). The rest of a bigger file is read
        through the handle the reply carries.

        *basis*: the SHA-1 of the host's own file of that path and size
        (:mod:`.host.basis`); when it is this file's, the answer is "same"
        (``basis``), with no data.
        """
        st = os.fstat(fd)
        fresh = self.freshness_of(st, path)  # (read past the host kernel's cache)
        if not sendable_whole(st) or not self.public.reachable(path, self.exports):
            return Reply({"fh": self.handles.add(fd), **fresh})
        meta = whole_meta(st)
        fields: Dict[str, Any] = {"whole": meta, "st": P.stat_to_wire(st), **fresh}
        if have == meta:
            os.close(fd)
            return Reply(fields)
        if is_sha1(basis) and st.st_size >= BASIS_MIN \
                and hashcache.LOCAL.sha1_of_open(os.fsdecode(path), fd) == basis:
            head = os.pread(fd, len(elf.MAGIC), 0)
            os.close(fd)
            fields["basis"] = 1
            return Reply(fields, head=head)
        first = os.pread(fd, P.WHOLE_CHUNK, 0)
        if st.st_size > len(first):
            fields["fh"] = self.handles.add(fd)
        else:
            os.close(fd)
        return Reply(fields, payload=first, compressible=True)
