"""What the local side's answers and invalidations teach the host's name cache.

Why apart: a ``getattr`` reply may carry whole directories, a ``validate``
answer many names, an ``inval`` frame drops names here and then in the kernel.
Reading those frames defensively (a malformed part counts as absent) is one
concern; keeping names (:mod:`.names`) and the kernel's copy (:mod:`.kernel`)
are others.

Shipped to hosts inside the agent's zipapp (``rrmirror.host``): stdlib only, Python 3.8.
"""

from __future__ import annotations

import json
from itertools import chain
from typing import Any, Dict, List, Optional, Tuple

from .. import protocol as P
from .kernel import KernelDrops
from .names import MISSING, NameCache, parent


def listing_entries(data: bytes) -> Optional[List[Any]]:
    """The entries of an encoded directory answer (``listing.py``) as (name, attributes, link); None if malformed."""
    try:
        return entries_of(json.loads(data.decode("utf-8")))
    except (ValueError, UnicodeDecodeError):
        return None


def entries_of(body: Any) -> Optional[List[Any]]:
    """:func:`listing_entries` of an answer already decoded (one a reply carried inside its own JSON)."""
    try:
        names, rows, links = body["n"], body["a"], body["l"]
    except (KeyError, TypeError, IndexError):
        return None
    if not (isinstance(names, list) and isinstance(rows, list) and isinstance(links, list)
            and len(names) == len(rows) == len(links)):
        return None
    # Checked as whole columns (a warm start reads thousands of entries):
    # names are strings without "/" and never "", "." or ".."; a row is
    # STAT_FIELDS integers (a row that is not is an entry of unknown
    # attributes, as P.row_attrs says); a link is a string or null.
    if (not set(map(type, names)) <= {str} or "/" in "".join(names)
            or not {"", ".", ".."}.isdisjoint(names) or not set(map(type, links)) <= {str, type(None)}):
        return None
    fields = P.STAT_FIELDS
    if set(map(type, rows)) <= {list} and set(map(len, rows)) <= {len(fields)} and \
            set(map(type, chain.from_iterable(rows))) <= {int}:
        attrs: List[Any] = [dict(zip(fields, row)) for row in rows]
    else:
        attrs = [P.row_attrs(row) for row in rows]
    return list(zip(names, attrs, links))


def split_file(header: Dict[str, Any], data: bytes) -> Tuple[bytes, Optional[Tuple[List[int], bytes]]]:
    """Take the file a lookup brought off the end of *data*: (the rest, (copy key, bytes) or None).

    ``file`` is the file's copy key ([size, mtime_ns, ino, ctime_ns]); its
    size bytes end the payload. A malformed one brings nothing.
    """
    meta = header.get("file")
    if not (isinstance(meta, list) and len(meta) == 4 and all(type(v) is int for v in meta)
            and 0 < meta[0] <= len(data)):
        return data, None
    cut = len(data) - meta[0]
    return data[:cut], (meta, data[cut:])


def absorb_lookup(cache: NameCache, path: str, header: Dict[str, Any], data: bytes,
                  since: int) -> Dict[str, Any]:
    """Keep what a ``getattr`` reply told about *path* (and its whole directory); return its answer.

    The reply has ``st`` (attributes) or ``missing``; ``link`` for a symlink;
    ``w`` when the directory is watched; ``ls`` when *data* is the directory's
    answer (see ``listing.py``), followed by those of the subdirectories ``sub``
    names ([directory, length, watched]). Returns the attributes or :data:`MISSING`.
    """
    watched = bool(header.get("w"))
    if header.get("big") and path != "/":
        cache.too_big(parent(path))
    if header.get("ls") and path != "/":
        subs = _subdirectories(header, data)
        own = (parent(path), watched, len(data) - sum(size for _, _, size in subs))
        keep_answers(cache, [own] + subs, data, since)
    if header.get("missing"):
        cache.put(path, MISSING, watched=watched, since=since)
        return MISSING
    st = header["st"]
    link = header.get("link") if isinstance(header.get("link"), str) else None
    cache.put(path, st, watched=watched, since=since, link=link)
    return st


def keep_answers(cache: NameCache, parts: List[Tuple[str, bool, int]], data: bytes, since: int) -> None:
    """Keep the directory answers laid end to end in *data*: (directory, watched, size) each."""
    offset = 0
    for directory, watched, size in parts:
        part = data[offset:offset + size]
        offset += size
        entries = listing_entries(part)
        if entries is not None and cache.put_listing(directory, entries, watched=watched, since=since) \
                and cache.listings is not None:
            cache.listings.keep(directory, part)


def subdirectory_answers(cache: NameCache, header: Dict[str, Any], data: bytes, since: int) -> None:
    """Keep the answers of the subdirectories a ``readdir`` reply brought (``sub``, after ``nl`` bytes)."""
    own = header.get("nl")
    if isinstance(own, int) and 0 <= own <= len(data):
        rest = data[own:]
        keep_answers(cache, _subdirectories(header, rest), rest, since)


def _subdirectories(header: Dict[str, Any], data: bytes) -> List[Tuple[str, bool, int]]:
    """The ``sub`` answers that follow a directory's own in *data*: (directory, watched, size) each.

    A malformed ``sub`` gives none: the whole payload is then the directory's answer.
    """
    subs = header.get("sub")
    if not (isinstance(subs, list) and all(
            isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and s[0].startswith("/")
            and isinstance(s[1], int) and s[1] >= 0 for s in subs)):
        return []
    if sum(s[1] for s in subs) > len(data):
        return []
    return [(s[0], bool(s[2]), s[1]) for s in subs]


def absorb_answers(cache: NameCache, names: List[Any], answers: List[Any], watched: List[Any],
                   since: Optional[int]) -> None:
    """Keep ``validate``-style answers ([attributes, link] per name, None: missing, 0: unknown)."""
    for i, (path, answer) in enumerate(zip(names, answers)):
        if not isinstance(path, str):
            continue
        w = bool(watched[i]) if i < len(watched) else False
        if answer is None:
            cache.put(path, MISSING, watched=w, since=since)
        elif isinstance(answer, list) and len(answer) == 2 and isinstance(answer[0], dict):
            link = answer[1] if isinstance(answer[1], str) else None
            cache.put(path, answer[0], watched=w, since=since, link=link)


def absorb_listings(cache: NameCache, dirs: Any, since: Optional[int]) -> None:
    """Keep the directories a reply answered whole (``[[directory, answer, watched], ...]``,
    each answer as a lookup that asks for its directory gets it); a malformed one is skipped."""
    for item in dirs if isinstance(dirs, list) else ():
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and item[0].startswith("/") and isinstance(item[1], dict)):
            continue
        entries = entries_of(item[1])
        if entries is not None:
            cache.put_listing(item[0], entries, watched=bool(item[2]), since=since)


def absorb_invalidation(cache: NameCache, drops: Optional[KernelDrops], header: Dict[str, Any]) -> int:
    """Apply an ``inval`` frame: drop the names here, then in the kernel; return how many were held."""
    forget_names(cache, header, drops)
    forget_in_kernel(drops, header)
    return len(header.get("dropped") or ())


def forget_names(cache: NameCache, header: Dict[str, Any], drops: Optional[KernelDrops] = None) -> None:
    """The name-cache half of an ``inval`` frame, run by the link's reader as the frame arrives.

    So a reply read after the frame finds the names dropped: an answer the
    reply brings (new attributes after a write) is never overwritten by an
    older change applied later. What was held is noted in ``dropped``; the
    kernel half that follows is announced to *drops* (see :meth:`KernelDrops.settle`).
    """
    paths = [p for p in header.get("p") or () if isinstance(p, str)]
    trees = [p for p in header.get("tree") or () if isinstance(p, str)]
    if drops is not None:
        drops.expect()
        header["expected"] = True
    header["dropped"] = cache.invalidate(paths, trees, bool(header.get("all")))
    cache.changed_there(paths, trees, bool(header.get("all")))


def forget_in_kernel(drops: Optional[KernelDrops], header: Dict[str, Any]) -> None:
    """The kernel half of an ``inval`` frame (after :func:`forget_names`), in frame order."""
    if drops is not None:
        paths = [p for p in header.get("p") or () if isinstance(p, str)]
        trees = [p for p in header.get("tree") or () if isinstance(p, str)]
        drops.drop(list(dict.fromkeys(paths + trees + list(header.get("dropped") or ()))),
                   expected=bool(header.get("expected")))
