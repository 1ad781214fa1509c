"""Put bytes on a host so that a reader sees the old file or the new one, never half of one.

Nothing is ever written in place. Large files go over SFTP to a temporary name
in the destination directory and are renamed into place (``posix_rename``)
only once the host reports the full size. The writes are pipelined
(:mod:`remote_runner.sftpwrite`: one SSH packet each, every status read, no
per-chunk round trip) and a large file is cut into ranges written by several
SFTP channels of the connection at once; the size check after the last range
stays, as the proof the original design asks for. A file whose sample
compresses well is sent compressed instead, decoded by the host into the
temporary file and checked the same way (:mod:`remote_runner.compression`).
Small files, where round trips cost more than bytes,
travel in tar bundles of many directories, each file into a stage directory
beside its destination, are checked by size and renamed into place
(:mod:`remote_runner.bundle`). An executable that is running can be
replaced (its old inode stays alive); a failed copy removes its temporary
file or stage directory, and says why (a full disk is named as such, with the
old file left in place).

Ctrl-C stops every upload at its next chunk (:func:`wait_or_cancel`): each
removes its temporary file, and whatever a busy link keeps from being removed
in time is named, and swept by a later run (see ``hostdigest._sweep_script``).
Within a host several SFTP channels (:data:`LANES`), compressed streams or
bundle commands run at once, within OpenSSH's default ``MaxSessions``.
"""

from __future__ import annotations

import logging
import posixpath
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from remote_runner import compression, sftpwrite, stream
from remote_runner.errors import EXIT_INTERRUPTED, CopyError, HostError, NoSFTP, RunnerError, describe
from remote_runner.events import for_host
from remote_runner.freespace import (  # noqa: F401 - re-exported: callers look here
    FREE_MARK, free_bytes, free_space, free_space_script,
)

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.shell import Shell

LOG = logging.getLogger(__name__)

#: SFTP channels used at once per host. Each file costs a few round trips
#: (open, close, chmod, rename) that paramiko cannot pipeline across files, so
#: small files go through several channels in parallel. Kept under OpenSSH's
#: default ``MaxSessions 10`` (a refused channel just means fewer lanes).
LANES = 8
#: Compressed files sent at once per host (exec channels, besides the SFTP lanes).
COMPRESSED_LANES = 2
#: Files streamed at once per host (exec channels; :mod:`remote_runner.stream`).
STREAM_LANES = 4
#: Smaller files go over the SFTP lanes: a stream costs a python3 start on the host.
STREAM_MIN = 1 << 20
#: Files up to this size travel in tar bundles (one exec per chunk of files, whatever
#: their directories) instead of one SFTP exchange each: round trips, not bytes, dominate them.
SMALL_FILE = 256 << 10
#: Minutes after which a temporary file of ours is known to be left by a killed copy.
STALE_MINUTES = 10
#: Minutes after which a file *staged* at a run's check (sent ahead, renamed into place only at
#: its start, however long its copy takes) is known to be left by a killed run. Its token starts
#: with :data:`STAGED_MARK` (upload temporaries' are hex), so sweeps tell the two apart.
STAGED_STALE_MINUTES = 24 * 60
STAGED_MARK = "s"


def staged_token() -> str:
    """A token for a file staged ahead of its run's start: ``s`` and 7 hex digits."""
    return STAGED_MARK + secrets.token_hex(4)[1:]
#: Seconds the uploads get, after Ctrl-C, to remove their temporary files.
CANCEL_GRACE = 1.0
#: Called with (host, bytes_done_delta) while uploading.
Progress = Callable[[str, int], None]
#: Opens one more SFTP client on the host's connection (for a parallel lane).
LaneOpener = Callable[[], Any]


@dataclass(frozen=True)
class Upload:
    """One regular file to place on a host.

    *seen*: the source's stat key (:func:`hashcache.stat_key`) when the plan
    looked at it, so that its remembered SHA-1 is found without another
    ``stat``: the check is planned while the connections are made, and there
    each ``stat`` gave the GIL away to their threads (1,003 files: ~50 ms,
    against ~4 ms when planning).
    """

    src: str
    dest: str
    mode: int
    size: int
    seen: Optional[Tuple[int, ...]] = field(default=None, compare=False, repr=False)


def _temporary(dest: str) -> str:
    directory, base = posixpath.split(dest)
    return posixpath.join(directory, f".{base}.rr-{secrets.token_hex(4)}.tmp")


def upload_file(sftp: Any, host: str, item: Upload, progress: Optional[Progress] = None) -> None:
    """Upload one file over *sftp* under a temporary name and rename it into place."""
    _FileJob(item, host, 1).run_piece(sftp, sftpwrite.Range(0, 1, 0, item.size),
                                      _ticker(host, progress))


def _ticker(host: str, progress: Optional[Progress]) -> Callable[[int], None]:
    if progress is None:
        return lambda _delta: None
    return lambda delta: progress(host, delta)


class _FileJob:
    """One file written as one or more ranges, each possibly by another SFTP channel.

    The first range creates the temporary file; the others open it once it
    exists; whoever finishes last checks the size, sets the mode and renames
    it into place. Any failure marks the job failed (the other ranges stop at
    their next write) and removes the temporary file.
    """

    def __init__(self, item: Upload, host: str, parts: int) -> None:
        self.item, self.host = item, host
        self.tmp = _temporary(item.dest)
        self.left = parts
        self.created = threading.Event()
        self.failed = False
        self.lock = threading.Lock()

    def run_piece(self, sftp: Any, part: "sftpwrite.Range", tick: Callable[[int], None]) -> None:
        """Write *part* over *sftp*; finish the file when it is the last part done."""
        try:
            if part.index == 0:
                _in_flight(self.host, self.tmp, True)
                handle = sftp.open(self.tmp, "wb")
                self.created.set()
            else:
                while not self.created.wait(0.2):
                    tick(0)  # a cancelled copy stops here too
                if self.failed:
                    return
                handle = sftp.open(self.tmp, "r+b")
            try:
                def checked(delta: int) -> None:
                    if self.failed:
                        raise _Abandoned()
                    tick(delta)
                sftpwrite.write_range(sftp, handle.handle, self.item.src, part, checked)
            finally:
                handle.close()
            with self.lock:
                self.left -= 1
                last = self.left == 0 and not self.failed
            if last:
                self._finish(sftp)
        except _Abandoned:
            return
        except BaseException as exc:
            if not self._fail(sftp) and not isinstance(exc, KeyboardInterrupt):
                return  # a consequence (the file was removed under it): the first failure tells
            if isinstance(exc, sftpwrite.WriteFailed):
                raise ShortWrite(self.item, exc.acked) from exc
            if isinstance(exc, (RunnerError, KeyboardInterrupt)):
                raise
            raise CopyError(f"upload of {self.item.src} failed: {describe(exc)}", host=self.host,
                            path=self.item.dest) from exc

    def _finish(self, sftp: Any) -> None:
        # Every write's status was read, and the size the host reports for the
        # temporary file is checked as well before it replaces the old file.
        written = sftp.stat(self.tmp).st_size
        if written != self.item.size:
            raise ShortWrite(self.item, written)
        sftp.chmod(self.tmp, self.item.mode)
        sftp.posix_rename(self.tmp, self.item.dest)
        _in_flight(self.host, self.tmp, False)

    def _fail(self, sftp: Any) -> bool:
        """Mark the file failed and remove its temporary file; True for the first failure."""
        with self.lock:
            first = not self.failed
            self.failed = True
        self.created.set()
        if first:
            _remove_quietly(sftp, self.tmp)
            _in_flight(self.host, self.tmp, False)
        return first


class _Abandoned(Exception):
    """Another range of the same file failed: this one stops quietly."""


#: Temporary files being written now, per host: what an interrupted run may leave.
_writing: Dict[str, set] = {}
_writing_lock = threading.Lock()


def _in_flight(host: str, tmp: str, started: bool) -> None:
    with _writing_lock:
        names = _writing.setdefault(host, set())
        if started:
            names.add(tmp)
        else:
            names.discard(tmp)


def in_flight() -> Dict[str, List[str]]:
    """Return the temporary files still being written (or removed), per host."""
    with _writing_lock:
        return {host: sorted(names) for host, names in _writing.items() if names}


class Cancelled(CopyError):
    """The copy was interrupted (Ctrl-C); exits like any interrupt."""

    exit_code = EXIT_INTERRUPTED


def wait_or_cancel(pool: ThreadPoolExecutor, futures: Sequence[Any], cancel: threading.Event,
                   grace: float = CANCEL_GRACE) -> None:
    """Wait for *futures*; on Ctrl-C set *cancel*, give workers *grace* seconds, and go on.

    The workers notice *cancel* at their next chunk and clean up after
    themselves; the caller closes the connections, which ends anything still
    blocked on the network.
    """
    try:
        futures_wait(futures)
    except BaseException:
        cancel.set()
        futures_wait(futures, timeout=grace)
        pool.shutdown(wait=False, cancel_futures=True)
        for host, names in in_flight().items():
            LOG.warning("%s: the interrupted copy could not remove %s in time (the link is "
                        "busy); a run after %d minutes removes it", host, ", ".join(names),
                        STALE_MINUTES)
        raise
    pool.shutdown(wait=True)


class ShortWrite(CopyError):
    """The host kept fewer bytes than were sent; :func:`explain` finds out why."""

    def __init__(self, item: Upload, written: int, host: Optional[str] = None,
                 reason: str = "") -> None:
        self.item = item
        self.written = written
        why = reason or f"the host kept {written} of {item.size} bytes"
        super().__init__(f"upload of {item.src} failed: {why}", host=host, path=item.dest)


def explain(shell: "Shell", host: str, error: ShortWrite) -> CopyError:
    """Turn a short write into an error that says why (a full disk, most often)."""
    free = free_bytes(shell, posixpath.dirname(error.item.dest))
    if free is not None and free < error.item.size:
        reason = (f"No space left on device ({error.item.size} bytes to write, "
                  f"{free} bytes free on the host's filesystem); the old file is left in place")
        return ShortWrite(error.item, error.written, host, reason)
    return ShortWrite(error.item, error.written, host,
                      f"the host kept {error.written} of {error.item.size} bytes "
                      "(a quota or a failing disk?); the old file is left in place")


def _remove_quietly(sftp: Any, path: str) -> None:
    """Remove a temporary file, ignoring errors (it may never have been created)."""
    try:
        sftp.remove(path)
    except Exception:  # noqa: BLE001 - best effort cleanup of our own temp file
        LOG.debug("could not remove temporary file %s", path)


def upload_all(sftp: Any, host: str, items: Sequence[Upload], progress: Optional[Progress] = None,
               open_lane: Optional[LaneOpener] = None, lanes: int = LANES,
               link: Optional[Tuple[Any, Any]] = None) -> Dict[str, "stream.Receipt"]:
    """Upload *items*; return the receipts of the files a host-side receiver hashed.

    *link* (transport, traffic counters) says the host runs python3: every
    file of :data:`STREAM_MIN` or more then goes as a plain stream to a
    receiver that hashes as it writes (:mod:`remote_runner.stream`, up to
    :data:`STREAM_LANES` at once), except a lone large file, which is still
    cut into ranges written by several SFTP channels at once (one channel's
    window would cap it on a long link).
    Without *link* every file goes over *sftp* (a client, or a function
    opening one when first needed) plus up to ``lanes - 1`` extra SFTP
    channels. Either way a file whose sample compresses well goes compressed
    over an exec channel (:mod:`remote_runner.compression`) when the host has
    a decoder. Channels in use at once stay within *lanes* (OpenSSH's
    ``MaxSessions`` is 10).
    """
    if link is not None:
        transport, traffic = link
    else:
        sftp = sftp() if callable(sftp) else sftp
        transport = _transport_of(sftp)
        traffic = getattr(sftp, "traffic", None)  # the connection's counters (traffic.py)
    packed = [i for i in items if transport is not None and compression.pays(i.src, i.size)]
    codec = compression.host_codec(transport, host, traffic=traffic) if packed else None
    if codec is not None and codec != compression.LZ4:
        packed = [i for i in packed if compression.pays(i.src, i.size, codec)]
    if codec is None:
        packed = []
    squeezed = set(packed)
    packers = min(COMPRESSED_LANES, len(packed), max(1, lanes - 1))
    plain = [i for i in items if i not in squeezed]
    streamed = [i for i in plain if i.size >= STREAM_MIN] if link is not None else []
    if len(streamed) == 1 and streamed[0].size > 2 * sftpwrite.RANGE_MIN:
        streamed = []  # a lone large file: ranges over several channels beat one stream's window
    plain = [i for i in plain if i not in set(streamed)]
    if plain and callable(sftp):
        try:
            sftp = sftp()
        except NoSFTP as exc:
            # A hardened sshd without the SFTP subsystem: a host with python3 takes them all
            # as streams (its receiver needs no SFTP).
            if link is None:
                raise HostError(host, f"{exc.message}; this host has no SFTP subsystem and no python3, "
                                      "so files over the bundles' size cannot reach it",
                                "enable sshd's Subsystem sftp, or install python3 there") from exc
            LOG.info("%s: no SFTP subsystem (%s): streaming %d more file(s)", host, exc.message, len(plain))
            streamed, plain = streamed + plain, []
    streamers = min(STREAM_LANES, len(streamed), max(1, lanes - packers))
    receipts: Dict[str, stream.Receipt] = {}
    width = max(1, lanes - packers) if open_lane is not None else 1
    work: List[Tuple[Upload, "sftpwrite.Range", _FileJob]] = []
    for item in plain:
        parts = sftpwrite.ranges(item.size, width)
        job = _FileJob(item, host, len(parts))
        work.extend((item, part, job) for part in parts)
    clients = [sftp] if work else []
    extra: List[Any] = []
    while open_lane is not None and len(clients) < min(width, len(work)):
        try:
            extra.append(open_lane())
        except Exception as exc:  # noqa: BLE001 - a server limit (MaxSessions) is fine
            LOG.debug("%s: no extra SFTP channel (%s); using %d", host, exc, len(clients))
            break
        clients.append(extra[-1])
    pending = iter(work)
    squeeze = iter(packed)
    flow = iter(streamed)
    lock = threading.Lock()
    failed = threading.Event()
    first: List[BaseException] = []  # what stopped the copy; later errors are its consequences
    tick = _ticker(host, progress)

    def stop(exc: BaseException) -> None:
        with lock:
            first.append(exc)
        failed.set()

    def lane(client: Any) -> None:
        while not failed.is_set():
            with lock:
                unit = next(pending, None)
            if unit is None:
                return
            item, part, job = unit
            LOG.debug("%s: uploading %s -> %s (bytes %d-%d of %d)", host, item.src, item.dest,
                      part.offset, part.offset + part.length, item.size)
            try:
                job.run_piece(client, part, tick)
            except BaseException as exc:
                stop(exc)
                raise

    def packer() -> None:
        while not failed.is_set():
            with lock:
                item = next(squeeze, None)
            if item is None:
                return
            LOG.debug("%s: uploading %s -> %s (%d bytes, %s-compressed)", host, item.src,
                      item.dest, item.size, codec)
            try:
                upload_compressed(transport, host, item, str(codec), tick, traffic)
            except BaseException as exc:
                stop(exc)
                raise

    def streamer() -> None:
        while not failed.is_set():
            with lock:
                item = next(flow, None)
            if item is None:
                return
            LOG.debug("%s: streaming %s -> %s (%d bytes)", host, item.src, item.dest, item.size)
            try:
                receipt = upload_streamed(transport, host, item, tick, traffic)
            except BaseException as exc:
                stop(exc)
                raise
            if receipt is not None:
                with lock:
                    receipts[item.dest] = receipt

    try:
        if len(clients) <= 1 and not packed and not streamed:
            if clients:
                lane(sftp)
            return receipts
        with ThreadPoolExecutor(max_workers=len(clients) + packers + streamers) as pool:
            futures = [pool.submit(for_host(host, lane), c) for c in clients]
            futures += [pool.submit(for_host(host, packer)) for _ in range(packers)]
            futures += [pool.submit(for_host(host, streamer)) for _ in range(streamers)]
        if first:
            raise first[0]
        return receipts
    finally:
        for client in extra:
            _close_quietly(client)


def upload_compressed(transport: Any, host: str, item: Upload, codec: str,
                      tick: Callable[[int], None], traffic: Any = None) -> None:
    """Send *item* compressed; the host decodes it into a temporary file and renames it."""
    tmp = _temporary(item.dest)
    script = compression.receive_script(codec, tmp, item.dest, item.size, item.mode)
    _in_flight(host, tmp, True)
    try:
        compression.send(transport, codec, item.src, item.size, script, tick, traffic=traffic)
        _in_flight(host, tmp, False)
    except BaseException as exc:
        _stream_broke(transport, host, item, tmp, exc, compression.Failed,
                      f" ({codec}-compressed)", traffic)


def upload_streamed(transport: Any, host: str, item: Upload, tick: Callable[[int], None],
                    traffic: Any = None) -> Optional["stream.Receipt"]:
    """Stream *item* to the host's receiver (temporary file, size check, rename); its receipt."""
    tmp = _temporary(item.dest)
    _in_flight(host, tmp, True)
    try:
        receipt = stream.send(transport, item.src, tmp, item.dest, item.size, item.mode, tick,
                              traffic)
        _in_flight(host, tmp, False)
        return receipt
    except BaseException as exc:
        _stream_broke(transport, host, item, tmp, exc, stream.Failed, "", traffic)


def _stream_broke(transport: Any, host: str, item: Upload, tmp: str, exc: BaseException,
                  failed: type, how: str, traffic: Any) -> NoReturn:
    """Clean up after the stream of *item* broke with *exc*; raise what to report.

    The host's receiving script removes its temporary file when the stream
    breaks; this covers a host that never got that far (one quick command when
    it is gone already). *failed* is the sender's own error type, *how* says
    how the bytes went (``" (lz4-compressed)"``).
    """
    compression.remove(transport, tmp, traffic=traffic)
    _in_flight(host, tmp, False)
    if isinstance(exc, failed):
        if exc.short:  # type: ignore[attr-defined]
            raise ShortWrite(item, exc.written) from exc  # type: ignore[attr-defined]
        raise CopyError(f"upload of {item.src}{how} failed: "
                        f"{exc.message}; the old file is left in place",  # type: ignore[attr-defined]
                        host=host, path=item.dest) from exc
    if isinstance(exc, (RunnerError, KeyboardInterrupt)):
        raise exc
    raise CopyError(f"upload of {item.src} failed: {describe(exc)}", host=host,
                    path=item.dest) from exc


def _transport_of(sftp: Any) -> Any:
    """The SSH transport under an SFTP client (None for a stand-in without one)."""
    try:
        return sftp.get_channel().get_transport()
    except Exception:  # noqa: BLE001 - fakes in unit tests
        return None


def _close_quietly(client: Any) -> None:
    """Close an extra SFTP client, ignoring errors."""
    try:
        client.close()
    except Exception:  # noqa: BLE001 - cleanup only
        LOG.debug("could not close an SFTP channel")
