"""Mount and user namespaces, and the libc calls they need (unshare, mount, umount2, prctl).

Why apart: these are the only raw syscalls of the agent (ctypes, no
threads allowed around unshare(2)); the rest of the agent calls them by
name. The mirror lives in a private mount namespace (a user namespace too
when not root), so whatever happens, nothing is left mounted on the host.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1

PR_SET_CHILD_SUBREAPER = 36

SPECIAL_DIRS = ("dev", "proc", "sys", "run")

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(res: int, what: str) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def unshare(flags: int) -> None:
    """Call unshare(2)."""
    _check(libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: Optional[bytes], target: bytes, fstype: Optional[bytes], flags: int,
          data: Optional[bytes] = None) -> None:
    """Call mount(2)."""
    _check(libc.mount(source, target, fstype, ctypes.c_ulong(flags), data), "mount %r" % target)


def umount(target: bytes, flags: int = MNT_DETACH) -> None:
    """Call umount2(2)."""
    _check(libc.umount2(target, ctypes.c_int(flags)), "umount %r" % target)


def prctl(option: int, arg: int) -> None:
    """Call prctl(2) with one argument."""
    _check(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), 0, 0, 0), "prctl")


def enter_namespaces(local_uid: int, local_gid: int) -> str:
    """Enter a private mount namespace (with a user namespace when not root); return the mode."""
    if os.geteuid() == 0:
        unshare(CLONE_NEWNS)
        mode = "root"
    else:
        uid, gid = os.geteuid(), os.getegid()
        try:
            unshare(CLONE_NEWUSER | CLONE_NEWNS)
        except OSError as exc:
            raise OSError(exc.errno, "cannot create a user namespace as uid %d (%s); the mirror needs "
                          "root on the host or unprivileged user namespaces "
                          "(kernel.unprivileged_userns_clone=1, user.max_user_namespaces>0, no AppArmor "
                          "restriction)" % (uid, exc.strerror))
        with open("/proc/self/setgroups", "w") as fh:
            fh.write("deny")
        with open("/proc/self/uid_map", "w") as fh:
            fh.write("%d %d 1\n" % (local_uid, uid))
        with open("/proc/self/gid_map", "w") as fh:
            fh.write("%d %d 1\n" % (local_gid, gid))
        mode = "userns"
    mount(b"none", b"/", None, MS_REC | MS_PRIVATE)
    return mode


def bind_specials(root: str) -> None:
    """Bind the host's /dev, /proc, /sys and /run over the mirror's."""
    for name in SPECIAL_DIRS:
        source = "/" + name
        target = os.path.join(root, name)
        if not os.path.isdir(source):
            continue
        try:
            if not os.path.isdir(target):
                continue
        except OSError:
            continue
        mount(os.fsencode(source), os.fsencode(target), None, MS_BIND | MS_REC)
        try:
            mount(None, os.fsencode(target), None, MS_SLAVE | MS_REC)
        except OSError:
            pass


def unmount_under(root: str) -> None:
    """Lazily unmount *root* and everything below it, deepest first."""
    targets = []
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            for line in fh:
                point = line.split()[4].decode("utf-8", "surrogateescape")
                point = point.replace("\\040", " ")
                if point == root or point.startswith(root.rstrip("/") + "/"):
                    targets.append(point)
    except OSError:
        return
    for point in sorted(targets, key=len, reverse=True):
        try:
            umount(os.fsencode(point), MNT_DETACH)
        except OSError:
            pass
