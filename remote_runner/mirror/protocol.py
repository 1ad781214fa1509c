"""Wire format shared by the local service and the remote agent.

Both ends import this module (the agent gets a copy inside its zipapp), so it is
stdlib-only and Python 3.8 compatible. Received data is never unpickled or
evaluated: a frame is a fixed binary prefix, a small JSON header and raw bytes.

    frame   = !I header_len, !I payload_len, header (UTF-8 JSON object), payload

Every header has ``t`` (the frame type). Requests carry ``id``; the reply
echoes it, so many requests can be in flight at once on one channel. File
names travel as JSON strings made with :func:`name_to_wire` (UTF-8 with
surrogateescape), which round-trips arbitrary bytes, so non-UTF-8 names work
end to end. A payload may be compressed (header ``z``: ``1`` for lz4, or the
codec's name) only with a codec both ends have, and only when packing it pays on
the link (:mod:`.packing`).

A reply may carry ``push``: extra entries (path, attributes) the local side
expects the remote to need next (prefetch); the agent primes its attribute
cache with them. A read-only ``open`` may set ``whole`` (with ``have``, the
size/mtime/inode of the host's copy): the reply then says the copy is current
(no data) or carries the file's first chunk, so a program start costs one
round trip per file instead of one per read. When that file is a dynamically
linked program, the reply also carries ``libs`` (shaped like a ``validate``
reply: names, answers, whole files; ``dirs``: directories answered whole): the
libraries the loader will open next and what the C library and an interpreter
read at start, which the agent keeps and fetches at once. A read-only ``open`` of a file
changed in the last seconds says ``fresh``: the host reads that handle without its kernel's
page cache (see :mod:`.host.fusebinding`). Large replies may also come over
extra channels ("lanes", :mod:`.host.lanes`), past one channel's window. A session starts with one
``boot`` frame holding everything the command needs (argv, cwd, env, umask,
tty mode, window size, the file-cache origin).
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

from .packing import SAMPLE, PackPolicy, compress

#: Bumped on any incompatible change; both ends refuse a different major.
PROTOCOL_VERSION = "2.0"

#: A ``rename`` request's ``flags``: renameat2(2)'s own (linux/fs.h). With EXCHANGE both names stay.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

#: Handles the host numbers itself, for a ``create`` or ``open`` it does not wait for (below
#: them: the local side's own numbers; from the end up: the host's copies of files).
POSTED_HANDLES = (1 << 40, 1 << 48)


def posted_handle(fh: Any) -> bool:
    """Whether *fh* is a handle number the host chose (see :data:`POSTED_HANDLES`)."""
    return isinstance(fh, int) and not isinstance(fh, bool) and POSTED_HANDLES[0] <= fh < POSTED_HANDLES[1]

PREFIX = struct.Struct("!II")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 64 << 20
#: A read-only ``open`` with ``whole`` set gets files up to this size whole
#: (the host keeps a copy); the reply carries the first ``WHOLE_CHUNK`` bytes.
WHOLE_LIMIT = 32 << 20
WHOLE_CHUNK = 1 << 20
#: utimensat's "now" and "leave as is", as libfuse hands them on (nanoseconds, no seconds).
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
#: The most names a command's lookup profile keeps (``git status`` in a big tree looks up thousands).
PROFILE_NAMES = 20000

# Frame types -------------------------------------------------------------
HELLO = "hello"      # agent -> local: version, machine, features
BOOT = "boot"        # local -> agent: the whole session in one message
READY = "ready"      # agent -> local: mount up, command started (pid)
REQ = "req"          # agent -> local: a file-system operation
REP = "rep"          # local -> agent: its result (``e`` = errno on failure)
STDIN = "in"         # local -> agent: bytes for the command's stdin ("" = EOF)
STDOUT = "out"       # agent -> local
STDERR = "err"       # agent -> local
SIGNAL = "sig"       # local -> agent: deliver signal ``n`` to the command
WINCH = "winch"      # local -> agent: new window size ``rows``/``cols``
EXIT = "exit"        # agent -> local: ``status`` (shell style, 128+N for signals)
FAIL = "fail"        # agent -> local: the agent could not run the command
PING = "ping"        # either way; answered by PONG
PONG = "pong"
JOB = "job"          # local -> agent (daemon mode): register a window command
BYE = "bye"          # local -> agent: end the session, clean up
LANE = "lane"        # lanes (see host/lanes.py): first on a lane, ``token``; on the main channel,
                     # agent -> local ``lane`` (accepted) or ``gone``, local -> agent ``retired``
INVAL = "inval"      # local -> agent: names that changed here (``p``), dropped with all below (``tree``), or ``all``

#: A directory answer lists at most this many entries (bigger ones: name by name).
LISTING_ENTRIES = 4096
#: ... and at most this many bytes of JSON.
LISTING_BYTES = 768 << 10

STAT_FIELDS = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
               "st_atime", "st_mtime", "st_ctime", "st_blocks", "st_blksize", "st_rdev")

STATVFS_FIELDS = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_flag", "f_namemax")


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


class LinkClosed(ProtocolError):
    """The stream ended (the other side or the transport went away)."""


def profile_key(argv_wire: Any, files_only: bool) -> str:
    """Name a command for the lookup profiles both ends keep: its first two words and the mode."""
    import hashlib
    key = json.dumps([bool(files_only), list(argv_wire[:2])])
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()


def made_in_session(name: str, made: Any) -> bool:
    """Whether wire *name* is one of the directories in *made* or lies below one.

    Both ends leave such names out of their profiles: what a command creates
    in a run (a test's ``tmp_path``) is its own output, gone or different by
    the next run.
    """
    if not made:
        return False
    while True:
        if name in made:
            return True
        cut = name.rfind("/")
        if cut <= 0:
            return "/" in made
        name = name[:cut]


def name_to_wire(name: bytes) -> str:
    """Encode a file name (bytes) as a JSON-safe string, losslessly."""
    return name.decode("utf-8", "surrogateescape")


def name_from_wire(text: str) -> bytes:
    """Decode a file name made by :func:`name_to_wire`."""
    if not isinstance(text, str):
        raise ProtocolError("file name must be a string")
    return text.encode("utf-8", "surrogateescape")


def stat_to_wire(st: os.stat_result) -> Dict[str, int]:
    """Turn a stat result into wire attributes (times in integer nanoseconds)."""
    return {
        "st_mode": st.st_mode, "st_ino": st.st_ino, "st_dev": st.st_dev,
        "st_nlink": st.st_nlink, "st_uid": st.st_uid, "st_gid": st.st_gid,
        "st_size": st.st_size, "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns, "st_blocks": st.st_blocks, "st_blksize": st.st_blksize,
        "st_rdev": st.st_rdev,
    }


def stat_row(st: os.stat_result) -> List[int]:
    """Attributes as a compact row in ``STAT_FIELDS`` order (directory answers carry thousands)."""
    return [st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_blocks, st.st_blksize, st.st_rdev]


_INTS = {int}
#: Reply fields that carry a file's attributes: sent as rows (:func:`compact_reply`).
ATTR_FIELDS = ("st", "dst")


def compact_reply(header: Dict[str, Any]) -> Dict[str, Any]:
    """*header* with its attributes (:data:`ATTR_FIELDS`) as rows, in place.

    A change's reply carries the new name's attributes and its directory's:
    as objects they were most of its bytes, and decoding their thirteen keys
    each was the agent's largest cost per reply.
    """
    for key in ATTR_FIELDS:
        value = header.get(key)
        if type(value) is dict:
            header[key] = [value[field] for field in STAT_FIELDS]
    return header


def expand_reply(header: Dict[str, Any]) -> Dict[str, Any]:
    """Undo :func:`compact_reply` in place; a field that is not a row of integers is dropped."""
    for key in ATTR_FIELDS:
        value = header.get(key)
        if value is not None:
            attrs = row_attrs(value)
            if attrs is None:
                del header[key]
            else:
                header[key] = attrs
    return header


def row_attrs(row: Any) -> Optional[Dict[str, int]]:
    """Undo :func:`stat_row`; None for anything that is not a row of integers."""
    # (one pass in C: every reply to a change carries two rows)
    if type(row) is not list or len(row) != len(STAT_FIELDS) or set(map(type, row)) != _INTS:
        return None
    return dict(zip(STAT_FIELDS, row))


def encode(header: Dict[str, Any], payload: bytes = b"") -> bytes:
    """Build one frame."""
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return PREFIX.pack(len(raw), len(payload)) + raw + payload


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    chunks = []
    left = size
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise LinkClosed("stream closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def parse_header(raw: bytes) -> Dict[str, Any]:
    """Decode and check a JSON header."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("bad frame header: %s" % exc)
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise ProtocolError("frame header must be an object with a string 't'")
    return header


def read_frame(stream: BinaryIO) -> Tuple[Dict[str, Any], bytes]:
    """Read one frame from a blocking binary stream; raise LinkClosed at EOF."""
    prefix = _read_exact(stream, PREFIX.size)
    hlen, plen = PREFIX.unpack(prefix)
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise ProtocolError("frame too large (%d + %d bytes)" % (hlen, plen))
    header = parse_header(_read_exact(stream, hlen))
    payload = _read_exact(stream, plen) if plen else b""
    if header.get("z"):
        payload = decompress(payload, header["z"])
    return header, payload


class ReadAhead:
    """Exact reads handed out from one larger read of what already arrived.

    One read takes every frame that came together (each end answers in
    bursts); handing them out from memory spares a read per frame part (two
    or three per frame): a system call each on the agent, a channel's locks
    and a wake-up of its reader each here. Subclasses say how to read.
    """

    #: Bytes asked for at a time (at least; a larger read asks for its size, up to a MiB).
    CHUNK = 65536

    def __init__(self) -> None:
        #: Bytes read so far (what came over the wire).
        self.received = 0
        self._buf = b""
        self._pos = 0

    def read_some(self, size: int) -> bytes:
        """Up to *size* bytes of what is there (blocking until some are), b"" at the end."""
        raise NotImplementedError

    def read(self, size: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos < len(buf):
            self._pos = pos + size
            return buf[pos:pos + size]
        data = self.read_some(min(max(size, self.CHUNK), 1 << 20))
        self.received += len(data)
        if len(data) > size:
            self._buf, self._pos = data, size
            return data[:size]
        return data

    def buffered(self) -> int:
        """Bytes read and not handed out yet."""
        return len(self._buf) - self._pos


class FdReader(ReadAhead):
    """:class:`ReadAhead` over a raw file descriptor (the agent's stdin), retrying on EINTR."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def read_some(self, size: int) -> bytes:
        while True:
            try:
                return os.read(self.fd, size)
            except InterruptedError:
                continue


class FrameWriter:
    """Serialise frames from many threads onto one byte sink."""

    #: Deferred bytes held at most; a frame past it goes out at once, with those before it.
    HOLD_LIMIT = 256 * 1024

    def __init__(self, write_all) -> None:
        self._write_all = write_all
        self._lock = threading.Lock()
        #: Deferred frames not written yet (see send), their size and since when.
        self._held: List[bytes] = []
        self._held_size = 0
        self._held_since = 0.0
        #: The codec compressible payloads are packed with (a name from :data:`CODECS`), or None.
        self.compress: Optional[str] = None
        self.policy = PackPolicy()
        #: Counters: frames and bytes written, payload bytes before packing, frames packed.
        self.frames = 0
        self.sent = 0
        self.payload_bytes = 0
        self.packed_frames = 0

    def send(self, header: Dict[str, Any], payload: bytes = b"", compressible: bool = False,
             defer: bool = False, wait: Optional[float] = None) -> bool:
        """Send one frame atomically with respect to other senders; False if it was not sent.

        *defer*: the frame may wait in a buffer (:meth:`flush`, or the next frame
        not deferred, takes it out with everything before it, in one write).
        *wait*: how long another sender may keep this one waiting (None: as long as it
        takes); a heartbeat must not queue behind a write stuck on a host that stopped
        reading.
        """
        size = len(payload)
        codec = self.compress
        if compressible and codec and size >= 4096:
            packed = self._pack(payload, codec)
            if packed is not None:
                header = dict(header, z=1 if codec == "lz4" else codec)
                payload = packed
        data = encode(header, payload)
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            return False
        try:
            self.frames += 1
            self.sent += len(data)
            self.payload_bytes += size
            self.packed_frames += len(payload) < size
            if defer and self._held_size + len(data) <= self.HOLD_LIMIT:
                if not self._held:
                    self._held_since = time.monotonic()
                self._held.append(data)
                self._held_size += len(data)
                return True
            if self._held:  # (what was held goes first, in the same write)
                self._held.append(data)
                data = b"".join(self._held)
                self._held.clear()
                self._held_size = 0
            started = time.perf_counter()
            self._write_all(data)
            ended = time.perf_counter()
            self.policy.wrote(len(data), ended - started, ended)
            return True
        finally:
            self._lock.release()

    def held(self) -> float:
        """Since when (monotonic) the oldest deferred frame waits; 0.0: none does."""
        return self._held_since if self._held else 0.0

    def flush(self) -> None:
        """Write every deferred frame now."""
        if not self._held:
            return
        with self._lock:
            if not self._held:
                return
            data = b"".join(self._held)
            self._held.clear()
            self._held_size = 0
            self._write_all(data)

    def counters(self) -> Dict[str, Any]:
        """What this writer counted: bytes sent and before packing, frames packed, measured rates."""
        link = self.policy.link_rate()
        pack = self.policy.pack_rate(self.compress) if self.compress else None
        return {"bytes_sent": self.sent, "payload_sent": self.payload_bytes,
                "packed_frames": self.packed_frames, "codec": self.compress,
                "link_mb_per_s": round(link / 1e6, 1) if link else None,
                "pack_mb_per_s": round(pack / 1e6, 1) if pack else None}

    def _pack(self, payload: bytes, codec: str) -> Optional[bytes]:
        """*payload* packed with *codec* when that pays (:class:`PackPolicy`), else None."""
        if len(payload) > SAMPLE:
            started = time.thread_time()   # CPU time: waiting for the GIL is not packing
            sample = compress(payload[:SAMPLE], codec)
            if sample is None:
                return None
            self.policy.packed(codec, SAMPLE, time.thread_time() - started)
            if not self.policy.pays(codec, len(sample) / SAMPLE):
                return None
        packed = compress(payload, codec)
        return packed if packed is not None and len(packed) < len(payload) else None


def fd_write_all(fd: int):
    """Return a function writing all bytes to *fd*."""
    def write_all(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except InterruptedError:
                continue
            view = view[n:]
    return write_all


#: What a lane runs on the host (``python3 -I -S -c LANE_RELAY SOCKET``): its stdin to
#: the agent's lane socket, byte for byte, nothing parsed; it ends with either side.
LANE_RELAY = (
    "import os,socket,sys\n"
    "s=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM)\n"
    "try:\n"
    " s.connect(sys.argv[1])\n"
    " while True:\n"
    "  d=os.read(0,262144)\n"
    "  if not d:break\n"
    "  s.sendall(d)\n"
    "except OSError as e:\n"
    " sys.stderr.write('lane: %s\\n'%e);sys.exit(1)\n"
)

def decompress(data: bytes, codec: Any = 1) -> bytes:
    """Undo :func:`compress` (*codec*: a frame's ``z``); never more than ``MAX_PAYLOAD`` bytes."""
    if codec == "zlib":
        import zlib
        unpack = zlib.decompressobj()
        try:
            out = unpack.decompress(data, MAX_PAYLOAD)
        except zlib.error as exc:
            raise ProtocolError("bad zlib payload: %s" % exc)
        if unpack.unconsumed_tail or not unpack.eof:
            raise ProtocolError("zlib payload is truncated or larger than %d bytes" % MAX_PAYLOAD)
        return out
    if codec not in (1, True, "lz4"):
        raise ProtocolError("unknown compression %r" % (codec,))
    try:
        import lz4.frame
    except Exception:
        raise ProtocolError("peer sent lz4 data but lz4 is not available")
    return lz4.frame.decompress(data)


def check_version(theirs: str) -> Optional[str]:
    """Return why *theirs* is incompatible with ours, or None."""
    if not isinstance(theirs, str) or theirs.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
        return "protocol version %r is not compatible with %r" % (theirs, PROTOCOL_VERSION)
    return None


def exit_status_from_wait(status: int) -> int:
    """Convert an os.wait status to a shell-style exit code (128+N for signal N)."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255
