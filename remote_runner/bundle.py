"""Small files as tar bundles: one exec per directory (and chunk) instead of one SFTP exchange each.

For a file of a few KiB the round trips (open, write, close, chmod, rename)
cost far more than its bytes, so small files travel as one tar stream per
destination directory (and chunk of at most :data:`BUNDLE_FILES` files and
:data:`BUNDLE_BYTES` bytes) into a stage directory beside their destination;
the host checks every size before one ``mv`` puts them all in place, and a
failed bundle removes its stage directory and says why (a full disk is named
as such, with the old files left in place). Several bundles of a host go at
once (exec channels, within OpenSSH's ``MaxSessions``), and they may run
while the large files of the same host stream (:func:`remote_runner.sync.sync_host`).
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import secrets
import shlex
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from remote_runner import hashcache
from remote_runner.errors import CopyError, RunnerError, describe
from remote_runner.events import for_host
from remote_runner.upload import LANES, Progress, Upload

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.shell import Shell

LOG = logging.getLogger(__name__)

#: Most files and bytes in one bundle (the file names are on one command line).
BUNDLE_FILES = 400
BUNDLE_BYTES = 16 << 20
SHORT_MARK = "RR-SHORT-WRITE"


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
    """Return a tar of *items* under their base names (modes kept, owned by uid 0).

    Each file's SHA-1 goes to the local hash cache as it is read (a first
    copy compares nothing here): the next run knows these sources, so one
    edited among them is recognised as changed here and sent ahead
    (:mod:`remote_runner.precheck`).
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for item in items:
            with open(item.src, "rb") as handle:
                before = hashcache.stat_key(os.fstat(handle.fileno()))
                data = handle.read()
                hashcache.LOCAL.remember(item.src, handle.fileno(), data, before)
            if len(data) != item.size:
                raise CopyError("local file changed while copying", path=item.src)
            info = tarfile.TarInfo(posixpath.basename(item.dest))
            info.size, info.mode, info.mtime = item.size, item.mode, int(time.time())
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload_bundle(shell: "Shell", host: str, items: Sequence[Upload], then: str = "") -> str:
    """Unpack *items* (one directory) into a stage dir beside them and rename them into place.

    *then* is shell text run in the same exec once the files are in place
    (the manifest update of a copy that is this one bundle); its failure does
    not fail the copy. Returns the exec's output (what *then* printed).
    """
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
              "cd / && rmdir \"$s\"" + (" || exit 1\n" + then + "\nexit 0\n" if then else "\n"))
    tar = bundle_tar(items)
    result = shell.feed(script, tar, timeout=600)
    if result.exit_status != 0:
        raise CopyError(f"bundled upload of {len(items)} file(s) failed: "
                        f"{_bundle_failure(result.stderr, result.exit_status)}; "
                        "the old files are left in place", host=host, path=directory)
    return result.stdout


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


def upload_bundles(shell: "Shell", host: str, items: Sequence[Upload],
                   progress: Optional[Progress] = None, workers: int = LANES) -> None:
    """Upload small files as tar bundles, up to *workers* directories (or chunks) at once."""
    def one(chunk: List[Upload]) -> None:
        if progress is not None:
            progress(host, 0)  # lets a cancelled copy stop before the next bundle
        upload_bundle(shell, host, chunk)
        if progress is not None:
            progress(host, sum(u.size for u in chunk))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(for_host(host, one), chunk) for chunk in bundles(items)]
    for future in futures:
        error = future.exception()
        if error is not None:
            if isinstance(error, RunnerError):
                raise error
            LOG.debug("%s: bundled upload failed", host, exc_info=error)
            raise CopyError(f"bundled upload failed: {describe(error)}", host=host) from error
