"""The kernel keeps each directory's listing: a second ``readdir`` of it costs one ``opendir``.

Why: without it, every listing of a directory in the mirror is four
requests the program waits for, each a wake-up of this process: ``opendir``,
a ``getattr`` (glibc's ``opendir`` fstats the directory, whose atime the
previous listing made the kernel forget), then two ``readdir``. Programs
list the same directories over and over (``glob``, ``os.walk`` of a test's
tree, ``shutil.rmtree``): CPython's ``test_glob`` lists 30 nested
directories 6,000 times. The kernel can keep a listing itself (Linux 4.20,
``FOPEN_CACHE_DIR`` with ``FOPEN_KEEP_CACHE`` in the ``opendir`` reply),
and then a listing is one ``opendir``.

libfuse's high-level API passes those two flags from a file system's
``opendir`` to the kernel only since 3.16 (before, ``fuse_lib_opendir``
answers with its own copy of the file info). For 3.5 to 3.15 the
session's low-level ``opendir`` is wrapped instead: the wrapper sets the
two flags in the kernel's file info, then calls libfuse's own handler,
which answers with it. That needs the layout of ``struct fuse_session``,
which is private; the wrapper is installed only when the table found
there is recognisably libfuse's own (every handler libfuse sets points
into libfuse, and the two it never sets are empty), else listings simply
stay uncached.

What keeps a kept listing right: the kernel drops it when the directory
changes through this mount (its version moves), when its mtime differs at
the next ``opendir`` after its attributes expire, and when an
invalidation from the local side reaches the directory
(``fuse_invalidate_path`` drops its pages): the local watcher names a
directory whenever a name in it appears, goes or is renamed.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Callable, List, Optional, Tuple

#: libfuse versions whose high-level ``opendir`` passes cache_readdir and keep_cache on.
PASSES_FLAGS = (3, 16)
#: The first libfuse with ``cache_readdir`` in ``struct fuse_file_info``.
HAS_FLAG = (3, 5)
#: Slots of ``struct fuse_lowlevel_ops`` (fuse_lowlevel.h, libfuse 3): the
#: handler wrapped, handlers the high-level API always sets, and two it never sets.
OPENDIR = 20
SET_BY_LIBFUSE = list(range(0, 16)) + list(range(17, 24))
NEVER_SET = (16, 37)     # write (the high-level API uses write_buf), retrieve_reply
SLOTS = 44
#: Where ``op`` may start in ``struct fuse_session`` (fuse_i.h): after
#: mountpoint, exited, fd, mo, debug, deny_others (32 bytes), or 8 bytes
#: later where a release has one more pointer there (custom I/O).
OP_OFFSETS = (32, 40)

_OPENDIR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p)
_kept: List[Any] = []            # the wrappers (freed callbacks would crash libfuse)
_lock = threading.Lock()


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def version_of(mfusepy: Any) -> Tuple[int, int]:
    """The (major, minor) version of the libfuse *mfusepy* bound."""
    return (getattr(mfusepy, "fuse_version_major", 0), getattr(mfusepy, "fuse_version_minor", 0))


def passes_flags(mfusepy: Any) -> bool:
    """Whether the file system's own ``opendir`` sets the flags (libfuse >= 3.16)."""
    return version_of(mfusepy) >= PASSES_FLAGS


def keep_listing(info: Any) -> None:
    """Ask the kernel, in an ``opendir`` reply's file info, to keep the directory's listing."""
    info.cache_readdir = 1
    info.keep_cache = 1  # (else the kernel drops the kept listing at every opendir)


def wrap_session_opendir(mfusepy: Any, on_call: Callable[[], None] = lambda: None) -> str:
    """Make the kernel keep listings of the mount being initialised (call from ``init``); say how.

    Returns "opendir" (libfuse >= 3.16: the file system's ``opendir`` sets
    the flags), "wrapped" (the session's ``opendir`` was wrapped), or why
    listings stay uncached. Never raises: a mount works without it.
    *on_call* runs first in each wrapped call (the thread-state pin).
    """
    try:
        return _wrap(mfusepy, on_call)
    except Exception as exc:  # noqa: BLE001 - an optimisation; the mount must come up anyway
        return "failed: %s" % exc


def _wrap(mfusepy: Any, on_call: Callable[[], None]) -> str:
    version = version_of(mfusepy)
    if version >= PASSES_FLAGS:
        return "opendir"
    if version < HAS_FLAG or version[0] != 3:
        return "libfuse %d.%d has no cache_readdir" % version
    lib = mfusepy._libfuse
    context = lib.fuse_get_context()
    fuse = context.contents.fuse if context else None
    if not fuse:
        return "no fuse context"
    lib.fuse_get_session.restype = ctypes.c_void_p
    lib.fuse_get_session.argtypes = [ctypes.c_void_p]
    session = lib.fuse_get_session(fuse)
    if not session:
        return "no session"
    table = _find_table(lib, session)
    if table is None:
        return "unknown session layout"
    slots = (ctypes.c_void_p * SLOTS).from_address(table)
    original = _OPENDIR(slots[OPENDIR])
    info_type = ctypes.POINTER(mfusepy.fuse_file_info)

    def opendir(req: int, ino: int, fi: int) -> None:
        try:
            on_call()
            if fi:
                keep_listing(ctypes.cast(fi, info_type).contents)
        finally:
            original(req, ino, fi)  # (libfuse's handler answers the kernel: never skipped)

    wrapper = _OPENDIR(opendir)
    with _lock:
        _kept.append((wrapper, original))
        slots[OPENDIR] = ctypes.cast(wrapper, ctypes.c_void_p).value
    return "wrapped"


def _find_table(lib: Any, session: int) -> Optional[int]:
    """The address of the session's ``struct fuse_lowlevel_ops``, if one candidate is libfuse's table."""
    libdl = ctypes.CDLL(None)
    dladdr = libdl.dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    dladdr.restype = ctypes.c_int

    def base_of(address: Optional[int]) -> Optional[int]:
        if not address:
            return None
        info = _DlInfo()
        return info.dli_fbase if dladdr(address, ctypes.byref(info)) else None

    home = base_of(ctypes.cast(lib.fuse_reply_open, ctypes.c_void_p).value)
    if home is None:
        return None
    for offset in OP_OFFSETS:
        slots = (ctypes.c_void_p * SLOTS).from_address(session + offset)
        if all(base_of(slots[i]) == home for i in SET_BY_LIBFUSE) and \
                all(not slots[i] for i in NEVER_SET) and len(set(slots[i] for i in SET_BY_LIBFUSE)) == len(SET_BY_LIBFUSE):
            return session + offset
    return None
