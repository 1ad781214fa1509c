"""Send a large file compressed when that pays, decompressed by the host into a temporary file.

A cold copy is bound by this machine's CPU in paramiko (every byte is
encrypted, MACed and framed in Python-driven code), so bytes not sent are the
cheapest ones: lz4 squeezes text, logs and sparse data several-fold at a
fraction of the cost of encrypting them — when it does squeeze them. Whether a
file pays is decided from a sample (three 64 KiB slices, start, middle and
end), compressed once while its CPU time is measured: compressing pays when
the CPU it costs is less than the CPU the bytes it saves would cost to send
(:data:`SEND_RATE`, measured: paramiko with AES-GCM carries ~230 MB per
CPU-second here). Random or already compressed data never pays and costs
only the sample. On this machine lz4 (~300 MB/s on text) pays for text and
logs; zlib level 1 (~125 MB/s) only for very redundant data (sparse files,
zero-filled images), since on a fast link it costs more than it saves.

The host decodes with what it has, found once per host and run
(``command -v``): the ``lz4`` command, else ``gzip`` (the stream is then
zlib's gzip format, level 1), else nothing is compressed. The host is not
trusted to have decoded what was sent: the script checks the size it wrote
before renaming the temporary file into place, exactly as the SFTP path
does, and removes the temporary file on any failure, including a stream cut
by Ctrl-C or a lost link (the decoder sees a truncated stream and fails).
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
import zlib
from typing import Any, Callable, Dict, Optional, Tuple

from remote_runner.errors import CopyError, describe
from remote_runner.channelio import IDLE_TIMEOUT, open_session, send_all_or_raise, start_command
from remote_runner.stream import collect

LOG = logging.getLogger(__name__)

#: Compress only when the sample shrinks to this fraction or less, whatever the CPU.
WORTH = 0.8
#: Bytes paramiko sends per CPU-second (AES-GCM, measured; see ciphers.py), kept
#: on the low side: a slower sender only makes compression pay sooner.
SEND_RATE = 200e6
#: Smaller files are not worth an extra command (their bytes cost little).
MIN_SIZE = 256 << 10
SAMPLE = 64 << 10
#: Bytes read, compressed and sent at a time.
BLOCK = 1 << 20
LZ4, GZIP = "lz4", "gzip"
#: The host's command for each codec (stdin to stdout).
DECODERS = {LZ4: "lz4 -dc", GZIP: "gzip -dc"}
SHORT_MARK = "RR-SHORT-WRITE"
#: Seconds the host gets to finish decoding and renaming once everything was sent.
FINISH_TIMEOUT = 600.0

_host_codecs: Dict[str, Tuple[str, ...]] = {}
_samples: Dict[Tuple[str, int, str], bool] = {}
_lock = threading.Lock()


class Encoder:
    """A streaming compressor for one codec (lz4 frame or gzip)."""

    def __init__(self, codec: str) -> None:
        self.codec = codec
        if codec == LZ4:
            import lz4.frame
            self._lz4: Any = lz4.frame.LZ4FrameCompressor()
            self._zlib: Any = None
        else:
            self._lz4 = None
            self._zlib = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip format

    def begin(self) -> bytes:
        return self._lz4.begin() if self._lz4 is not None else b""

    def compress(self, data: bytes) -> bytes:
        return (self._lz4 or self._zlib).compress(data)

    def end(self) -> bytes:
        return self._lz4.flush() if self._lz4 is not None else self._zlib.flush()


def pays(path: str, size: int, codec: str = LZ4) -> bool:
    """Tell whether *path* shrinks enough with *codec* to be sent compressed (sample)."""
    if size < MIN_SIZE:
        return False
    key = (path, size, codec)
    with _lock:
        known = _samples.get(key)
    if known is not None:
        return known
    try:
        with open(path, "rb") as handle:
            data = b""
            for offset in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
                handle.seek(offset)
                data += handle.read(SAMPLE)
    except OSError:
        return False  # the plain path reports the problem
    worth = bool(data) and _pays(data, codec)
    with _lock:
        _samples[key] = worth
    return worth


def _pays(data: bytes, codec: str) -> bool:
    """Whether compressing *data* costs less CPU than sending the bytes it saves."""
    best = float("inf")
    packed = len(data)
    for _ in range(2):  # the faster of two: the first may pay for cold caches
        started = time.thread_time()
        encoder = Encoder(codec)
        packed = len(encoder.begin() + encoder.compress(data) + encoder.end())
        best = min(best, time.thread_time() - started)
    saved = len(data) - packed
    return packed <= WORTH * len(data) and best < saved / SEND_RATE


def host_codec(transport: Any, host: str, timeout: float = 60,
               traffic: Any = None) -> Optional[str]:
    """The codec *host* can decode (lz4, else gzip, else None), asked once per host and run."""
    with _lock:
        known = _host_codecs.get(host)
    if known is None:
        script = "".join(f"command -v {name} >/dev/null 2>&1 && echo {name}\n"
                         for name in (LZ4, GZIP)) + "exit 0\n"
        try:
            status, out, _err = _exec(transport, "sh -c " + shlex.quote(script), None, timeout,
                                      traffic)
        except Exception as exc:  # noqa: BLE001 - no compression is a fine answer
            LOG.debug("%s: could not ask for decoders: %s", host, describe(exc))
            return None
        known = tuple(line for line in out.split() if line in DECODERS) if status == 0 else ()
        with _lock:
            _host_codecs[host] = known
        LOG.debug("%s: decoders on the host: %s", host, ", ".join(known) or "none")
    return known[0] if known else None


def forget_hosts() -> None:
    """Forget what hosts can decode (a new run asks again)."""
    with _lock:
        _host_codecs.clear()


def remove(transport: Any, path: str, timeout: float = 5, traffic: Any = None) -> None:
    """Remove *path* on the host, best effort (a temporary file of an interrupted copy)."""
    try:
        _exec(transport, "rm -f -- " + shlex.quote(path), None, timeout, traffic)
    except Exception as exc:  # noqa: BLE001 - cleanup only; a later run sweeps it
        LOG.debug("could not remove %s: %s", path, describe(exc))


def _count(traffic: Any) -> None:
    """Count one exec channel in the connection's :class:`~remote_runner.traffic.Traffic`."""
    if traffic is not None:
        traffic.count("execs")


def _exec(transport: Any, command: str, data: Optional[bytes], timeout: float,
          traffic: Any = None) -> Tuple[int, str, str]:
    """Run *command* on a new channel of *transport*; return (status, stdout, stderr)."""
    _count(traffic)
    channel = open_session(transport, timeout)
    channel.settimeout(IDLE_TIMEOUT)
    try:
        start_command(channel, command)
        if data:
            send_all_or_raise(channel, data)
        channel.shutdown_write()
        out, err, status = collect(channel, time.monotonic() + timeout)
        return status, out, err
    finally:
        channel.close()


def receive_script(codec: str, tmp: str, dest: str, size: int, mode: int) -> str:
    """Shell text decoding stdin into *tmp*, checking its size, and renaming it to *dest*."""
    q = shlex.quote
    return (f"t={q(tmp)}\n"
            "fail() { rm -f \"$t\"; exit 1; }\n"
            f"{DECODERS[codec]} > \"$t\" || fail\n"
            "got=$(stat -c %s \"$t\" 2>/dev/null || wc -c < \"$t\") || fail\n"
            f"[ \"$got\" -eq {size} ] || {{ echo {SHORT_MARK} \"$got\" >&2; fail; }}\n"
            # never into a directory that took the file's place (mv would put it inside)
            f"[ -d {q(dest)} ] && {{ echo {q(dest)} is a directory >&2; fail; }}\n"
            f"chmod {mode:o} \"$t\" && mv -f \"$t\" {q(dest)} || fail\n")


class Failed(CopyError):
    """The host could not take a compressed file; ``short`` when bytes went missing (disk)."""

    def __init__(self, message: str, short: bool, written: int) -> None:
        super().__init__(message)
        self.short = short
        self.written = written


def send(transport: Any, codec: str, src: str, size: int, script: str,
         tick: Callable[[int], None], timeout: float = FINISH_TIMEOUT,
         traffic: Any = None) -> None:
    """Stream *src* compressed with *codec* into *script* on a new channel; raise Failed.

    *tick* is called with the plain bytes done after every block (it may
    raise to stop: the channel is closed and the host removes its temporary file).
    """
    _count(traffic)
    channel = open_session(transport, 60)
    channel.settimeout(IDLE_TIMEOUT)
    try:
        start_command(channel, "sh -c " + shlex.quote(script))
        encoder = Encoder(codec)
        sent = _stream(channel, encoder, src, size, tick)
        _out, err, status = collect(channel, time.monotonic() + timeout)
    finally:
        channel.close()
    if status == 0 and sent:
        return
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    written = next((int(line.split()[1]) for line in lines
                    if line.startswith(SHORT_MARK + " ") and line.split()[1].isdigit()), 0)
    short = (any(line.startswith(SHORT_MARK) for line in lines)
             or any("No space left" in line or "Disk quota" in line or "rite error" in line
                    for line in lines))
    if status == -1:
        raise Failed("the host did not finish decoding in time or the link was lost", False, 0)
    raise Failed(lines[-1] if lines else f"the host's decoder exited with status {status}",
                 short, written)


def _stream(channel: Any, encoder: Encoder, src: str, size: int,
            tick: Callable[[int], None]) -> bool:
    """Send *src* through *encoder*; return False when the host stopped reading (it failed)."""
    done = 0
    try:
        send_all_or_raise(channel, encoder.begin())
        with open(src, "rb") as handle:
            while True:
                block = handle.read(BLOCK)
                if not block:
                    break
                done += len(block)
                send_all_or_raise(channel, encoder.compress(block))
                tick(len(block))
        if done != size:
            raise CopyError("local file changed while copying", path=src)
        send_all_or_raise(channel, encoder.end())
        channel.shutdown_write()
    except OSError:
        return False  # the channel closed under us: the host's script says why
    return True
