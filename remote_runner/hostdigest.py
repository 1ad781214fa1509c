"""Sizes, modes and SHA-1s of host files by plain shell commands, for hosts without python3.

Where the host has python3, one exec against its manifest answers all of this
(:mod:`remote_runner.manifest`). Elsewhere — a minimal Debian, a router, a
container without Python — the change check needs only POSIX tools: one ``stat
-c`` for the size and mode of every file (an SFTP listing per directory where
``stat -c`` is missing too), and one batched hash command for the files whose
size and mode match: ``openssl dgst -sha1 -r`` (SPAR's), else ``sha1sum``, else
nothing, in which case no file can be proven unchanged (:func:`changed_files`),
then one command for directories, free space and the sweep of temporary files
that killed copies left (:func:`make_dirs`). The dry run
(:mod:`remote_runner.plan`) and ``fetch`` (:mod:`remote_runner.results`) use
the read-only ones too: they must not write on the host.
"""

from __future__ import annotations

import logging
import posixpath
import shlex
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from remote_runner import hashcache
from remote_runner.digests import is_sha1
from remote_runner.errors import CopyError
from remote_runner.freespace import free_space, free_space_script
from remote_runner.upload import STAGED_MARK, STAGED_STALE_MINUTES, STALE_MINUTES, Upload

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.shell import Shell
    from remote_runner.sync import Plan

LOG = logging.getLogger(__name__)

#: Files hashed per ``openssl`` invocation (keeps each exec well under ARG_MAX).
HASH_CHUNK = 500
HASH_TOOL_MARK = "RR-HASH-TOOL"
HAS_TAR_MARK = "RR-HAS-TAR"
STAT_OK_MARK = "RR-STAT-OK"


#: Hashes the files named on its command line like ``sha1sum -b`` (hosts with
#: neither openssl nor sha1sum but a Python; unreadable files are left out).
_PY_SHA1 = (
    "import hashlib,sys\n"
    "for p in sys.argv[1:]:\n"
    " try:\n"
    "  h=hashlib.sha1()\n"
    "  with open(p,'rb') as f:\n"
    "   for b in iter(lambda:f.read(1<<20),b''):h.update(b)\n"
    "  print(h.hexdigest()+' *'+p)\n"
    " except OSError:pass\n")
#: Picks the first hash tool that works on the host and names it on a marker line.
_PICK_HASHER = (
    "if openssl dgst -sha1 -r /dev/null >/dev/null 2>&1; then h() { openssl dgst -sha1 -r \"$@\"; }\n"
    f"elif sha1sum -b /dev/null >/dev/null 2>&1; then echo {HASH_TOOL_MARK} sha1sum; "
    "h() { sha1sum -b \"$@\"; }\n"
    f"elif python3 -c '' >/dev/null 2>&1; then echo {HASH_TOOL_MARK} python3; "
    f"h() {{ python3 -c {shlex.quote(_PY_SHA1)} \"$@\"; }}\n"
    f"else echo {HASH_TOOL_MARK} none; exit 0\nfi\n")


def remote_sha1(shell: "Shell", paths: Sequence[str]) -> Tuple[Dict[str, str], str]:
    """Hash *paths* on the host in one command; return ({path: sha1}, tool used).

    The tool is openssl (SPAR's), else sha1sum, else the host's python3, else
    ``none``: then no file can be proven unchanged and all of them are copied.
    """
    hashable = [p for p in paths if "\n" not in p and "\\" not in p]
    if not hashable:
        return {}, "openssl"
    lines = [_PICK_HASHER]
    for start in range(0, len(hashable), HASH_CHUNK):
        words = " ".join(shlex.quote(p) for p in hashable[start:start + HASH_CHUNK])
        lines.append(f"h {words} 2>/dev/null")
    result = shell.script("\n".join(lines) + "\n", timeout=600)
    wanted = set(hashable)
    hashes: Dict[str, str] = {}
    tool = "openssl"
    for line in result.stdout.splitlines():
        if line.startswith(HASH_TOOL_MARK + " "):
            tool = line.split(" ", 1)[1]
            continue
        digest, _, rest = line.partition(" ")
        path = rest[1:] if rest[:1] in ("*", " ") else rest
        digest = digest.lower()  # (compared with hashlib's, which are lower-case)
        if path in wanted and is_sha1(digest):
            hashes[path] = digest
    return hashes, tool


def remote_attrs(sftp: Any, dirs: Iterable[str]) -> Dict[str, Tuple[int, int]]:
    """Return {path: (size, st_mode)} for the entries of each directory in *dirs* (SFTP)."""
    found: Dict[str, Tuple[int, int]] = {}
    for directory in sorted(set(dirs)):
        try:
            entries = sftp.listdir_attr(directory)
        except IOError:
            continue  # missing directory: everything in it must be uploaded
        for attr in entries:
            found[posixpath.join(directory, attr.filename)] = (attr.st_size, attr.st_mode or 0)
    return found


def remote_stat(shell: "Shell", paths: Sequence[str]) -> Optional[Dict[str, Tuple[int, int]]]:
    """Return {path: (size, st_mode)} of those *paths* that exist, in one command.

    None where ``stat -c`` is not available (the caller lists directories over
    SFTP instead: one round trip per directory rather than one in all).
    """
    lines = [f"stat -c %s / >/dev/null 2>&1 && echo {STAT_OK_MARK} || exit 0"]
    for start in range(0, len(paths), HASH_CHUNK):
        words = " ".join(shlex.quote(p) for p in paths[start:start + HASH_CHUNK])
        lines.append(f"stat -c '%s %f %n' -- {words} 2>/dev/null")
    result = shell.script("\n".join(lines) + "\n", timeout=600)
    out = result.stdout.splitlines()
    if STAT_OK_MARK not in out:
        return None
    wanted = set(paths)
    found: Dict[str, Tuple[int, int]] = {}
    for line in out:
        size, _, rest = line.partition(" ")
        mode, _, path = rest.partition(" ")
        if path in wanted and size.isdigit():
            try:
                found[path] = (int(size), int(mode, 16))
            except ValueError:
                continue
    return found


def changed_files(shell: "Shell", sftp: Callable[[], Any], plan: Plan, rehash: bool = False
                  ) -> Tuple[List[Upload], List[Upload], str]:
    """Split the plan's files into (to upload, unchanged) and report the hash tool used.

    Two round trips for any number of files: sizes and modes, then the hashes
    of those that match. Meanwhile the local hashes are computed in parallel.
    """
    # Names with a newline cannot be matched in line-oriented output: always upload those.
    listable = [f.dest for f in plan.files if "\n" not in f.dest]
    attrs = remote_stat(shell, listable)
    if attrs is None:
        attrs = remote_attrs(sftp(), {posixpath.dirname(f.dest) for f in plan.files})
    upload: List[Upload] = []
    candidates: List[Upload] = []
    for item in plan.files:
        size, mode = attrs.get(item.dest, (-1, 0))
        if not stat.S_ISREG(mode) or size != item.size or stat.S_IMODE(mode) != item.mode:
            upload.append(item)
        else:
            candidates.append(item)
    if not candidates:
        return upload, [], "openssl"
    with ThreadPoolExecutor(max_workers=1) as pool:
        local = pool.submit(lambda: {c.src: hashcache.LOCAL.sha1(c.src, rehash) for c in candidates})
        hashes, tool = remote_sha1(shell, [c.dest for c in candidates])
        local_hashes = local.result()
    if tool == "none":
        LOG.warning("%s: neither openssl, sha1sum nor python3 works on this host, so no file can "
                    "be proven unchanged: all %d are copied again", plan.host, len(candidates))
    elif tool != "openssl":
        LOG.warning("%s: openssl is not installed (or failed); comparing files with %s",
                    plan.host, tool)
    same = []
    for item in candidates:
        if hashes.get(item.dest) == local_hashes[item.src]:
            same.append(item)
        else:
            upload.append(item)
    return upload, same, tool


def make_dirs(shell: "Shell", plan: Plan, uploads: Sequence[Upload] = ()) -> bool:
    """Create every directory of the plan (one command); return whether the host has tar.

    The same command reports the free space of each filesystem *uploads* go
    to, and the copy is refused before anything is written when one of them
    cannot hold it (every upload needs its full size while it is a temporary file).
    """
    # A directory that already exists keeps its mode (copying into /tmp must not
    # make it 0755): only the directories this copy creates get the local mode,
    # parents first (sorted), with the test builtin, so no fork for existing ones.
    script = "".join(f"[ -d {q} ] || {{ mkdir -p {q} && chmod {mode:o} {q}; }} || exit 1\n"
                     for q, mode in ((shlex.quote(d), m) for d, m in plan.dirs if m is not None))
    words = " ".join(shlex.quote(d) for d, mode in plan.dirs if mode is None)
    script += f"mkdir -p {words} || exit 1\n" if words else ""
    script += f"command -v tar >/dev/null 2>&1 && echo {HAS_TAR_MARK}\n"
    script += _sweep_script(sorted({posixpath.dirname(f.dest) for f in plan.files}))
    targets = sorted({posixpath.dirname(u.dest) for u in uploads if "\n" not in u.dest})
    script += free_space_script(targets, HASH_CHUNK) + "exit 0\n"
    result = shell.script(script, timeout=120)
    if result.exit_status != 0:
        raise CopyError(f"could not create directories: {result.stderr.strip()}", host=plan.host)
    lines = result.stdout.splitlines()
    check_free_space(plan.host, uploads, lines)
    return HAS_TAR_MARK in lines


def _sweep_script(dirs: Sequence[str]) -> str:
    """Shell text removing temporary files and stage dirs that killed copies left in *dirs*.

    Only our own names (``.NAME.rr-XXXXXXXX.tmp``, ``.rr-stage-XXXXXXXX``) and
    only those untouched for :data:`STALE_MINUTES`: an upload still in progress
    writes its file all the time, so another run's live copy is never removed.
    """
    out = ""
    for start in range(0, len(dirs), HASH_CHUNK):
        words = " ".join(shlex.quote(d) for d in dirs[start:start + HASH_CHUNK])
        staged = f"'.*.rr-{STAGED_MARK}???????.tmp'"
        out += (f"find {words} -maxdepth 1 \\( \\( -name '.*.rr-????????.tmp' ! -name {staged} "
                f"-type f -o -name '.rr-stage-????????' -type d \\) -mmin +{STALE_MINUTES} -o "
                f"-name {staged} -type f -mmin +{STAGED_STALE_MINUTES} \\) "
                "-exec rm -rf {} + 2>/dev/null\n")
    return out


def check_free_space(host: str, uploads: Sequence[Upload], report: Sequence[str]) -> None:
    """Raise CopyError when a filesystem on the host has less room than the copy needs.

    *report* is the output of :func:`~remote_runner.upload.free_space_script`;
    a host without ``stat -f`` is simply not checked here, and the size check
    after each write still catches a full disk.
    """
    free = free_space(report)
    room = dict(free.values())
    on: Dict[str, List[Upload]] = {}
    for upload in uploads:
        known = free.get(posixpath.dirname(upload.dest))
        if known is not None:
            on.setdefault(known[0], []).append(upload)
    for fsid, items in on.items():
        size = sum(u.size for u in items)
        if size > room[fsid]:
            biggest = max(items, key=lambda u: u.size)
            more = f" with {len(items) - 1} other file(s)" if len(items) > 1 else ""
            raise CopyError(f"No space left on device: copying it{more} needs {size} bytes on "
                            f"its filesystem, which has {room[fsid]} free; nothing was copied",
                            host=host, path=biggest.dest)
