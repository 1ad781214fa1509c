"""The mfusepy FUSE class of a mount: what mfusepy's own binding does not do, or does slowly.

Why apart: these are fixes to the binding (libfuse 3's renameat2 flags and
ftruncate handle passed on, the GIL kept where mfusepy lets it go for
nothing, one Python thread state per libfuse worker, the kernel's page cache
kept across opens of one version of a file, its directory listings kept
(:mod:`.listcache`)), not file system rules; the file
system itself is :mod:`.operations` and :mod:`.state`.
"""

from __future__ import annotations

import ctypes
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .caches import LOCAL_FH_BASE, copy_key
from .listcache import keep_listing

if TYPE_CHECKING:  # pragma: no cover
    from .state import MountState


def fuse_class(mfusepy: Any, state: "MountState") -> Any:
    """Return the ``mfusepy.FUSE`` subclass that mounts *state*'s operations."""
    page_versions: Dict[bytes, List[Any]] = {}  # name -> copy key of the copy its kernel pages hold

    class MirrorFUSE(mfusepy.FUSE):
        """mfusepy drops renameat2 flags and ftruncate's handle; pass them on.

        Each callback's thread keeps its Python thread state (:func:`pin_thread_state`).

        And a read-only handle asks the kernel for no ``flush`` at its close
        (``noflush``, libfuse >= 3.11, kernel >= 5.16; ignored before): it has
        nothing to write back and no error to report, and each flush is a
        request through this process (214 of them for one ``ffmpeg -version``).

        An open through the host's copy of a file keeps the kernel's pages of
        the name (``keep_cache``) when the name's last open was through a copy
        of the same version (size, mtime, inode, ctime): every process of a
        build or a test run maps the same libraries, and without it each open
        dropped their pages and read them again through this process (a
        second ``ffmpeg -version`` in one session: 972 reads again). Any other
        open of the name, or a copy of another version, lets the kernel drop
        them as before; a change here drops them anyway (invalidation).

        A handle of a file this machine calls ``fresh`` (written while the
        command runs, see :mod:`.fresh`) is read with ``direct_io``: each read
        asks this process, and the kernel neither cuts it at nor pads it with
        zeros up to the size it holds for the name, which may be a newer
        version's.

        A read through the host's copy (``read_buf``) hands libfuse the copy's
        descriptor and offset instead of the bytes: libfuse reads them itself,
        outside Python, and no 128 KiB ``bytes`` is made and copied per
        request. Each new mount starts with no pages, so a run's libraries come
        this way (``ffmpeg -version``: ~970 reads). Measured on this machine at
        0 ms, interleaved, medians of 7: ``ffmpeg -version`` inside the mirror
        0.327 → 0.295 s (the whole ``exec`` 0.85 → 0.76 s), ``python3 -c
        'import json, email, http.client'`` 0.281 → 0.213 s. Other reads
        (through the link, or of what this host wrote) are copied into a
        buffer as before.
        """

        def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
            pin_once()
            state.link.operation_begins()
            try:
                return super()._wrapper(func, *args, **kwargs)
            finally:
                state.link.operation_ends()

        def fgetattr(self, path: Optional[bytes], buf: Any, fip: Any) -> int:
            # mfusepy zeroes the kernel's buffer with ctypes.memset, a foreign call that
            # lets go of the GIL mid-callback; with ten workers answering, taking it back
            # was a quarter of a warm getattr. A zeroed struct made here and copied in
            # (item assignment, a plain memcpy) keeps the GIL.
            fh = fip.contents.fh if fip else None
            attrs = self.operations.getattr(None if path is None else path.decode(self.encoding, self.errors), fh)
            st = mfusepy.c_stat()
            mfusepy.set_st_attrs(st, attrs, use_ns=self.use_ns)
            buf[0] = st
            return 0

        def opendir(self, path: bytes, fip: Any) -> int:
            # (registered only for libfuse >= 3.16, which passes these flags to the kernel)
            fip.contents.fh = 0
            keep_listing(fip.contents)
            return 0

        def _readdir(self, path: Optional[bytes], buf: Any, filler: Any, offset: int, fip: Any) -> int:
            # The same for libfuse's filler, called once per entry: it only copies the
            # entry into libfuse's buffer, so it is called without letting go of the GIL.
            return super()._readdir(path, buf, keeping_the_gil(filler), offset, fip)

        def create(self, path: bytes, mode: int, fip: Any) -> int:
            # mfusepy asks inspect.signature() of the operations' create on every call
            # to choose between two call forms; ours takes the flags. That lookup was
            # ~15% of a create's time in this process (a test suite makes hundreds).
            info = fip.contents
            info.fh = self.operations.create(path.decode(self.encoding, self.errors), mode, info.flags)
            return 0

        def open(self, path: bytes, fip: Any) -> int:
            result = super().open(path, fip)
            info = fip.contents
            copy = state.files.handles.get(info.fh) if state.files is not None and info.fh >= LOCAL_FH_BASE else None
            if hasattr(info, "noflush") and (copy is not None or info.fh in state.reading):
                info.noflush = 1
            if info.fh in state.fresh:  # a file written here while the command runs (fresh.py)
                info.direct_io = 1
                copy = None  # (its pages are not kept either)
            if copy is None:
                page_versions.pop(path, None)
                return result
            st = copy[1]
            version = copy_key(st)
            if page_versions.get(path) == version:
                info.keep_cache = 1
            page_versions[path] = version
            return result

        def read_buf(self, path: Optional[bytes], bufpp: Any, size: int, offset: int, fip: Any) -> int:
            fh = fip.contents.fh
            entry = state.files.handles.get(fh) if state.files is not None and fh >= LOCAL_FH_BASE else None
            if entry is not None:
                state.link.answer_here("read")
                vec = _new_bufvec(size, None)
                vec.contents.buf.flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK
                vec.contents.buf.fd = entry[0]
                vec.contents.buf.pos = offset
            else:
                data = self.operations.read(None if path is None else path.decode(self.encoding, self.errors),
                                            size, offset, fh)
                vec = _new_bufvec(len(data), data)
            bufpp[0] = ctypes.cast(vec, type(bufpp[0]))
            return 0

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return self.operations.rename(old.decode(self.encoding, self.errors),
                                          new.decode(self.encoding, self.errors), flags)

        def truncate_fuse_3(self, path: Optional[bytes], length: int, fip: Any) -> int:
            fh = fip.contents.fh if fip else None
            return self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors),
                                            length, fh)

    return MirrorFUSE


class _Buf(ctypes.Structure):
    """libfuse's ``struct fuse_buf`` (fuse_common.h); later libfuse versions only add fields after it."""

    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _BufVec(ctypes.Structure):
    """``struct fuse_bufvec`` with its one inline buffer (mfusepy declares a pointer there)."""

    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _Buf)]


FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2
_libc = ctypes.CDLL(None)
_libc.calloc.restype = ctypes.c_void_p
_libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
#: Room for fields later libfuse versions add to the structures (zeroed).
_SLACK = 64


def _new_bufvec(size: int, data: Optional[bytes]) -> Any:
    """A bufvec libfuse frees itself (``free``): one buffer of *size* bytes, *data* copied in."""
    raw = _libc.calloc(1, ctypes.sizeof(_BufVec) + _SLACK)
    if not raw:
        raise MemoryError
    vec = ctypes.cast(raw, ctypes.POINTER(_BufVec))
    vec.contents.count = 1
    vec.contents.buf.size = size
    if data:
        mem = _libc.malloc(len(data))
        if not mem:
            raise MemoryError
        ctypes.memmove(mem, data, len(data))
        vec.contents.buf.mem = mem
    return vec


_pinned = threading.local()


def pin_once() -> None:
    """:func:`pin_thread_state`, the first time the calling thread calls back into Python."""
    if not getattr(_pinned, "done", False):
        pin_thread_state()


def pin_thread_state() -> None:
    """Keep the calling libfuse worker thread's Python thread state until the thread ends.

    Every operation is a ctypes callback on a thread libfuse started. Such a
    thread has no Python thread state of its own, so each callback made one
    and threw it away at its end (``PyGILState_Ensure`` / ``Release`` with the
    count back at zero): that, not the operation, was most of a request's
    cost in a trivial file system. One more ``Ensure``, never released, keeps
    the count above zero and the state alive for every later callback on the
    thread. Measured on this machine: a trivial mfusepy file system under a C
    client, ``stat`` 96-120 → 55-68 µs and open + read + close 196-252 → 42-54
    µs; the agent on h3 (its own work per request is larger), ``find`` + ``cat``
    of the stdlib's .py files 1.38-2.20 → 1.20-1.40 s, a warm ``ffmpeg -version``
    360-388 → 305-345 ms. libfuse keeps its workers (at most 10 idle), so few
    states are ever left behind by threads that end.
    """
    ensure = ctypes.pythonapi.PyGILState_Ensure
    ensure.restype = ctypes.c_int
    ensure()
    _pinned.done = True


_GIL_KEEPING: Dict[Any, Any] = {}


def keeping_the_gil(function: Any) -> Any:
    """*function* (a ctypes C function pointer) as one whose calls keep the GIL.

    Only for a C function that neither blocks nor calls back into Python.
    """
    kind = type(function)
    prototype = _GIL_KEEPING.get(kind)
    if prototype is None:
        prototype = _GIL_KEEPING[kind] = ctypes.PYFUNCTYPE(function._restype_, *function._argtypes_)
    return ctypes.cast(function, prototype)
