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
travel as one tar stream per directory (and chunk) into a stage directory
beside their destination, are checked by size and renamed into place by one
``mv``. An executable that is running can be replaced (its old inode stays
alive); a failed copy removes its temporary file or stage directory, and says
why (a full disk is named as such, with the old file left in place).

Ctrl-C stops every upload at its next chunk (:func:`wait_or_cancel`): each
removes its temporary file, and whatever a busy link keeps from being removed
in time is named, and swept by a later run (see ``sync._sweep_script``).
Within a host several SFTP channels (:data:`LANES`), compressed streams or
bundle commands run at once, within OpenSSH's default ``MaxSessions``.
"""

from __future__ import annotations

import io
import logging
import posixpath
import secrets
import shlex
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from remote_runner import compression, sftpwrite
from remote_runner.errors import EXIT_INTERRUPTED, CopyError, RunnerError, describe
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
#: Files up to this size travel in tar bundles (one exec per directory and
#: chunk) instead of one SFTP exchange each: round trips, not bytes, dominate them.
SMALL_FILE = 256 << 10
#: Most files and bytes in one bundle (the file names are on one command line).
BUNDLE_FILES = 400
BUNDLE_BYTES = 16 << 20
SHORT_MARK = "RR-SHORT-WRITE"
#: Minutes after which a temporary file of ours is known to be left by a killed copy.
STALE_MINUTES = 10
#: Seconds the uploads get, after Ctrl-C, to remove their temporary files.
CANCEL_GRACE = 1.0
#: Called with (host, bytes_done_delta) while uploading.
Progress = Callable[[str, int], None]
#: Opens one more SFTP client on the host's connection (for a parallel lane).
LaneOpener = Callable[[], Any]


@dataclass(frozen=True)
class Upload:
    """One regular file to place on a host."""

    src: str
    dest: str
    mode: int
    size: int


def bundles(items: Sequence[Upload]) -> List[List[Upload]]:
    """Group small files by destination directory, in chunks of bounded count and size."""
    groups: Dict[str, List[List[Upload]]] = {}
    for item in items:
        chunks = groups.setdefault(posixpath.dirname(item.dest), [[]])
        last = chunks[-1]
        if last and (len(last) >= BUNDLE_FILES or
                     sum(u.size for u in last) + item.size > BUNDLE_BYTES):
            chunks.append(last := [])
        last.append(item)
    return [chunk for chunks in groups.values() for chunk in chunks]


def bundle_tar(items: Sequence[Upload]) -> bytes:
    """Return a tar of *items* under their base names (modes kept, owned by uid 0)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for item in items:
            with open(item.src, "rb") as handle:
                data = handle.read()
            if len(data) != item.size:
                raise CopyError("local file changed while copying", path=item.src)
            info = tarfile.TarInfo(posixpath.basename(item.dest))
            info.size, info.mode, info.mtime = item.size, item.mode, int(time.time())
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload_bundle(shell: "Shell", host: str, items: Sequence[Upload]) -> None:
    """Unpack *items* (one directory) into a stage dir beside them and rename them into place."""
    directory = posixpath.dirname(items[0].dest)
    stage = posixpath.join(directory, f".rr-stage-{secrets.token_hex(4)}")
    # "./name" keeps names that start with '-' from looking like options.
    names = " ".join(shlex.quote("./" + posixpath.basename(u.dest)) for u in items)
    q = shlex.quote
    chmods = ""
    for mode in sorted({u.mode for u in items}):
        same = " ".join(q("./" + posixpath.basename(u.dest)) for u in items if u.mode == mode)
        chmods += f"chmod {mode:o} {same} || fail\n"
    # tar's status covers write errors (a full disk) and a cut stream; the sizes
    # are checked as well before anything is renamed into place.
    sizes = "\n".join(str(u.size) for u in items)
    script = (f"s={q(stage)}\n"
              "fail() { cd / && rm -rf \"$s\"; exit 1; }\n"
              "mkdir \"$s\" || exit 1\n"
              "tar -xf - -C \"$s\" || fail\n"
              "cd \"$s\" || fail\n"
              f"if got=$(stat -c %s -- {names} 2>/dev/null) && [ \"$got\" != {q(sizes)} ]; then\n"
              f"  echo {SHORT_MARK} >&2; fail\nfi\n" + chmods +
              f"mv -f {names} {q(directory)}/ || fail\n"
              "cd / && rmdir \"$s\"\n")
    tar = bundle_tar(items)
    result = shell.feed(script, tar, timeout=600)
    if result.exit_status != 0:
        raise CopyError(f"bundled upload of {len(items)} file(s) failed: "
                        f"{_bundle_failure(result.stderr, result.exit_status)}; "
                        "the old files are left in place", host=host, path=directory)


def _bundle_failure(stderr: str, status: int) -> str:
    """The cause of a failed bundle in a few words (tar repeats it for every file)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for cause in ("No space left on device", "Disk quota exceeded", "Read-only file system",
                  "Permission denied"):
        if any(cause in line for line in lines):
            return cause
    if SHORT_MARK in lines:
        return "the host kept fewer bytes than were sent"
    return lines[0] if lines else f"exit status {status}"


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
               open_lane: Optional[LaneOpener] = None, lanes: int = LANES) -> None:
    """Upload *items* over *sftp* plus up to ``lanes - 1`` extra SFTP channels in parallel.

    Large files are cut into ranges written by several channels at once; a
    file whose sample compresses well goes compressed over an exec channel
    (:mod:`remote_runner.compression`) when the host has a decoder. Channels
    in use at once stay within *lanes* (OpenSSH's ``MaxSessions`` is 10).
    """
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
    width = max(1, lanes - packers) if open_lane is not None else 1
    work: List[Tuple[Upload, "sftpwrite.Range", _FileJob]] = []
    for item in plain:
        parts = sftpwrite.ranges(item.size, width)
        job = _FileJob(item, host, len(parts))
        work.extend((item, part, job) for part in parts)
    clients = [sftp] if work or packed else []
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

    try:
        if len(clients) <= 1 and not packed:
            if clients:
                lane(sftp)
            return
        with ThreadPoolExecutor(max_workers=len(clients) + packers) as pool:
            futures = [pool.submit(for_host(host, lane), c) for c in clients]
            futures += [pool.submit(for_host(host, packer)) for _ in range(packers)]
        if first:
            raise first[0]
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
        # The host's script removes it when the stream breaks; this covers a host
        # that never got that far (and costs one quick command when it is gone already).
        compression.remove(transport, tmp, traffic=traffic)
        _in_flight(host, tmp, False)
        if isinstance(exc, compression.Failed):
            if exc.short:
                raise ShortWrite(item, exc.written) from exc
            raise CopyError(f"upload of {item.src} ({codec}-compressed) failed: {exc.message}; "
                            "the old file is left in place", host=host, path=item.dest) from exc
        if isinstance(exc, (RunnerError, KeyboardInterrupt)):
            raise
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


def upload_bundles(shell: "Shell", host: str, items: Sequence[Upload],
                   progress: Optional[Progress] = None) -> None:
    """Upload small files as tar bundles, several directories at once."""
    def one(chunk: List[Upload]) -> None:
        if progress is not None:
            progress(host, 0)  # lets a cancelled copy stop before the next bundle
        upload_bundle(shell, host, chunk)
        if progress is not None:
            progress(host, sum(u.size for u in chunk))

    with ThreadPoolExecutor(max_workers=LANES) as pool:
        futures = [pool.submit(for_host(host, one), chunk) for chunk in bundles(items)]
    for future in futures:
        error = future.exception()
        if error is not None:
            if isinstance(error, RunnerError):
                raise error
            LOG.debug("%s: bundled upload failed", host, exc_info=error)
            raise CopyError(f"bundled upload failed: {describe(error)}", host=host) from error
