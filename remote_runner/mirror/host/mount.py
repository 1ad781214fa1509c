"""One FUSE mount served through the link, in its own thread; which libfuse; is /dev/fuse usable.

Why apart: mounting is where the host differs most (libfuse 2 or 3, no
/dev/fuse in a container, not root), so the choices and their clear errors
are kept here, apart from the operations themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import threading
import time
from typing import Optional

from .caches import FileCache
from .kernel import KernelDrops
from .names import NameCache
from .link import Link
from .namespaces import MNT_DETACH, umount
from .operations import make_operations
from .profile import Profile


def choose_libfuse() -> str:
    """Pick libfuse 3 when present (else 2) and tell mfusepy explicitly; return the choice.

    By soname first: the dynamic loader finds it in its cache at once, where
    ``ctypes.util.find_library`` runs ``ldconfig -p`` (and mfusepy, given only
    a name, runs it again): ~55 ms of every session's start on a lab host.
    """
    if os.environ.get("FUSE_LIBRARY_PATH"):
        return os.environ["FUSE_LIBRARY_PATH"]
    for name, soname in (("fuse3", "libfuse3.so.3"), ("fuse", "libfuse.so.2")):
        try:
            ctypes.CDLL(soname)
        except OSError:
            if ctypes.util.find_library(name):  # (installed under another soname)
                os.environ["FUSE_LIBRARY_NAME"] = name
                return name
            continue
        os.environ["FUSE_LIBRARY_PATH"] = soname
        return name
    raise OSError(errno.ENOENT, "neither libfuse3 nor libfuse2 is installed on this host (Debian, Ubuntu: "
                  "apt-get install fuse3; Fedora, RHEL: dnf install fuse3-libs)")


def check_fuse_device() -> None:
    """Fail clearly when /dev/fuse is missing or not usable by this user."""
    if not os.path.exists("/dev/fuse"):
        raise OSError(errno.ENODEV, "/dev/fuse is missing on this host (no FUSE support in its kernel "
                      "or container)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        raise OSError(errno.EACCES, "/dev/fuse (mode %04o) is not readable and writable by uid %d; "
                      "connect as root or make /dev/fuse 0666" % (mode, os.geteuid()))


class Mount:
    """One FUSE mount served through the link, run in its own thread."""

    def __init__(self, link: Link, mountpoint: str, prefix: bytes, system: bool,
                 files: Optional[FileCache] = None, cache: Optional[NameCache] = None,
                 profile: Optional["Profile"] = None, drops: Optional[KernelDrops] = None) -> None:
        self.link = link
        self.mountpoint = mountpoint
        self.prefix = prefix
        self.system = system
        self.files = files
        self.cache = cache
        self.profile = profile
        self.drops = drops
        self.error: Optional[BaseException] = None
        self.thread: Optional[threading.Thread] = None
        self.ops = None

    def start(self, timeout: float = 30.0) -> None:
        """Mount and wait until the kernel has the file system."""
        ops, fuse_cls = make_operations(self.link, self.prefix, self.files, self.cache, self.profile,
                                        self.drops)
        self.ops = ops
        # The kernel keeps names and attributes for a second, then asks this
        # process again, which answers from its name cache (kept coherent by the
        # local side's invalidations) without a round trip; a negative answer is
        # never kept by the kernel (the name cache has the whole directory).
        # Each invalidation also drops the kernel's attributes and pages of the
        # path (fuse_invalidate_path), but libfuse's high-level API cannot drop a
        # name's dentry (fuse_lowlevel_notify_inval_entry needs the parent's node
        # id, which only the library knows). A name replaced here by another
        # type would make the kernel's next getattr on the old inode fail with
        # EIO; getattr answers ESTALE once instead, and the VFS looks the path
        # up again (NameCache.kernel_must_look_up). Longer timeouts were not
        # taken: a run mostly looks each name up once (a warm git status in
        # 5,000 files reaches this process 5,194 times, about once per file;
        # with no entry timeout at all, 10,470), so they would save little
        # beyond what the host's name cache already answers, and where a
        # directory is not watched (no watch left, network file system) its
        # answers hold for a 1 s lease, which the kernel's timeouts must not
        # outlast, whereas the other operations that trust a dentry
        # (open(O_DIRECTORY), a walk through a name that became a directory)
        # would act on the old type for the whole timeout.
        timeouts = 1.0
        options = dict(foreground=True, fsname="remote-runner", subtype="mirror",
                       default_permissions=True, use_ino=True,
                       attr_timeout=timeouts, entry_timeout=timeouts, negative_timeout=0.0)
        if os.geteuid() == 0:
            # Commands that switch users (su, sudo -u) still reach their files; the
            # kernel checks permissions (default_permissions) and the mount is
            # only visible in our private mount namespace.
            options["allow_other"] = True

        def run() -> None:
            try:
                fuse_cls(ops, self.mountpoint, **options)
            except BaseException as exc:  # reported to the waiter below
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True, name="fuse")
        self.thread.start()
        end = time.monotonic() + timeout
        while not ops.mounted.wait(0.05):
            if not self.thread.is_alive():
                raise OSError(errno.EIO, "FUSE mount at %s failed: %s" % (self.mountpoint, self.error))
            if self.link.lost.is_set():
                raise OSError(errno.EIO, "link lost while mounting")
            if time.monotonic() > end:
                raise OSError(errno.ETIMEDOUT, "FUSE mount at %s did not come up" % self.mountpoint)

    def stop(self) -> None:
        """Unmount lazily; the FUSE loop ends once the kernel lets go."""
        try:
            umount(os.fsencode(self.mountpoint), MNT_DETACH)
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join(2.0)
