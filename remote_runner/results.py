"""Results: bring a run's outputs and logs home, next to its record.

``component.results`` lists glob patterns relative to the component's
base_dir (``*`` and ``?`` stay within one directory level, ``**`` crosses
levels). ``remote-runner fetch`` (or ``run --fetch``) copies every matching
regular file, and the component's screen log, into::

    <runs>/<run-id>/<host>/<name>/<relative path>      results, as on the host
    <runs>/<run-id>/<host>/<name>/screen.log           what the window printed

A file already fetched with the same size and SHA-1 is skipped, so fetching
again after more results appeared copies only the new ones. Files land under
a temporary name and are renamed into place; names the host sends are checked
(no ``..``, no absolute paths, nothing outside the component's directory).
Files are read over SFTP, or with ``cat`` on exec channels from a host whose
sshd has no SFTP subsystem (:class:`ExecReader`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from remote_runner.errors import CopyError, NoSFTP
from remote_runner.sync import local_sha1, remote_sha1

LOG = logging.getLogger(__name__)

LOG_NAME = "screen.log"
#: Progress callback: (host, bytes just copied).
Progress = Callable[[str, int], None]


def glob_regex(pattern: str) -> "re.Pattern[str]":
    """Return a regex for a results glob (``*``/``?`` within a level, ``**`` across)."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append("[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch))
        i += 1
    return re.compile("^" + "".join(out) + "$", re.S)


def search_root(pattern: str) -> str:
    """Return the directory (relative to base_dir) below which *pattern* can match."""
    parts = pattern.split("/")
    fixed = []
    for part in parts[:-1]:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return "/".join(fixed) or "."


@dataclass
class Wanted:
    """One file to bring home: at most *size* bytes (its size when listed) of *remote*."""

    remote: str
    local: str
    size: int


@dataclass
class FetchReport:
    """What a fetch did on one host."""

    host: str
    copied: List[str] = field(default_factory=list)
    unchanged: List[str] = field(default_factory=list)
    bytes: int = 0
    #: (name as the host sent it, escaped; why it was left on the host)
    skipped: List[Tuple[str, str]] = field(default_factory=list)


#: A size or count as a host may print it (a bigger number is not believed).
_NUMBER = re.compile(r"[0-9]{1,18}")
#: The longest file name most filesystems take, in bytes.
NAME_MAX = 255
#: Deepest result path taken (a host could otherwise ask for thousands of directories).
MAX_DEPTH = 64
#: No read waits longer than this for the host's next bytes (seconds).
READ_TIMEOUT = 120.0
#: A file must arrive at least this fast (bytes/s) after the first two minutes: a host that
#: trickles bytes cannot hold a fetch for ever.
MIN_RATE = 128 * 1024
_CHUNK = 1 << 16


def _refusal(rel: str) -> str:
    """Return why result path *rel* (relative, normalised) is not fetched ('' to fetch it)."""
    from remote_runner.errors import control_characters
    if rel.startswith("..") or os.path.isabs(rel) or rel in (".", ""):
        return "it leaves base_dir"  # never trust a host's path to leave base_dir
    bad = control_characters(rel)
    if bad:
        return f"its name has control characters ({bad})"
    parts = rel.split("/")
    if len(parts) > MAX_DEPTH:
        return f"it is more than {MAX_DEPTH} directories deep"
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX for part in parts):
        return f"a part of its name is longer than {NAME_MAX} bytes"
    if rel == LOG_NAME:
        return f"it would take the place of the fetched log ({LOG_NAME})"
    return ""


def list_results(shell, base_dir: str, patterns: Sequence[str],
                 skipped: Optional[List[Tuple[str, str]]] = None) -> Dict[str, int]:
    """Return relative path -> size of the regular files in *base_dir* matching *patterns*.

    A matching name that cannot be fetched safely (see :func:`_refusal`) is left
    out and added to *skipped* as ``(escaped name, reason)``.
    """
    if not patterns:
        return {}
    roots = sorted({search_root(p) for p in patterns})
    q = shlex.quote
    script = (f"cd {q(base_dir)} || exit 0\n"
              f"for r in {' '.join(q(r) for r in roots)}; do\n"
              '  [ -d "$r" ] || continue\n'
              '  find "$r" -type f -exec stat -c "%s %n" {} + 2>/dev/null\n'
              "done\n")
    result = shell.script(script, timeout=120)
    regexes = [glob_regex(p) for p in patterns]
    found: Dict[str, int] = {}
    for line in result.stdout.splitlines():
        size, _, name = line.partition(" ")
        if not _NUMBER.fullmatch(size) or not name:
            continue
        rel = os.path.normpath(name[2:] if name.startswith("./") else name)
        if not any(rx.match(rel) for rx in regexes):
            continue
        why = _refusal(rel)
        if why:
            if skipped is not None:
                skipped.append((repr(rel)[1:-1][:300], why))
            continue
        found[rel] = int(size)
    return found


def fetch_host(shell, opener: Callable[[], object], host: str,
               items: Sequence[Tuple[str, str, Sequence[str], str]], dest_root: str,
               progress: Optional[Progress] = None) -> FetchReport:
    """Fetch results and logs of *items* ``(name, base_dir, patterns, log_file)`` from *host*.

    Every file lands under a fresh temporary name (made with ``O_EXCL``: never
    through a link someone left there), is synced and renamed into place. A
    file that cannot be fetched does not stop the others; the first failure is
    raised, as a :class:`CopyError`, once all were tried.
    """
    report = FetchReport(host)
    wanted: List[Wanted] = []
    homes: Dict[str, str] = {}
    for name, base_dir, patterns, log_file in items:
        target = os.path.join(dest_root, _safe(host), _safe(name))
        for rel, size in sorted(list_results(shell, base_dir, patterns, report.skipped).items()):
            local = os.path.join(target, rel)
            wanted.append(Wanted(f"{base_dir.rstrip('/')}/{rel}", local, size))
            homes[local] = target
        log_size = _remote_size(shell, log_file)
        if log_size is not None:
            wanted.append(Wanted(log_file, os.path.join(target, LOG_NAME), log_size))
            homes[wanted[-1].local] = target
    for name, why in report.skipped:
        LOG.warning("%s: not fetching %s: %s", host, name, why)
    if not wanted:
        return report
    hashes, _ = remote_sha1(shell, [w.remote for w in wanted])
    todo: List[Wanted] = []
    for w in wanted:
        if (os.path.isfile(w.local) and os.path.getsize(w.local) == w.size
                and hashes.get(w.remote) == local_sha1(w.local)):
            report.unchanged.append(w.local)
        else:
            todo.append(w)
    if not todo:
        return report
    _check_room(host, dest_root, sum(w.size for w in todo))
    try:
        client = opener()  # an SFTPReader or a LocalReader
    except NoSFTP as exc:
        if getattr(shell, "connection", None) is None:
            raise
        LOG.info("%s: no SFTP subsystem (%s): reading the files with cat", host, exc.message)
        client = ExecReader(shell.connection)
    failures: List[CopyError] = []
    for item in todo:
        try:
            got = _fetch_one(client, item, homes[item.local],
                             lambda n: progress(host, n) if progress is not None else None)
        except CopyError as exc:
            exc.host = exc.host or host
            failures.append(exc)
            continue
        except Exception as exc:  # paramiko's errors are not all OSError (SSHException, EOFError)
            failures.append(CopyError(f"could not fetch: {exc or type(exc).__name__}",
                                      host=host, path=item.remote))
            continue
        report.copied.append(item.local)
        report.bytes += got
    if failures:
        first = failures[0]
        if len(failures) > 1:
            first.message = (f"{first.message} (and {len(failures) - 1} more of {len(todo)} "
                             "files could not be fetched)")
        raise first
    return report


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_room(host: str, dest_root: str, needed: int) -> None:
    """Refuse a fetch whose files (by the sizes the host gave) cannot fit on this machine."""
    import shutil
    probe = dest_root
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise CopyError(f"the files to fetch need {needed} bytes and {probe} has {free} free; "
                        "make room or fetch fewer (fetch COMPONENT…, --host)", host=host,
                        path=dest_root)


def _fetch_one(client, item: Wanted, home: str, advance: Callable[[int], None]) -> int:
    """Copy at most ``item.size`` bytes of ``item.remote`` to ``item.local``; return bytes copied.

    The directories are made inside *home* (the component's fetch directory)
    and checked to resolve inside it, so a link found on the way does not carry
    the file elsewhere.
    """
    import tempfile
    import time
    directory = os.path.dirname(item.local)
    os.makedirs(directory, exist_ok=True)
    real_home = os.path.realpath(home)
    if os.path.commonpath([os.path.realpath(directory), real_home]) != real_home:
        raise CopyError(f"not fetched: {directory} leads out of {home} (a symbolic link?)",
                        path=item.remote)
    allowed = READ_TIMEOUT + item.size / MIN_RATE
    deadline = time.monotonic() + allowed
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".rr-", suffix=".part")
    os.fchmod(fd, 0o666 & ~_umask())  # (mkstemp's 0600: a fetched file is as any file made here)
    done = 0
    try:
        with os.fdopen(fd, "wb") as out:
            source = client.open(item.remote, item.size)
            try:
                while done < item.size:
                    if time.monotonic() > deadline:
                        raise CopyError(f"not fetched: its {item.size} bytes took longer "
                                        f"than the {allowed:.0f} s allowed", path=item.remote)
                    data = source.read(min(_CHUNK, item.size - done))
                    if not data:
                        break  # it shrank since it was listed: what is there
                    out.write(data)
                    done += len(data)
                    advance(len(data))
            finally:
                source.close(complete=done == item.size)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, item.local)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return done


class ExecReader:
    """Files read with ``cat`` on an exec channel each: what SFTP's ``open`` does, without SFTP.

    Hardened hosts may run sshd without the SFTP subsystem; a plain command
    still reads any file the login user can. No read waits longer than
    :data:`READ_TIMEOUT` for the host's next bytes, nor the exit status after them.
    """

    def __init__(self, connection) -> None:
        self.connection = connection

    def open(self, remote: str, size: int) -> "_CatStream":
        return _CatStream(self.connection.exec_channel("cat -- " + shlex.quote(remote)))


class _CatStream:
    """The output of one ``cat`` on the host, read like a file."""

    def __init__(self, channel) -> None:
        self.channel = channel
        channel.settimeout(READ_TIMEOUT)

    def read(self, n: int) -> bytes:
        return self.channel.recv(n)

    def close(self, complete: bool = False) -> None:
        """End the read; unless every byte wanted came, make sure ``cat`` did not fail."""
        try:
            if complete:
                return  # (a file that grew: the rest is not wanted, and cat may still be sending)
            if not self.channel.status_event.wait(READ_TIMEOUT):
                raise OSError(f"the host sent no exit status within {READ_TIMEOUT:.0f} s")
            status = self.channel.recv_exit_status()
            if status != 0:
                said = self.channel.recv_stderr(4096).decode("utf-8", "replace").strip()
                raise OSError(f"reading it exited with status {status}: "
                              f"{_printable(said) or 'no message'}")
        finally:
            self.channel.close()


class SFTPReader:
    """Files read over SFTP: pipelined reads, a timeout on every answer, no more than listed."""

    def __init__(self, connection) -> None:
        self.sftp = connection.sftp()  # NoSFTP where the host's sshd has no SFTP subsystem
        self.sftp.get_channel().settimeout(READ_TIMEOUT)

    def open(self, remote: str, size: int) -> "_Handle":
        handle = self.sftp.open(remote, "rb")
        # the size listed, not what the host's stat says now; a bounded number in flight
        handle.prefetch(size, max_concurrent_requests=64)
        return _Handle(handle)


class LocalReader:
    """Files of localhost components, read in place."""

    def open(self, remote: str, size: int) -> "_Handle":
        return _Handle(open(remote, "rb"))


class _Handle:
    """A file open for reading whose ``close`` takes (and ignores) the reader's ``complete``."""

    def __init__(self, handle) -> None:
        self.read = handle.read
        self._handle = handle

    def close(self, complete: bool = False) -> None:
        self._handle.close()


def _printable(text: str) -> str:
    """*text* without the control characters a host may have put in it."""
    from remote_runner.tails import clean_line
    return " ".join(clean_line(line) for line in text.splitlines())


def _safe(name: str) -> str:
    """Return *name* usable as one local path component."""
    cleaned = name.replace("/", "_").replace("\0", "_")
    return "_" + cleaned if cleaned in ("", ".", "..") else cleaned


def _remote_size(shell, path: str) -> Optional[int]:
    result = shell.script(f"stat -L -c %s {shlex.quote(path)} 2>/dev/null\n", timeout=60)
    text = result.stdout.strip()
    return int(text) if _NUMBER.fullmatch(text) else None
