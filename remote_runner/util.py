"""Helpers that experiment configs and muddlers see as the global ``util``.

SPAR exported one function here, ``recursive_files_dict``, so that a config can
ship a whole directory tree with one line. It is kept with the same name and
arguments, with two fixes that keep the copy faithful to the tree on disk:

* empty directories are kept (as directory entries, which the runner creates
  on the host); SPAR silently dropped them;
* a missing (or non-directory) source still gives SPAR's empty dict, because
  real muddlers call this on optional directories (a ``mods/`` or ``queries/``
  folder that only some campaigns have), but it is no longer silent: a
  WARNING names the config line that asked and the path it looked for.

Symlinked directories are not followed (``os.walk``'s default, as in SPAR); each
one skipped is logged as a warning so nothing disappears silently. Dotfiles are
included.

Configs call it once per component, often on the same tree (every client ships
the same harness): 20 clients of a 1,000-file tree listed it 20 times, 5 ms
each. A listing is remembered with the stat of every directory it walked and
given again (a copy) while none of them changed: adding, removing or renaming
an entry changes its directory's mtime. A directory modified less than
:data:`RACY_NS` before the walk is not trusted to show a later change in its
mtime (the kernel's clock for it is coarse), so such a listing is not kept.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from typing import Dict, List, Optional, Tuple

from remote_runner.config import caller_origin


LOG = logging.getLogger(__name__)

__all__ = ["recursive_files_dict"]

#: A directory changed this recently (ns) before a walk may change again unseen by its mtime.
RACY_NS = 100_000_000
#: (cwd, src_path, dest_path) -> (mapping, [(directory, mtime_ns, inode)...]) of earlier walks
_LISTINGS: Dict[Tuple[str, str, str], Tuple[Dict[str, str], List[Tuple[str, int, int]]]] = {}


def recursive_files_dict(src_path: str, dest_path: str) -> Dict[str, str]:
    """Map every file (and empty directory) under *src_path* to its place under *dest_path*.

    A relative *src_path* gives relative keys, which the runner resolves against
    the config's directory (configs run with that directory as the cwd). The
    values are POSIX paths on the host: relative ones are relative to the
    component's ``base_dir``, and ``dest_path='.'`` means "into base_dir".
    """
    if not isinstance(src_path, str) or not isinstance(dest_path, str):
        raise TypeError("recursive_files_dict(src_path, dest_path) takes two strings")
    if not os.path.isdir(src_path):
        what = "is not a directory" if os.path.exists(src_path) else "does not exist"
        LOG.warning("%s: recursive_files_dict: %s (%s) %s; nothing to copy from it",
                    caller_origin(), src_path, os.path.abspath(src_path), what)
        return {}
    key = (os.getcwd(), src_path, dest_path)
    known = _LISTINGS.get(key)
    if known is not None and all(_stamp(d) == (d, m, i) for d, m, i in known[1]):
        return dict(known[0])
    started = time.time_ns()
    walked: Optional[List[Tuple[str, int, int]]] = []
    mapping: Dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(src_path):
        stamp = _stamp(dirpath)
        if walked is not None and stamp is not None and stamp[1] < started - RACY_NS:
            walked.append(stamp)
        else:
            walked = None  # gone meanwhile, or changed just now: not remembered
        dirnames.sort()
        for name in list(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                LOG.warning("recursive_files_dict: not following symlinked directory %s",
                            os.path.join(dirpath, name))
                walked = None  # (not remembered: the next call warns again)
        if filenames:
            # One destination directory per directory, not a normpath per file.
            there = _dest(src_path, dest_path, dirpath)
            join = (lambda name: name) if there == "." else (
                (lambda name: "/" + name) if there == "/" else (lambda name: there + "/" + name))
            for name in sorted(filenames):
                mapping[os.path.join(dirpath, name)] = join(name)
        real_subdirs = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        if not filenames and not real_subdirs:
            _add(mapping, src_path, dest_path, dirpath)
    if walked is not None:
        _LISTINGS[key] = (dict(mapping), walked)
    return mapping


def _stamp(path: str) -> Optional[Tuple[str, int, int]]:
    """(path, mtime_ns, inode) of directory *path*, or None when it cannot be looked at."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_mtime_ns, st.st_ino)


def _add(mapping: Dict[str, str], src_root: str, dest_root: str, path: str) -> None:
    """Record *path* (below *src_root*) at the matching place below *dest_root*."""
    mapping[path] = _dest(src_root, dest_root, path)


def _dest(src_root: str, dest_root: str, path: str) -> str:
    """The place of *path* (below *src_root*) below *dest_root*, normalised."""
    # os.walk joins onto src_root as given: cutting it off is relpath's answer, without
    # relpath's two abspath calls per file (a tree of thousands, once per component).
    rel = path[len(src_root):].lstrip(os.sep) if path.startswith(src_root) else os.path.relpath(path, src_root)
    rel = (rel or ".").replace(os.sep, "/")
    return posixpath.normpath(posixpath.join(dest_root, rel))
