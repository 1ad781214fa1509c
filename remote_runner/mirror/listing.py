"""(Local side) Answer a directory, not a name: whole listings and the small files read next.

Why: a program's start is mostly lookups, many of them for names that do not
exist -- Python probes ``foo.cpython-311-x86_64-linux-gnu.so``, ``foo.abi3.so``,
``foo.so``, ``foo.py``, ``foo/__init__.py`` in every ``sys.path`` entry; a shell
tries each ``PATH`` directory; ld.so walks its search path; ``git status``
lstat's every tracked file. One round trip apiece is most of a first run.
When the host asks about a name it does not know, the reply carries the whole
directory instead (names, attributes, symlink targets: NFS's READDIRPLUS),
so the host answers the directory's other names -- present or absent -- by
itself. Directories too big for one reply (``LISTING_ENTRIES``,
``LISTING_BYTES``) are answered name by name, as before.

:class:`DirectoryAnswers` is mixed into :class:`~.service.LocalFileService`
(which provides ``_path``, ``_held``, ``exports``, ``public``, ``watcher``
and the :class:`~.sendahead.SendAhead` helpers): every answer the host may
keep is computed only after its directory is watched (see :mod:`.watcher`),
and says whether it is (``w``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from remote_runner.mirror import protocol as P
from remote_runner.mirror.replies import OpError, Reply
from remote_runner.mirror.watcher import kept_while_unchanged

#: The most directories a host may offer in one ``validate``.
VALIDATE_DIRS = 4096
#: Directories a program's reply answers whole (an interpreter's, :mod:`.interpreters`): at most
#: this many entries each and encoded bytes in all (the reply's header stays well under its limit).
LIBS_LISTING_ENTRIES, LIBS_LISTING_BYTES = 1024, 192 << 10
#: Directory answers kept for reuse while their directory is unchanged (see ``_listing``).
ANSWERS_KEPT = 4096
#: Where the access time is in a stat row (it moves on every read, with no event).
_ATIME = P.STAT_FIELDS.index("st_atime")
#: A directory answer also carries its subdirectories' when it has at most this many,
#: each of at most ``SUB_ENTRIES`` entries (see :meth:`DirectoryAnswers._directory_answer`).
SUB_DIRS, SUB_ENTRIES = 8, 512
#: A listing (``readdir``) carries at most this many answers of the directories below it.
READDIR_SUB_DIRS = 512


def directory_answer(io_path: bytes, listable: Optional[Callable[[bytes], bool]] = None,
                     max_entries: int = P.LISTING_ENTRIES,
                     max_bytes: int = P.LISTING_BYTES) -> Optional[Dict[str, Any]]:
    """The whole directory at *io_path*: ``n`` names, ``a`` attribute rows, ``l`` symlink targets.

    *listable* screens names (exports, secrets). None when the directory is
    too big for one reply or cannot be read.
    """
    names: List[str] = []
    rows: List[Any] = []
    links: List[Optional[str]] = []
    size = 0
    try:
        with os.scandir(io_path) as it:
            for entry in it:
                if listable is not None and not listable(entry.name):
                    continue
                if len(names) >= max_entries:
                    return None
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # gone meanwhile
                target = None
                if stat.S_ISLNK(st.st_mode):
                    try:
                        target = P.name_to_wire(os.readlink(os.path.join(io_path, entry.name)))
                    except OSError:
                        pass
                name = P.name_to_wire(entry.name)
                names.append(name)
                rows.append(P.stat_row(st))
                links.append(target)
                size += len(name) + 130 + (len(target) if target else 0)
                if size > max_bytes:
                    return None
    except OSError:
        return None
    return {"n": names, "a": rows, "l": links}


def _hard_linked(answer: Optional[Dict[str, Any]]) -> List[Tuple[bytes, List[int]]]:
    """(name, row) of the answer's files that have other names.

    Written through another name, such a file changes with no event in this
    directory; so a kept answer is given again only while each of them still
    has the attributes it lists (:func:`_links_unchanged`).
    """
    if not answer:
        return []
    return [(P.name_from_wire(name), row) for name, row in zip(answer["n"], answer["a"])
            if row[3] > 1 and not stat.S_ISDIR(row[0])]


def _links_unchanged(directory: bytes, linked: List[Tuple[bytes, List[int]]]) -> bool:
    """Whether every (name, row) of *linked* in local *directory* still has those attributes
    (the access time aside). Only a check: what is given is the answer made the checked way."""
    for name, row in linked:
        try:
            now = P.stat_row(os.lstat(os.path.join(directory, name)))
        except OSError:
            return False
        if now[:_ATIME] != row[:_ATIME] or now[_ATIME + 1:] != row[_ATIME + 1:]:
            return False
    return True


def encode_answer(answer: Dict[str, Any]) -> bytes:
    """The answer's bytes; their sha1 is what a host offers back to have it confirmed."""
    return json.dumps(answer, separators=(",", ":")).encode("utf-8")


def answer_digest(payload: bytes) -> str:
    """The digest of an encoded answer, as the host computes it (``host/listings.py``)."""
    return hashlib.sha1(payload).hexdigest()


class DirectoryAnswers:
    """The service's lookups that answer a whole directory (mixed into LocalFileService)."""

    def _watch(self, directory: bytes) -> bool:
        """Watch local *directory* for the host (before answering about it); tell whether it is.

        Only a directory the host is served (checked like a request for it:
        exports, denylist, no symbolic link on the way) is watched: the names
        changing in a watched directory are reported to the host.
        """
        if self.watcher is None:
            return False
        if not self.watcher.watched(directory):
            try:
                if not stat.S_ISDIR(os.lstat(self._path({"path": P.name_to_wire(directory)})).st_mode):
                    return False
            except (OpError, OSError):
                return False
        return self.watcher.watch(directory)

    def _watch_parent(self, wire: Any) -> bool:
        """Watch the directory of wire path *wire* (``/`` for ``/``)."""
        try:
            raw = os.path.normpath(P.name_from_wire(wire))
        except P.ProtocolError:
            return False
        return self._watch(os.path.dirname(raw) or b"/")

    def _lookup_reply(self, a: Dict[str, Any]) -> Reply:
        """A lookup for the host's name cache: ``st`` or ``missing``, ``link``, ``w`` (watched),
        and with ``dir`` set the whole directory (``ls`` + payload, or ``big``) and, when the
        host keeps whole copies (``f``), for a small file in a read-only tree the file itself
        (``file``, see :meth:`_add_file`)."""
        raw = os.path.normpath(P.name_from_wire(a["path"]))
        reply = Reply({"w": 1 if self._watch(os.path.dirname(raw) or b"/") else 0})
        if a.get("dir") and raw != b"/":
            self._directory_answer(reply, raw)
        held = None
        try:
            path = self._path(a)
            held = self._held(a)
            st = os.stat(held) if held is not None else os.lstat(path)
        except (OpError, OSError) as exc:
            if getattr(exc, "errno", None) != errno.ENOENT:
                raise
            reply.fields["missing"] = 1
            if a.get("dir"):
                self._add_package(reply, raw)
            return reply
        self._note(self.looked_up, a["path"])
        reply.fields["st"] = P.stat_to_wire(st)
        if a.get("dir") and a.get("f") and held is None and stat.S_ISREG(st.st_mode):
            self._add_file(reply, raw, st)  # (``f``: the host keeps whole copies)
        if stat.S_ISLNK(st.st_mode) and held is None:
            try:
                reply.fields["link"] = P.name_to_wire(os.readlink(path))
            except OSError:
                pass
        return reply

    def _directory_answer(self, reply: Reply, raw: bytes) -> None:
        """Add the whole directory of *raw* to *reply* (``ls`` + payload), or ``big`` if too big.

        When *raw* is itself a directory, its own listing comes too: a lookup
        of a directory is the kernel's step on the way to a name inside it
        (``/usr/share/locale/locale.alias`` is looked up as ``/usr/share``,
        then ``locale``, then ``locale.alias``), so a path *d* levels deep
        costs about *d*/2 round trips, not *d*. A directory with few
        subdirectories (``SUB_DIRS``) brings theirs too (``sub``: [directory,
        length, watched] per answer appended to the payload): a lookup in a
        package's directory is followed by one in its ``__pycache__``, ``git
        status`` goes on into every subdirectory, a program's data directory
        has its ``locale`` or ``plugins`` beside it. Each is watched before it
        is listed, like the directory itself; one of more than
        ``SUB_ENTRIES`` names is not sent this way.
        """
        directory = os.path.dirname(raw) or b"/"
        answer, payload = self._listing(directory)
        if answer is None:
            return
        if answer is False:
            reply.fields["big"] = 1
            return
        reply.fields["ls"] = 1
        parts = [payload]
        subdirs = [name for name, row in zip(answer["n"], answer["a"])
                   if isinstance(row, list) and stat.S_ISDIR(row[0])]
        itself = P.name_to_wire(os.path.basename(raw))
        wanted = [itself] if itself in subdirs else []
        wanted += [name for name in subdirs if name != itself] if len(subdirs) <= SUB_DIRS else []
        subs, more = self._answers_below([os.path.join(directory, P.name_from_wire(n)) for n in wanted],
                                         len(wanted), deeper=False)
        parts += more
        if subs:
            reply.fields["sub"] = subs
        reply.payload = b"".join(parts)
        reply.compressible = True
        self._say_changeable(reply, P.name_to_wire(directory))

    def _say_changeable(self, reply: Reply, directory: str) -> None:
        """Name in *reply* (``wr``) which of the directories it lists, *directory* and its ``sub``
        answers, the host may change without asking (:meth:`_may_change`)."""
        listed = [directory] + [sub[0] for sub in reply.fields.get("sub", ())]
        changeable = [name for name in listed if self._may_change(name)]
        if changeable:
            reply.fields["wr"] = changeable

    def _may_change(self, directory: str) -> bool:
        """Whether the host may make and remove names in *directory* (a wire name) without asking.

        As far as this machine can tell before trying: the exports let the
        host write there, and this process may (write and search permission,
        and no sticky bit, as on /tmp, keeping it to its own files). The host
        then sends such changes there without waiting (host/writes.py): an
        ``rm -rf`` of a tree it has only listed no longer waits a round trip
        for the first removal in each directory. One that fails all the same
        reports its error at the next change made there, as any such change.
        """
        try:
            inside = self._path({"path": P.name_to_wire(os.path.join(P.name_from_wire(directory), b"-"))},
                                write=True)
            here = os.path.dirname(inside)  # the directory itself, through its descriptor
            st = os.stat(here)
            if not stat.S_ISDIR(st.st_mode) or not os.access(here, os.W_OK | os.X_OK, effective_ids=True):
                return False
        except (OpError, OSError, P.ProtocolError):
            return False
        return not st.st_mode & stat.S_ISVTX or os.geteuid() in (0, st.st_uid)

    def _listed_subdirectories(self, reply: Reply, directory: bytes, names: List[bytes]) -> None:
        """Append to a ``readdir`` *reply* of *directory* the answers of its subdirectories *names*.

        A walk (``find``, ``du``, ``rm -r``, a build's glob) lists each
        directory it finds, and each first listing was a round trip: ``find``
        in a git checkout made 288 of them (7.8 s at 10 ms each way). Up to
        ``READDIR_SUB_DIRS`` directories below it of at most ``SUB_ENTRIES``
        names come along, breadth first (its subdirectories, then theirs: a
        walk of ``.git`` goes on into ``objects/*``, whose listings the host
        would otherwise ask for one by one once it answers ``objects``
        itself), as ``sub`` answers (as a lookup's do; ``nl``: the length of
        the listing's own names), within ``LISTING_BYTES``, each watched
        before it is listed; the host answers their listings and lookups itself.
        """
        subs, parts = self._answers_below([os.path.join(directory, name) for name in names],
                                          READDIR_SUB_DIRS, deeper=True)
        if subs:
            reply.fields["nl"] = len(reply.payload)
            reply.fields["sub"] = subs
            reply.payload = b"".join([reply.payload] + parts)

    def _answers_below(self, queue: List[bytes], most: int, deeper: bool) -> Tuple[List[List[Any]], List[bytes]]:
        """The answers of the directories in *queue*, for a reply's ``sub``: ([directory, length,
        watched] each, their bytes), at most *most* of at most ``SUB_ENTRIES`` names, within
        ``LISTING_BYTES``, each watched before it is listed; *deeper*: each one's subdirectories
        are queued after it (breadth first)."""
        subs: List[List[Any]] = []
        parts: List[bytes] = []
        budget = P.LISTING_BYTES
        for sub in queue:
            if len(subs) >= most:
                break
            watched = 1 if self._watch(sub) else 0
            found, data = self._listing(sub, SUB_ENTRIES)
            if not found:
                continue
            budget -= len(data)
            if budget < 0:
                break
            parts.append(data)
            subs.append([P.name_to_wire(sub), len(data), watched])
            if deeper and len(queue) < 4 * most:
                queue.extend(os.path.join(sub, P.name_from_wire(name))
                             for name, row in zip(found["n"], found["a"])
                             if isinstance(row, list) and stat.S_ISDIR(row[0]))
        return subs, parts

    def _listing(self, directory: bytes, max_entries: int = P.LISTING_ENTRIES) -> Tuple[Any, bytes]:
        """(answer, its bytes) for local *directory* (screened); (False, b"") if too big,
        (None, b"") if not served.

        An answer computed while the directory was watched is kept and given
        again while the watcher has seen no change to it since (see
        :meth:`~.watcher.ChangeWatcher.unchanged_since`): exactly as long as
        the host may keep it. So a directory listed ahead (:meth:`prepare`)
        or asked again later in the session costs no second listing. A
        hard-linked file in it (written through another name, it changes with
        no event here) is stat'ed again each time (:func:`_links_unchanged`).
        """
        def compute() -> Tuple[Tuple[Any, bytes, List[Tuple[bytes, List[int]]]], bool]:
            try:
                io_path = self._path({"path": P.name_to_wire(directory)})
            except (OpError, OSError):
                return (None, b"", []), False
            screened = directory in self._filtered
            answer = directory_answer(
                io_path, (lambda name: self.exports.listable(directory, name)) if screened else None,
                max_entries=max_entries)
            if answer is None:
                return (False, b"", []), True
            return (answer, encode_answer(answer), _hard_linked(answer)), True

        found = kept_while_unchanged(self.watcher, self._answers, (directory, max_entries), directory, compute,
                                     ANSWERS_KEPT, still=lambda kept: _links_unchanged(directory, kept[2]))
        return found[0], found[1]

    def _listings_ahead(self, directories: List[Tuple[str, List[bytes]]],
                        names: Dict[str, None]) -> List[List[Any]]:
        """``[[directory, answer, watched], ...]``: *directories* (each with the paths a lookup
        walks to reach it) answered whole, as a lookup that asks for its directory is, within
        ``LIBS_LISTING_BYTES``; the walked paths join *names*. (For a program's reply, see
        :meth:`~.sendahead.SendAhead._libraries`.)"""
        out: List[List[Any]] = []
        budget = LIBS_LISTING_BYTES
        listed: Set[bytes] = set()
        for directory, walked in directories:
            for path in walked:
                names.setdefault(P.name_to_wire(path), None)
            # The walk follows links, so its last path is the directory itself, unless the
            # directory is missing (the walk stops at the missing name) or the path ends in a
            # "..": realpath tells those apart. A directory reached twice is answered once.
            if not walked or os.fsencode(os.path.realpath(directory)) != walked[-1]:
                continue
            raw = walked[-1]
            if raw in listed:
                continue
            listed.add(raw)
            watched = 1 if self._watch(raw) else 0  # before listing: no change is missed
            answer, payload = self._listing(raw, LIBS_LISTING_ENTRIES)
            if answer and len(payload) <= budget:
                budget -= len(payload)
                out.append([P.name_to_wire(raw), answer, watched])
        return out

    def _confirm_listings(self, offered: Any) -> Tuple[List[Any], List[int]]:
        """Answer a host's kept directories (``[[directory, digest], ...]``, see ``host/listings.py``).

        Per directory, watched first: ``1`` when the host's answer is still the
        local one (same digest), the new answer when not, ``0`` when it is not
        answered whole (not served, not a directory, too big, or past the
        reply's budget). The host's digests only choose between "current" and
        sending; what is sent is checked here like any other lookup.
        """
        answers: List[Any] = []
        watched: List[int] = []
        budget = P.LISTING_BYTES * 8
        if not isinstance(offered, list):
            return answers, watched
        for item in offered[:VALIDATE_DIRS]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], str)):
                answers.append(0)
                watched.append(0)
                continue
            try:
                raw = os.path.normpath(P.name_from_wire(item[0]))
            except P.ProtocolError:
                answers.append(0)
                watched.append(0)
                continue
            watched.append(1 if self._watch(raw) else 0)  # before listing: no change is missed
            answer, payload = self._listing(raw) if budget > 0 else (None, b"")
            if not answer:
                answers.append(0)
                continue
            if item[1] and answer_digest(payload) == item[1]:
                answers.append(1)
            else:
                budget -= len(payload)
                answers.append(answer if budget >= 0 else 0)
        return answers, watched
