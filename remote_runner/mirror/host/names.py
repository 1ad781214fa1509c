"""What the host knows of local names: attributes, symlink targets, whole directories.

Why: every lookup the host's kernel makes would otherwise be a round trip.
The local side answers a lookup with its whole directory (names and
attributes, NFS's READDIRPLUS idea), so later lookups in that directory --
including the *negative* ones of ``sys.path`` probing, ``PATH`` search,
ld.so's search path -- are answered here. And it watches the directories it
answered for (see ``watcher.py`` on the local side): what a watched
directory said stands until an ``inval`` frame drops exactly the changed
names; what an unwatched one said (no watch left, network file system) holds
only for a short lease.

Races: an answer may be computed before a change whose invalidation is
processed here before the answer is stored. Callers take :meth:`begin`
before sending the request and pass it to :meth:`put`; anything invalidated
since then is not stored (the next lookup asks again). Writes through the
mirror drop only what they changed (:meth:`changed`, :meth:`renamed`).

Shipped to hosts inside the agent's zipapp (``rrmirror.host``): stdlib only, Python 3.8.
"""

from __future__ import annotations

import posixpath
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from .aliases import InodeAliases

#: What :meth:`NameCache.get` returns for a name known not to exist.
MISSING: Dict[str, int] = {"missing": 1}
#: How long an answer from an unwatched directory stands.
LEASE = 1.0
#: Forget everything past this many names (and remember invalidations past this many).
LIMIT = 200000
STAMPS = 20000
FOREVER = float("inf")
#: A directory too big for one answer is not asked for whole again for this long.
BIG_DIRECTORY_SECONDS = 60.0


def parent(path: str) -> str:
    """The directory of *path* (``/`` for ``/``)."""
    return posixpath.dirname(path.rstrip("/")) or "/"


def absolute_names(items: Any) -> List[str]:
    """The absolute wire names of *items*, a list the local side sent (anything else: none)."""
    return [n for n in items if isinstance(n, str) and n.startswith("/")] if isinstance(items, list) else []


class _Listing:
    __slots__ = ("names", "unknown", "until")

    def __init__(self, names: Set[str], until: float) -> None:
        self.names = names
        self.unknown: Set[str] = set()
        self.until = until


class NameCache:
    """Answers for local paths, kept until invalidated (watched) or for a lease (not watched)."""

    def __init__(self, lease: float = LEASE, limit: int = LIMIT) -> None:
        self.lease = lease
        self.limit = limit
        self._lock = threading.Lock()
        # path -> (until, attributes or MISSING)
        self._attrs: Dict[str, Tuple[float, Dict[str, Any]]] = {}
        self._links: Dict[str, Tuple[float, str]] = {}
        self._lists: Dict[str, _Listing] = {}
        self._kids: Dict[str, Set[str]] = {}  # directory -> names held under it
        self._epoch = 0
        self._floor = 0
        self._stamps: Dict[str, int] = {}   # path -> epoch of its last invalidation
        self._trees: Dict[str, int] = {}    # path -> epoch it was dropped with all below it
        # The same, for the local side's changes only (an ``inval``), not this mount's own.
        self._there: Tuple[Dict[str, int], Dict[str, int]] = ({}, {})
        self._there_floor = 0
        self._big: Dict[str, float] = {}    # directories too big to be answered whole, until when
        self._types: Dict[str, int] = {}   # path -> file type the kernel was last given
        self._retyped: Set[str] = set()     # paths this machine said appeared, went or were replaced
        self._type_kids: Dict[str, Set[str]] = {}  # directory -> names below it in _types
        #: Where whole directory answers are kept between sessions (``listings.py``), if anywhere.
        self.listings: Any = None
        #: Inodes the host made up for files it created without waiting (see aliases.py).
        self.inodes = InodeAliases()
        self.hits = 0
        self.negative_hits = 0
        self.misses = 0
        self.invalidated = 0

    # -- bookkeeping --------------------------------------------------------------
    def begin(self) -> int:
        """A token to pass to :meth:`put` for an answer requested from now on.

        Newer than every invalidation made so far (they are stamped with the
        epoch they made): an answer asked for after a name was dropped is kept.
        """
        with self._lock:
            return self._epoch + 1

    def _stale(self, path: str, since: Optional[int]) -> bool:
        """Whether *path* was invalidated after *since* (None: the answer is new enough)."""
        if since is None:
            return False
        if since < self._floor or self._stamps.get(path, -1) >= since:
            return True
        return self._tree_changed(path, since)

    def _until(self, watched: bool, now: Optional[float]) -> float:
        return FOREVER if watched else (time.monotonic() if now is None else now) + self.lease

    def _index(self, path: str) -> None:
        if path != "/":
            self._kids.setdefault(parent(path), set()).add(posixpath.basename(path))

    def _room(self) -> None:
        if len(self._attrs) + len(self._lists) > self.limit:
            self._attrs.clear()
            self._links.clear()
            self._lists.clear()
            self._kids.clear()

    def _stamp(self, table: Dict[str, int], path: str) -> None:
        if len(self._stamps) + len(self._trees) > STAMPS:
            self._stamps.clear()
            self._trees.clear()
            self._floor = self._epoch + 1
        table[path] = self._epoch

    # -- storing ------------------------------------------------------------------
    def put(self, path: str, attrs: Optional[Dict[str, Any]], watched: bool = False,
            since: Optional[int] = None, link: Optional[str] = None,
            now: Optional[float] = None) -> bool:
        """Keep *attrs* (None or MISSING: the name does not exist) for *path*; tell whether kept."""
        if attrs is None:
            attrs = MISSING
        if not attrs.get("missing"):
            self.inodes.adopt(path, attrs)
            # A file with several names changes through names in other directories,
            # whose watches do not see it: lease only.
            mode = int(attrs.get("st_mode", 0))
            if int(attrs.get("st_nlink", 1)) > 1 and (mode & 0o170000) != 0o040000:
                watched = False
        with self._lock:
            if self._stale(path, since):
                return False
            self._room()
            until = self._until(watched, now)
            self._attrs[path] = (until, attrs)
            if link is not None:
                self._links[path] = (until, link)
            else:
                self._links.pop(path, None)
            self._index(path)
            listing = self._lists.get(parent(path)) if path != "/" else None
            if listing is not None:  # a fresh answer settles the name in its directory's listing
                name = posixpath.basename(path)
                listing.unknown.discard(name)
                if attrs.get("missing"):
                    listing.names.discard(name)
                else:
                    listing.names.add(name)
            return True

    def put_listing(self, directory: str, entries: Iterable[Tuple[str, Optional[Dict[str, Any]], Optional[str]]],
                    watched: bool = False, since: Optional[int] = None,
                    now: Optional[float] = None) -> bool:
        """Keep a whole directory: (name, attributes, symlink target) of every entry.

        Names not listed are answered as missing while the listing stands.
        An entry invalidated since *since* is kept as unknown (asked again).
        """
        with self._lock:
            if self._trees_after(directory, since):
                return False
            self._room()
            until = self._until(watched, now)
            base = directory.rstrip("/") + "/"
            listing = _Listing(set(), until)
            # The directory and those above it stand (checked above): an entry
            # is stale only if it was itself invalidated since.
            stamps, trees = self._stamps, self._trees
            kids = self._kids.setdefault(directory, set())
            adopt = self.inodes.adopt
            for name, attrs, link in entries:
                path = base + name
                if attrs:
                    adopt(path, attrs)
                listing.names.add(name)
                if since is not None and (stamps.get(path, -1) >= since or trees.get(path, -1) >= since):
                    listing.unknown.add(name)
                    continue
                if attrs:
                    keep = until
                    mode = int(attrs.get("st_mode", 0))
                    if int(attrs.get("st_nlink", 1)) > 1 and (mode & 0o170000) != 0o040000:
                        keep = min(until, self._until(False, now))
                    self._attrs[path] = (keep, attrs)
                    if link is not None:
                        self._links[path] = (keep, link)
                    kids.add(name)
                else:
                    listing.unknown.add(name)
            self._lists[directory] = listing
            self._index(directory)
            return True

    def _trees_after(self, directory: str, since: Optional[int]) -> bool:
        """Whether *directory* itself went away (or moved) after *since*."""
        if since is None:
            return False
        if since < self._floor:
            return True
        return self._tree_changed(directory, since)

    def _tree_changed(self, node: str, since: float) -> bool:
        """Whether *node* or a directory above it was invalidated as a whole after *since*."""
        while True:
            if self._trees.get(node, -1) >= since:
                return True
            if node == "/":
                return False
            node = parent(node)

    # -- answering ----------------------------------------------------------------
    def get(self, path: str, now: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """Attributes of *path*, :data:`MISSING`, or None (unknown here: ask)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._attrs.get(path)
            if entry is not None:
                if entry[0] > now:
                    self.hits += 1
                    if entry[1].get("missing"):
                        self.negative_hits += 1
                    return entry[1]
                del self._attrs[path]
            if path != "/":
                listing = self._lists.get(parent(path))
                name = posixpath.basename(path)
                if (listing is not None and listing.until > now and name not in listing.names
                        and name not in listing.unknown):
                    self.hits += 1
                    self.negative_hits += 1
                    return MISSING
            self.misses += 1
            return None

    def kept(self, path: str) -> bool:
        """Whether what is held of *path* stands until invalidated (its directory is watched)."""
        with self._lock:
            entry = self._attrs.get(path)
            if entry is not None:
                return entry[0] == FOREVER
            listing = self._lists.get(parent(path)) if path != "/" else None
            return listing is not None and listing.until == FOREVER

    def link(self, path: str, now: Optional[float] = None) -> Optional[str]:
        """The symlink target of *path*, if held."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._links.get(path)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def listed(self, directory: str, now: Optional[float] = None) -> bool:
        """Whether a whole listing of *directory* stands here."""
        now = time.monotonic() if now is None else now
        with self._lock:
            listing = self._lists.get(directory)
            return listing is not None and listing.until > now

    def wants_listing(self, directory: str, now: Optional[float] = None) -> bool:
        """Whether a lookup in *directory* should ask for the whole directory."""
        now = time.monotonic() if now is None else now
        with self._lock:
            listing = self._lists.get(directory)
            if listing is not None and listing.until > now:
                return False
            return self._big.get(directory, 0.0) <= now

    def too_big(self, directory: str, now: Optional[float] = None) -> None:
        """*directory* is answered name by name: do not ask for it whole for a while."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._big) > 10000:
                self._big.clear()
            self._big[directory] = now + BIG_DIRECTORY_SECONDS

    def names(self, directory: str, now: Optional[float] = None) -> Optional[List[Tuple[str, Optional[Dict[str, Any]]]]]:
        """A complete listing of *directory* with attributes, or None (ask)."""
        now = time.monotonic() if now is None else now
        base = directory.rstrip("/") + "/"
        with self._lock:
            listing = self._lists.get(directory)
            if listing is None or listing.until <= now or listing.unknown:
                return None
            out = []
            for name in sorted(listing.names):
                entry = self._attrs.get(base + name)
                if entry is None or entry[0] <= now:
                    return None
                out.append((name, entry[1]))
            return out

    # -- dropping -------------------------------------------------------------------
    def invalidate(self, paths: Iterable[str] = (), trees: Iterable[str] = (),
                   everything: bool = False) -> List[str]:
        """Drop what changed on the local side; return the paths held that were dropped.

        *paths*: their attributes changed (the name stays); *trees*: the name
        appeared, went away or was replaced: it and everything below it go,
        and its directory's listing no longer knows the name.
        """
        dropped: List[str] = []
        with self._lock:
            self._epoch += 1
            self.invalidated += 1
            if everything:
                self._retyped.update(self._types)
                dropped = list(self._attrs)
                self._attrs.clear()
                self._links.clear()
                self._lists.clear()
                self._kids.clear()
                self._stamps.clear()
                self._trees.clear()
                self._floor = self._epoch + 1
                self._epoch += 1
                return dropped
            kept = self.listings
            for path in paths:
                self._stamp(self._stamps, path)
                if self._attrs.pop(path, None) is not None:
                    dropped.append(path)
                self._links.pop(path, None)
                if kept is not None:  # its directory's answer holds its attributes
                    kept.forget(parent(path))
            for top in trees:
                self._stamp(self._trees, top)
                if kept is not None:
                    kept.forget(top)
                    kept.forget(parent(top))
                if top != "/":
                    listing = self._lists.get(parent(top))
                    if listing is not None:
                        listing.unknown.add(posixpath.basename(top))
                # the name, and what the kernel may still hold below it, may come back as another type
                self._mark_retyped(top)
                dropped.extend(self._drop_tree(top))
            return dropped

    def _drop_tree(self, top: str) -> List[str]:
        dropped = []
        stack = [top]
        while stack:
            path = stack.pop()
            if self._attrs.pop(path, None) is not None:
                dropped.append(path)
            self._links.pop(path, None)
            self._lists.pop(path, None)
            kids = self._kids.pop(path, None)
            if kids:
                base = path.rstrip("/") + "/"
                stack.extend(base + name for name in kids)
        return dropped

    def _mark_retyped(self, top: str) -> None:
        stack = [top]
        while stack:
            path = stack.pop()
            if path in self._types:
                self._retyped.add(path)
            base = path.rstrip("/") + "/"
            stack.extend(base + name for name in self._type_kids.get(path, ()))

    def kernel_must_look_up(self, path: str, mode: int) -> bool:
        """Record that the kernel gets *path* as file type *mode*; tell whether it must look it up again.

        The kernel keeps a name's dentry for the entry timeout, and libfuse's
        high-level API cannot drop it; ``fuse_invalidate_path`` only drops the
        inode's attributes. When this machine replaced the name by one of
        another type (a file by a directory or a symlink, ...), the kernel's
        next ``getattr`` on the old inode would get the new type, mark the
        inode bad and fail with EIO. Answering ESTALE instead makes the VFS
        walk the path again with ``LOOKUP_REVAL``, which asks us for the name
        (a lookup) and gives the new type a new inode.
        """
        kind = mode & 0o170000
        with self._lock:
            before = self._types.get(path)
            if len(self._types) > self.limit:
                self._types.clear()
                self._type_kids.clear()
                self._retyped.clear()
            if before is None and path != "/":
                self._type_kids.setdefault(parent(path), set()).add(posixpath.basename(path))
            self._types[path] = kind
            if path not in self._retyped:
                return False
            self._retyped.discard(path)
            return before is not None and before != kind

    def kernel_forgets(self, paths: Iterable[str]) -> None:
        """The mirror itself created, removed or renamed *paths*: the kernel knows their new state."""
        with self._lock:
            for path in paths:
                self._types.pop(path, None)
                self._retyped.discard(path)

    def changed_there(self, paths: Iterable[str], trees: Iterable[str], everything: bool) -> None:
        """The local side changed *paths* (attributes), *trees* (names) or *everything* (an ``inval``)."""
        with self._lock:
            stamps, tops = self._there
            if everything or len(stamps) + len(tops) > STAMPS:
                stamps.clear()
                tops.clear()
                self._there_floor = self._epoch + 1
            for path in paths:
                stamps[path] = self._epoch
            for top in trees:
                tops[top] = self._epoch

    def changed_there_since(self, path: str, since: int) -> bool:
        """Whether the local side changed *path* (or dropped a tree above it) after token *since*."""
        with self._lock:
            stamps, tops = self._there
            if since < self._there_floor or stamps.get(path, -1) >= since:
                return True
            node = path
            while True:
                if tops.get(node, -1) >= since:
                    return True
                if node == "/":
                    return False
                node = parent(node)

    def changed_since(self, path: str, since: int) -> bool:
        """Whether *path* was invalidated (here or by the local side) after token *since*."""
        with self._lock:
            return self._stale(path, since)

    def changed(self, path: str) -> None:
        """The mirror changed *path*'s data or attributes (write, chmod, truncate...)."""
        self.invalidate(paths=[path])

    def renamed(self, *paths: str) -> None:
        """The mirror created, removed or renamed these names: drop them and their directories' attributes."""
        self.kernel_forgets(paths)
        self.invalidate(paths=[parent(p) for p in paths], trees=list(paths))

    def clear(self) -> None:
        self.invalidate(everything=True)

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "negative_hits": self.negative_hits, "misses": self.misses,
                    "invalidations": self.invalidated, "names": len(self._attrs),
                    "listings": len(self._lists)}
