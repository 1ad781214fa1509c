"""One mirror on this host: namespaces, the mount(s), the warm start, and the teardown of it all.

Why apart: ``exec`` and ``daemon`` both run commands in the same kind of
mirror; what it is made of and the order it is set up and torn down (warm
start before mounting, profile saved before unmounting) lives here once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import logging
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

from .. import protocol as P
from .caches import open_file_cache, prefetch, validate, validate_all, wanted_files
from .command import command_user
from .link import Link
from .mount import Mount, check_fuse_device, choose_libfuse
from .listings import ListingStore, encode
from .answers import absorb_answers, forget_in_kernel, forget_names, listing_entries
from .kernel import KernelDrops
from .names import NameCache, parent
from .namespaces import SPECIAL_DIRS, bind_specials, enter_namespaces, umount, unmount_under
from .profile import Profile
from .scratch import make_private, mount_tmpdir

LOG = logging.getLogger("remote_runner.mirror.agent")


class Session:
    """One mirror on this host: namespaces, mounts, and the command(s) run in it."""

    def __init__(self, link: Link, boot: Dict[str, Any]) -> None:
        self.link = link
        self.boot = boot
        self.files_only = bool(boot.get("files_only"))
        self.mounts: List[Mount] = []
        self.root: Optional[str] = None
        self.workdir = tempfile.mkdtemp(prefix="rr-mirror-")
        os.chmod(self.workdir, 0o700)
        self.created: List[str] = []
        #: Private scratch trees mounted over the host's own (``--files-only``), unmounted last.
        self.scratch: List[str] = []
        #: The command's ``$TMPDIR``, a directory of this host mounted in the mirror (scratch.py).
        self.tmpdir: Optional[str] = None
        self.user: Optional[Tuple[int, int, List[int]]] = None
        self.files = open_file_cache(boot)
        #: Names, attributes and directories of the local side: kept until the local side
        #: says they changed (an ``inval`` frame), or for a short lease where it cannot watch.
        self.cache = NameCache()
        #: Whole directory answers kept between sessions, confirmed at start (see listings.py).
        self.listings = ListingStore(self.files.directory + ".listings") if self.files is not None else None
        self.cache.listings = self.listings
        self.drops = KernelDrops()
        link.inline[P.INVAL] = lambda header, _: forget_names(self.cache, header, self.drops)
        link.handlers[P.INVAL] = lambda header, _: forget_in_kernel(self.drops, header)
        self.profile = Profile.for_command(self.files, boot)
        if isinstance(boot.get("uid"), int) and isinstance(boot.get("gid"), int):
            link.local_ids = (boot["uid"], boot["gid"])

    def setup(self) -> None:
        """Enter namespaces and mount the mirror (or the exported trees)."""
        check_fuse_device()
        lib = choose_libfuse()
        mode = enter_namespaces(int(self.boot.get("uid", os.getuid())), int(self.boot.get("gid", os.getgid())))
        self.user = command_user(mode, self.boot)
        LOG.debug("namespaces: %s, libfuse: %s, command ids: %s", mode, lib, self.user)
        self.link.start()
        if self.files is not None:
            threading.Thread(target=self.files.trim, daemon=True, name="cache-trim").start()
        self.warm()  # before mounting: the mount's own lookups are answered too
        if self.files_only:
            self._private_scratch("/")  # first: the exports below may lie in it
            for export in self.boot.get("exports") or []:
                path = P.name_from_wire(export)
                self._ensure_dir(path)
                m = Mount(self.link, os.fsdecode(path), path, system=False, files=self.files,
                          cache=self.cache, profile=self.profile, drops=self.drops)
                m.start()
                self.mounts.append(m)
        else:
            self.root = os.path.join(self.workdir, "root")
            os.mkdir(self.root)
            m = Mount(self.link, self.root, b"", system=True, files=self.files, cache=self.cache,
                      profile=self.profile, drops=self.drops)
            m.start()
            self.mounts.append(m)
            bind_specials(self.root)
            self._private_scratch(self.root)
        wanted = self.boot.get("host_tmpdir")
        if isinstance(wanted, str) and not self.boot.get("private_tmp"):
            owner = (self.user[0], self.user[1]) if self.user is not None else None
            path = os.fsdecode(P.name_from_wire(wanted))
            self.tmpdir = mount_tmpdir(self.root or "/", path, self.workdir, owner)

    def _private_scratch(self, root: str) -> None:
        """``--private-tmp``: a tmpfs over each scratch tree the boot names (see scratch.py)."""
        spec = self.boot.get("private_tmp")
        if not isinstance(spec, dict):
            return
        trees = {}
        for tree, keep in (spec.get("trees") or {}).items():
            if isinstance(tree, str) and isinstance(keep, list):
                # --files-only mounts the served paths after this, over the tmpfs: none to keep.
                trees[os.fsdecode(P.name_from_wire(tree))] = [
                    os.fsdecode(P.name_from_wire(k)) for k in keep if isinstance(k, str) and root != "/"]
        tmpdir = spec.get("tmpdir")
        tmpdir = os.fsdecode(P.name_from_wire(tmpdir)) if isinstance(tmpdir, str) else None
        owner = (self.user[0], self.user[1]) if self.user is not None else None
        made = make_private(root, trees, self.workdir, tmpdir, owner)
        LOG.debug("private scratch trees: %s", made)
        if root == "/":  # not under the mirror's root: unmounted on their own at the end
            self.scratch = made

    def warm(self) -> int:
        """Validate known names in one request and fetch missing files at once; return the names.

        The names are those the mount itself looks up (the root and the
        directories the host's own are bound over), those this command looked
        up here last time, and those the local side saw it look up anywhere
        (its own profile). The answers (attributes, "missing", symlink targets)
        are fresh local lookups, kept until invalidated (or for a lease), so the
        program's start finds them here instead of asking one by one. The
        same request offers the directory answers kept from earlier sessions
        (:mod:`.listings`) for the directories the command used; the local
        side confirms or renews each, so lookups, negative lookups and
        listings in them are answered here from the start. Files the
        profile lists that this host has no current copy of are fetched
        together, before the command starts.
        """
        if self.files is None:
            return 0
        known = self.profile.load() if self.profile is not None else []
        own = bool(known)
        dirs = self.listings.offer(self._dirs_to_offer(known)) if self.profile is not None else []
        kept = {path for path, dg in dirs if dg}
        # A name in a kept directory comes with it (if the local side confirms the directory).
        known = [name for name in known if parent(name) not in kept]
        if not self.files_only:
            known = list(dict.fromkeys(["/"] + ["/" + d for d in SPECIAL_DIRS] + known))
        since = self.cache.begin()
        reply = validate_all(self.link, known, dirs, own)
        if reply is None:
            return 0
        names, answers, whole, watched, dir_answers, dirs_watched, changeable = reply
        self.link.changeable = changeable
        self._absorb_listings(dirs, dir_answers, dirs_watched, since)
        wanted = wanted_files(self.files, whole)
        if wanted:
            started = time.monotonic()
            prefetch(self.link, self.files, wanted)
            if time.monotonic() - started > 0.5 and not all(watched):  # leases grew old meanwhile
                since = self.cache.begin()
                fresh = validate(self.link, names)
                if fresh is not None:
                    names, answers, watched = fresh[0], fresh[1], fresh[3]
        absorb_answers(self.cache, names, answers, watched, since)
        return len(names)

    def _dirs_to_offer(self, known: List[str]) -> List[str]:
        """The profile's directories whose kept answers are worth confirming (see
        :meth:`.listings.ListingStore.worth_offering`): every directory the command
        listed; of the others, those whose answer is small next to the names used there."""
        wanted = self.profile.load_dirs()
        listed = self.profile.load_listed()
        if listed is None:
            return wanted
        used = Counter(parent(name) for name in known)
        return [d for d in wanted if d in listed or self.listings.worth_offering(d, used[d])]

    def _absorb_listings(self, offered: List[List[str]], answers: List[Any], watched: List[Any],
                         since: int) -> None:
        """Keep the directory answers ``validate`` confirmed (1) or renewed; forget the rest (0)."""
        for i, ((path, _), answer) in enumerate(zip(offered, answers)):
            payload = None
            if answer == 1:
                payload = self.listings.load(path)
            elif isinstance(answer, dict):
                payload = encode(answer)
                self.listings.keep(path, payload)
            elif self.profile is not None:
                self.profile.unlisted.add(path)
            entries = listing_entries(payload) if payload is not None else None
            if entries is not None:
                w = bool(watched[i]) if i < len(watched) else False
                self.cache.put_listing(path, entries, watched=w, since=since)

    def _ensure_dir(self, path: bytes) -> None:
        missing = []
        cur = path
        while not os.path.isdir(cur) and cur not in (b"/", b""):
            missing.append(cur)
            cur = os.path.dirname(cur)
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            self.created.append(os.fsdecode(d))

    def teardown(self) -> None:
        """Save the lookup profile, unmount everything and remove what we created."""
        if self.profile is not None:
            self.profile.save()
        if self.listings is not None:
            self.listings.save()
        if self.root:
            unmount_under(self.root)
        elif self.tmpdir is not None:  # on top of the export it lies in
            try:
                umount(os.fsencode(self.tmpdir))
            except OSError:
                pass
        for m in reversed(self.mounts):
            m.stop()
        for d in reversed(self.created):
            try:
                os.rmdir(d)
            except OSError:
                pass
        for tree in self.scratch:  # ours only (with what is mounted in it): the host's /tmp is back
            try:
                umount(os.fsencode(tree))
            except OSError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)
