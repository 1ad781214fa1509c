"""PID 1 of a lab host: build its filesystem view, run its sshd, reap orphans.

This runs inside fresh PID, mount and UTS namespaces (and the host's network
namespace), started by :class:`remote_runner.lab.Lab`. Because it is PID 1,
the kernel kills every process of the host when it exits, so stopping one PID
stops the whole host; and because the mount namespace is private, every mount
made here (the tmpfs holding the overlay's upper layer, the overlay itself,
/proc, /tmp, ...) disappears with it. Nothing is left on the local machine.

The host's root is an overlay whose lower layer is the local root file system
and whose upper layer is a tmpfs: a file written on ``h1`` is invisible on
``h2`` and locally. Paths the lab marks local-only get overlay whiteouts, so
they are *absent* on the host, not merely empty.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import socket
import subprocess
import sys
from typing import Dict, List

#: Directories that get a fresh tmpfs on every host: (path, mode).
PRIVATE_DIRS = (("tmp", 0o1777), ("var/tmp", 0o1777), ("run", 0o755),
                ("root", 0o700), ("home", 0o755))


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _populate_upper(upper: str, files: List[Dict], whiteouts: List[str]) -> None:
    """Write the host's own files and whiteouts into the overlay's upper layer."""
    for entry in files:
        path = os.path.join(upper, entry["path"].lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(entry["content"])
        os.chmod(path, entry.get("mode", 0o644))
    for hidden in whiteouts:
        path = os.path.join(upper, hidden.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # A character device 0/0 in the upper layer is overlayfs' whiteout:
        # the lower path vanishes from the merged view.
        os.mknod(path, 0o600 | 0o020000, os.makedev(0, 0))


def build_root(spec: Dict) -> str:
    """Mount the host's root and return its path."""
    base = spec["mount_dir"]
    _mount("-t", "tmpfs", "-o", "mode=0755", "rrlab-" + spec["host"], base)
    upper, work, root = (os.path.join(base, d) for d in ("upper", "work", "root"))
    for d in (upper, work, root):
        os.mkdir(d)
    _populate_upper(upper, spec["files"], spec["whiteouts"])
    lower = spec.get("lower", "/")
    _mount("-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", root)
    _mount("-t", "proc", "proc", os.path.join(root, "proc"))
    _mount("-t", "sysfs", "sysfs", os.path.join(root, "sys"))
    _mount("--rbind", "/dev", os.path.join(root, "dev"))
    _mount("-t", "tmpfs", "-o", "mode=1777", "shm", os.path.join(root, "dev/shm"))
    # /dev is the local machine's; give the host its own /dev/fuse node with the
    # usual 0666 mode (as on a stock distribution) without touching the local one.
    if os.path.exists("/dev/fuse"):
        node = os.path.join(base, "fuse")
        os.mknod(node, 0o666 | 0o020000, os.makedev(10, 229))
        os.chmod(node, 0o666)
        _mount("--bind", node, os.path.join(root, "dev/fuse"))
    for rel, mode in PRIVATE_DIRS:
        target = os.path.join(root, rel)
        os.makedirs(target, exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"mode={mode:o}", "rrlab", target)
    for rel, mode in (("run/sshd", 0o755), ("run/screen", 0o1777), ("run/lock", 0o1777)):
        os.mkdir(os.path.join(root, rel))
        os.chmod(os.path.join(root, rel), mode)
    for user in spec["users"]:
        home = os.path.join(root, user["home"].lstrip("/"))
        os.makedirs(home, exist_ok=True)
        os.chmod(home, 0o755)
        os.chown(home, user["uid"], user["gid"])
    return root


#: pivot_root(2) has no libc wrapper; its syscall number per architecture.
PIVOT_ROOT_SYSCALL = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
MNT_DETACH = 2


def enter_root(root: str) -> None:
    """Make *root* the root of this mount namespace (not a chroot).

    The kernel refuses user namespaces to chrooted processes, and the mirror
    needs them for non-root users, so the host's processes must see a real
    root: pivot_root(".", ".") stacks the old root on the new one, and a lazy
    unmount then drops it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    os.chdir(root)
    number = PIVOT_ROOT_SYSCALL[platform.machine()]
    if libc.syscall(number, b".", b".") != 0:
        raise OSError(ctypes.get_errno(), "pivot_root failed")
    if libc.umount2(b".", MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), "unmounting the old root failed")
    os.chdir("/")


def main(argv: List[str]) -> int:
    with open(argv[1]) as handle:
        spec = json.load(handle)
    socket.sethostname(spec["host"])
    root = build_root(spec)
    log = open(spec["log"], "ab", buffering=0)
    enter_root(root)
    sshd = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", spec["sshd_config"]],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def stop(signum: int, _frame: object) -> None:
        sshd.terminate()
        os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    # Reap every orphan reparented to us; leave when sshd itself is gone.
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        if pid == sshd.pid:
            log.write(f"sshd exited with status {status}\n".encode())
            return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
