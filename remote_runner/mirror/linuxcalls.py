"""The two Linux calls the os module lacks: renameat2(2) (with its flags) and fallocate(2) (with its mode).

Why apart: they go through ctypes and a per-architecture syscall number,
which is nothing the file service's logic should carry.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import platform

from remote_runner.mirror.replies import OpError

_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "armv7l": 382, "i686": 353, "ppc64le": 357,
                  "riscv64": 276, "s390x": 347}
AT_FDCWD = -100


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    number = _SYS_RENAMEAT2.get(platform.machine())
    if number is None:
        raise OpError(errno.EINVAL)
    res = libc.syscall(ctypes.c_long(number), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(old),
                       ctypes.c_int(AT_FDCWD), ctypes.c_char_p(new), ctypes.c_uint(flags))
    if res != 0:
        raise OpError(ctypes.get_errno())


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode (keep size, punch hole, zero range), which os.posix_fallocate lacks."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    res = libc.fallocate(ctypes.c_int(fd), ctypes.c_int(mode), ctypes.c_longlong(offset),
                         ctypes.c_longlong(length))
    if res != 0:
        raise OpError(ctypes.get_errno())
