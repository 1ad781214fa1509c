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

The same idea for contents: when a small file is read whole, its siblings of
the same kind (the other ``.pyc`` of a ``__pycache__``, the other files of a
locale directory, a gconv module's neighbours) are offered in the same reply,
within a byte budget, once per directory and session.

:class:`DirectoryAnswers` is mixed into :class:`~.service.LocalFileService`
(which provides ``_path``, ``_held``, ``exports``, ``public``, ``watcher``
and the :class:`~.sendahead.SendAhead` helpers): every answer the host may
keep is computed only after its directory is watched (see :mod:`.watcher`),
and says whether it is (``w``).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any, Callable, Dict, List, Optional

from remote_runner.mirror import protocol as P
from remote_runner.mirror.replies import OpError, Reply
from remote_runner.mirror.sendahead import sendable_whole

#: Siblings are offered only from directories with at most this many entries ...
PUSH_DIR_ENTRIES = 1000
#: ... files up to this size ...
PUSH_FILE_BYTES = 256 << 10
#: ... and at most this much per directory.
PUSH_BUDGET = 2 << 20
PUSH_FILES = 200


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


def encode_answer(answer: Dict[str, Any]) -> bytes:
    return json.dumps(answer, separators=(",", ":")).encode("utf-8")


def kind(name: bytes) -> bytes:
    """What makes files "of the same kind": everything after the first dot (``cpython-311.pyc``)."""
    head, dot, rest = name.lstrip(b".").partition(b".")
    return rest if dot else b""


def siblings(io_dir: bytes, opened: bytes, eligible: Callable[[bytes, os.stat_result], bool],
             budget: int = PUSH_BUDGET) -> List[bytes]:
    """Names in *io_dir* of the same kind as *opened* worth sending along, within *budget* bytes.

    *eligible* (name, stat) says whether a file may be sent whole at all
    (world-readable, settled, exported).
    """
    want = kind(opened)
    if want in (b"so", b"a", b"o") or want.startswith(b"so."):
        return []  # libraries come with their program (ELF closure), not by directory
    chosen: List[bytes] = []
    total = 0
    try:
        with os.scandir(io_dir) as it:
            entries = list(it)
    except OSError:
        return []
    if len(entries) > PUSH_DIR_ENTRIES:
        return []
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.name == opened or kind(entry.name) != want:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size > PUSH_FILE_BYTES or not eligible(entry.name, st):
            continue
        if total + st.st_size > budget or len(chosen) >= PUSH_FILES:
            break
        total += st.st_size
        chosen.append(entry.name)
    return chosen


class DirectoryAnswers:
    """The service's lookups that answer a whole directory (mixed into LocalFileService)."""

    def _watch(self, directory: bytes) -> bool:
        """Watch local *directory* for the host (before answering about it); tell whether it is."""
        return self.watcher is not None and self.watcher.watch(directory)

    def _watch_parent(self, wire: Any) -> bool:
        """Watch the directory of wire path *wire* (``/`` for ``/``)."""
        try:
            raw = os.path.normpath(P.name_from_wire(wire))
        except P.ProtocolError:
            return False
        return self._watch(os.path.dirname(raw) or b"/")

    def _lookup_reply(self, a: Dict[str, Any]) -> Reply:
        """A lookup for the host's name cache: ``st`` or ``missing``, ``link``, ``w`` (watched),
        and with ``dir`` set the whole directory (``ls`` + payload, or ``big``)."""
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
            return reply
        self._note(self.looked_up, a["path"])
        reply.fields["st"] = P.stat_to_wire(st)
        if stat.S_ISLNK(st.st_mode) and held is None:
            try:
                reply.fields["link"] = P.name_to_wire(os.readlink(path))
            except OSError:
                pass
        return reply

    def _directory_answer(self, reply: Reply, raw: bytes) -> None:
        """Add the whole directory of *raw* to *reply* (``ls`` + payload), or ``big`` if too big."""
        parent = os.path.dirname(raw) or b"/"
        try:
            io_path = self._path({"path": P.name_to_wire(parent)})
        except (OpError, OSError):
            return
        screened = parent in self._filtered
        answer = directory_answer(
            io_path, (lambda name: self.exports.listable(parent, name)) if screened else None)
        if answer is None:
            reply.fields["big"] = 1
            return
        reply.fields["ls"] = 1
        reply.payload = encode_answer(answer)
        reply.compressible = True

    def _add_siblings(self, reply: Reply, name: str) -> None:
        """To a small file sent whole, add its siblings of the same kind (see :func:`siblings`).

        Shaped like ``libs``: the host fetches them at once, in parallel, while
        the program goes on. Once per directory per session.
        """
        raw = os.path.normpath(P.name_from_wire(name))
        directory = os.path.dirname(raw) or b"/"
        if directory in self._pushed_dirs or len(self._pushed_dirs) > 10000:
            return
        self._pushed_dirs[directory] = None
        try:
            io_dir = self._path({"path": P.name_to_wire(directory)})
        except (OpError, OSError):
            return
        screened = directory in self._filtered

        def eligible(entry: bytes, st: os.stat_result) -> bool:
            if screened and not self.exports.listable(directory, entry):
                return False
            return sendable_whole(st)

        if not self.public.reachable(raw):
            return
        chosen = siblings(io_dir, os.path.basename(raw), eligible)
        names = [P.name_to_wire(os.path.join(directory, entry)) for entry in chosen]
        whole = [[n, meta] for n, meta in ((n, self._whole_meta(n)) for n in names) if meta is not None]
        if not whole:
            return
        for n, _ in whole:
            self._note(self.sent_whole, n)
        w = 1 if self._watch(directory) else 0
        reply.fields["libs"] = {"names": [n for n, _ in whole],
                                "answers": [self._lookup(n) for n, _ in whole],
                                "whole": whole, "w": [w] * len(whole)}
