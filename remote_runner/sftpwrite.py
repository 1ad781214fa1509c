"""Pipelined SFTP writes of one byte range, each write one SSH packet, each status read.

paramiko's own pipelined writer (``putfo``) sends 32 KiB writes, which with
the SFTP header no longer fit OpenSSH's 32 KiB channel packets: every write
became two packets, one full and one of ~30 bytes, each encrypted, MACed and
framed on both ends. It also stops every ~100 writes to read back *all*
outstanding replies (a full round trip with nothing in flight) and throws
away the status of the writes it has not read when the file is closed.

Here a write carries just what fits one packet, at most :data:`IN_FLIGHT`
writes are outstanding (about the channel's 2 MiB window) and the oldest
reply is read as soon as the window is full, so the link never drains and
every write's status is checked (a full disk fails the write that hit it).
Callers still check the file's size afterwards, as the original guarantee.

Ranges let several channels of one connection write one large file at once
(each opens the same temporary file and writes its own part), which keeps a
long link busy where one channel's window would not.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from paramiko.sftp import CMD_WRITE, int64

from remote_runner.errors import CopyError

#: Writes outstanding per channel: 64 × ~32 KiB, OpenSSH's default channel window.
IN_FLIGHT = 64
#: SFTP write request overhead besides the handle: length, type, id, handle
#: length, offset, data length.
_WRITE_HEADER = 4 + 1 + 4 + 4 + 8 + 4
#: paramiko keeps this much of a channel packet for its own framing.
_CHANNEL_SLACK = 64
#: A large file is cut into ranges of at least this size for parallel channels.
RANGE_MIN = 16 << 20


class WriteFailed(IOError):
    """The host refused a write (SFTP status); *acked* bytes were confirmed before it."""

    def __init__(self, acked: int, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.acked = acked


@dataclass(frozen=True)
class Range:
    """Part *index* of *count* of a file: *length* bytes from *offset*."""

    index: int
    count: int
    offset: int
    length: int


def ranges(size: int, lanes: int, minimum: Optional[int] = None) -> List[Range]:
    """Cut *size* bytes into at most *lanes* ranges of at least *minimum* bytes (one if small)."""
    minimum = RANGE_MIN if minimum is None else minimum
    count = max(1, min(lanes, size // max(1, minimum)))
    step = -(-size // count) if size else 0
    parts = []
    for index in range(count):
        offset = index * step
        parts.append(Range(index, count, offset, max(0, min(step, size - offset))))
    return parts


def chunk_size(sftp: Any, handle: bytes) -> int:
    """The most data bytes one write can carry in a single channel packet."""
    packet = getattr(sftp.sock, "out_max_packet_size", 32768) or 32768
    return max(4096, min(packet, 256 << 10) - _CHANNEL_SLACK - _WRITE_HEADER - len(handle))


def write_range(sftp: Any, handle: bytes, src: str, part: Range,
                tick: Callable[[int], None]) -> None:
    """Write *part* of local file *src* through the open SFTP *handle*, pipelined.

    *tick* gets the bytes sent after every write (it may raise to stop).
    Raises :class:`WriteFailed` when the host answers a write with an error.
    """
    chunk = chunk_size(sftp, handle)
    pending: deque = deque()
    acked = 0

    def settle_one() -> None:
        nonlocal acked
        num, length = pending.popleft()
        try:
            sftp._read_response(num)
        except (IOError, EOFError) as exc:
            raise WriteFailed(acked, exc) from exc
        acked += length

    with open(src, "rb") as local:
        local.seek(part.offset)
        position, end = part.offset, part.offset + part.length
        while position < end:
            data = local.read(min(chunk, end - position))
            if not data:
                raise CopyError("local file changed while copying", path=src)
            num = sftp._async_request(type(None), CMD_WRITE, handle, int64(position), data)
            pending.append((num, len(data)))
            position += len(data)
            tick(len(data))
            if len(pending) >= IN_FLIGHT:
                settle_one()
    while pending:
        settle_one()
