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
    """One file to bring home."""

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


def list_results(shell, base_dir: str, patterns: Sequence[str]) -> Dict[str, int]:
    """Return relative path -> size of the regular files in *base_dir* matching *patterns*."""
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
        if not size.isdigit() or not name:
            continue
        rel = os.path.normpath(name[2:] if name.startswith("./") else name)
        if rel.startswith("..") or os.path.isabs(rel):
            continue  # never trust a host's path to leave base_dir
        if any(rx.match(rel) for rx in regexes):
            found[rel] = int(size)
    return found


def fetch_host(shell, sftp: Callable[[], object], host: str,
               items: Sequence[Tuple[str, str, Sequence[str], str]], dest_root: str,
               progress: Optional[Progress] = None) -> FetchReport:
    """Fetch results and logs of *items* ``(name, base_dir, patterns, log_file)`` from *host*."""
    report = FetchReport(host)
    wanted: List[Wanted] = []
    for name, base_dir, patterns, log_file in items:
        target = os.path.join(dest_root, _safe(host), _safe(name))
        for rel, size in sorted(list_results(shell, base_dir, patterns).items()):
            wanted.append(Wanted(f"{base_dir.rstrip('/')}/{rel}", os.path.join(target, rel), size))
        log_size = _remote_size(shell, log_file)
        if log_size is not None:
            wanted.append(Wanted(log_file, os.path.join(target, LOG_NAME), log_size))
    if not wanted:
        return report
    hashes, _ = remote_sha1(shell, [w.remote for w in wanted])
    try:
        client = sftp()
    except NoSFTP as exc:
        if getattr(shell, "connection", None) is None:
            raise
        LOG.info("%s: no SFTP subsystem (%s): reading the files with cat", host, exc.message)
        client = ExecReader(shell.connection)
    for item in wanted:
        if (os.path.isfile(item.local) and os.path.getsize(item.local) == item.size
                and hashes.get(item.remote) == local_sha1(item.local)):
            report.unchanged.append(item.local)
            continue
        os.makedirs(os.path.dirname(item.local), exist_ok=True)
        tmp = f"{item.local}.rr-part"
        seen = [0]

        def callback(done: int, _total: int, seen=seen) -> None:
            if progress is not None:
                progress(host, done - seen[0])
            seen[0] = done
        try:
            client.get(item.remote, tmp, callback=callback)  # type: ignore[attr-defined]
            os.replace(tmp, item.local)
        except (OSError, IOError) as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise CopyError(f"could not fetch: {exc}", host=host, path=item.remote) from exc
        report.copied.append(item.local)
        report.bytes += seen[0]
    return report


class ExecReader:
    """Files read with ``cat`` on an exec channel each: what SFTP's ``get`` does, without SFTP.

    Hardened hosts may run sshd without the SFTP subsystem; a plain command
    still reads any file the login user can. No read waits longer than
    :data:`READ_TIMEOUT` for the host's next bytes.
    """

    READ_TIMEOUT = 300.0

    def __init__(self, connection) -> None:
        self.connection = connection

    def get(self, remote: str, local: str, callback: Optional[Callable[[int, int], None]] = None) -> None:
        channel = self.connection.exec_channel("cat -- " + shlex.quote(remote))
        try:
            channel.settimeout(self.READ_TIMEOUT)
            done = 0
            with open(local, "wb") as out:
                while True:
                    data = channel.recv(1 << 16)
                    if not data:
                        break
                    out.write(data)
                    done += len(data)
                    if callback is not None:
                        callback(done, 0)
            status = channel.recv_exit_status()
            if status != 0:
                said = channel.recv_stderr(4096).decode("utf-8", "replace").strip()
                raise OSError(f"cat exited with status {status}: {said or 'no message'}")
        finally:
            channel.close()


def _safe(name: str) -> str:
    """Return *name* usable as one local path component."""
    cleaned = name.replace("/", "_").replace("\0", "_")
    return "_" + cleaned if cleaned in ("", ".", "..") else cleaned


def _remote_size(shell, path: str) -> Optional[int]:
    result = shell.script(f"stat -L -c %s {shlex.quote(path)} 2>/dev/null\n", timeout=60)
    text = result.stdout.strip()
    return int(text) if text.isdigit() else None
