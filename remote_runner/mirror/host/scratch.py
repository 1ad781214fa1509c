"""Scratch space of the host: a private ``/tmp`` and ``/var/tmp`` (``--private-tmp``), and ``$TMPDIR``.

Why: a test suite or a compiler writes and removes thousands of scratch
files, and through the mirror each create, write, close, unlink and rmdir is
a request to the local side. Measured at 0 ms on this project's lab: five
files of CPython's test suite 9.7-12 s through the mirror's ``/tmp`` against
2.8 s with a private one (2.1 s locally): the scratch traffic, not the
program, was the cost. A private ``/tmp`` is what a user asks for when the
scratch files are not results: a fresh tmpfs (mode 1777) in the agent's own
mount namespace, so nothing is written to the host's disk and everything is
gone when the mirror ends.

What stays this machine's: every path the local side serves inside a
scratch tree (the cwd, paths the command names, ``--export`` ones, the
program itself) is bound into the tmpfs at the same path before the tmpfs
is moved over the mirror's tree, so a command run from ``/tmp/build`` still
reads and writes the local ``/tmp/build``. When the command names the tree
itself (``cc -o /tmp/prog``), the local side keeps that tree shared (see
``Exports.private_scratch``): no output is ever written where the user
would not find it. ``$TMPDIR`` inside a private tree is made there, empty,
for the command's user.

Without ``--private-tmp``, :func:`mount_tmpdir` gives the command a
``$TMPDIR`` of the host inside the mirror's ``/tmp`` (the local side's reasons
are in ``mirror/tmpdir.py``).
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Dict, List, Optional, Sequence, Tuple

from .namespaces import MS_BIND, MS_MOVE, mount, umount

LOG = logging.getLogger("remote_runner.mirror.agent")


def outermost(paths: Sequence[str]) -> List[str]:
    """*paths* without those inside another one of them, sorted."""
    out: List[str] = []
    for path in sorted(set(paths)):
        if not any(path == kept or path.startswith(kept.rstrip("/") + "/") for kept in out):
            out.append(path)
    return out


def make_private(root: str, trees: Dict[str, List[str]], stage: str,
                 tmpdir: Optional[str] = None, owner: Optional[Tuple[int, int]] = None) -> List[str]:
    """Put a fresh tmpfs over each of *trees* under *root*; return the trees made private.

    *trees* maps a tree (``/tmp``) to the paths inside it that stay served
    (absolute, as the command sees them). *root* is the mirror's root (``/``
    with ``--files-only``, whose mounts are made after this). *stage* is an
    empty private directory of the agent where each tmpfs is prepared before
    it is moved into place. A tree that is not a directory under *root* is
    left alone.
    """
    staged_trees: List[Tuple[str, str, str]] = []
    try:
        _stage(root, trees, stage, tmpdir, owner, staged_trees)
    except BaseException:
        for _, _, staged in staged_trees:
            try:
                umount(os.fsencode(staged))
            except OSError:
                pass
        raise
    # Moved last: the tree that holds *stage* (the host's own /tmp, with --files-only).
    staged_trees.sort(key=lambda item: _inside(stage, item[1]))
    for tree, target, staged in staged_trees:
        mount(os.fsencode(staged), os.fsencode(target), None, MS_MOVE)
    return [tree for tree, _, _ in staged_trees]


def _stage(root: str, trees: Dict[str, List[str]], stage: str, tmpdir: Optional[str],
           owner: Optional[Tuple[int, int]], staged_trees: List[Tuple[str, str, str]]) -> None:
    """Mount each tree's tmpfs under *stage* with what it keeps; add (tree, target, staged) as made."""
    for number, (tree, keep) in enumerate(sorted(trees.items())):
        target = _under(root, tree)
        try:
            if not stat.S_ISDIR(os.lstat(target).st_mode):
                continue
        except OSError:
            continue
        staged = os.path.join(stage, "scratch-%d" % number)
        os.mkdir(staged, 0o700)
        try:
            mount(b"tmpfs", os.fsencode(staged), b"tmpfs", 0, b"mode=1777")
        except OSError as exc:
            raise OSError(exc.errno, "private tmp: this host refuses a tmpfs for %s (%s); run without "
                                     "--private-tmp / private_tmp" % (tree, os.strerror(exc.errno))) from None
        staged_trees.append((tree, target, staged))
        for path in outermost([p for p in keep if _inside(p, tree) and p != tree]):
            _keep(root, tree, staged, path)
        if tmpdir and _inside(tmpdir, tree) and tmpdir != tree:
            _make_tmpdir(staged, tree, tmpdir, owner)


def _keep(root: str, tree: str, staged: str, path: str) -> None:
    """Bind the mirror's *path* into the staged tmpfs at the same place (a symlink is copied)."""
    source = _under(root, path)
    try:
        st = os.lstat(source)
    except OSError as exc:
        LOG.debug("private tmp: %s is not served (%s); not kept", path, exc.strerror)
        return
    inner = os.path.join(staged, os.path.relpath(path, tree))
    _make_parents(root, tree, staged, os.path.dirname(path))
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(source), inner)
        return
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(inner, 0o700)
    else:
        os.close(os.open(inner, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    mount(os.fsencode(source), os.fsencode(inner), None, MS_BIND)


def _make_parents(root: str, tree: str, staged: str, directory: str) -> None:
    """Make *directory*'s missing levels below *tree* in the tmpfs with the mirror's modes and owners."""
    for level in _levels(directory, tree):
        inner = os.path.join(staged, os.path.relpath(level, tree))
        if os.path.isdir(inner):
            continue
        os.mkdir(inner, 0o700)
        try:
            st = os.stat(_under(root, level))
            os.chown(inner, st.st_uid, st.st_gid)
            os.chmod(inner, stat.S_IMODE(st.st_mode))
        except OSError:
            os.chmod(inner, 0o755)


def _make_tmpdir(staged: str, tree: str, tmpdir: str, owner: Optional[Tuple[int, int]]) -> None:
    """Make ``$TMPDIR`` (empty, mode 0700, the command user's) when the tmpfs lacks it."""
    for level in _levels(tmpdir, tree):
        inner = os.path.join(staged, os.path.relpath(level, tree))
        if os.path.lexists(inner):
            continue
        os.mkdir(inner, 0o700 if level == tmpdir else 0o755)
        if owner is not None:
            try:
                os.chown(inner, owner[0], owner[1])
            except OSError:
                pass


def _levels(directory: str, tree: str) -> List[str]:
    """The directories from just below *tree* down to *directory* (none when it is *tree*)."""
    levels = []
    while directory != tree and _inside(directory, tree):
        levels.append(directory)
        directory = os.path.dirname(directory)
    return levels[::-1]


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/")) if root != "/" else path


def mount_tmpdir(root: str, path: str, workdir: str, owner: Optional[Tuple[int, int]]) -> Optional[str]:
    """Mount a fresh directory of this host over the mirror's *path*; return *path* (None: not made).

    *path* is the empty directory the local side made for it (absolute, as
    the command sees it); the new directory is made in *workdir* (removed
    with it when the mirror ends), mode 0700, owned by *owner* (uid, gid).
    """
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        return None
    target = _under(root, path)
    try:
        if not stat.S_ISDIR(os.lstat(target).st_mode):
            return None
        source = os.path.join(workdir, "tmpdir")
        os.mkdir(source, 0o700)
        if owner is not None:
            os.chown(source, owner[0], owner[1])
        mount(os.fsencode(source), os.fsencode(target), None, MS_BIND)
    except OSError as exc:
        LOG.debug("host $TMPDIR: not mounted over %s: %s", path, exc)
        return None
    return path
