"""Copy the files components need to their hosts, skipping what is already there.

Per host the work is: a plan (unique destination -> source, directories
expanded, relative destinations joined to the component's base_dir), **one**
``stat -c`` command for the size and mode of every destination (one SFTP
``listdir`` per directory where ``stat -c`` is missing), **one** remote hash
command for every file whose size and mode already match (``openssl dgst -sha1
-r``, or ``sha1sum`` with a warning where openssl is missing) while the local
hashes are computed, one ``mkdir -p`` for all directories, then the upload of
what differs. A run with nothing to copy opens no SFTP channel.

The same directory command reports the free space the uploads need (a copy
that cannot fit is refused before anything is written) and sweeps temporary
files that killed copies left behind. How the bytes get there without ever
leaving half a file is :mod:`remote_runner.upload`. Hosts are synced in
parallel, bounded by ``--forks``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shlex
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from remote_runner.errors import ConnectionLost, CopyError, RunnerError, describe
from remote_runner.events import host_context
from remote_runner.upload import (  # noqa: F401 - re-exported: sync is where callers look
    BUNDLE_BYTES, BUNDLE_FILES, LANES, SMALL_FILE, STALE_MINUTES, Cancelled, LaneOpener,
    Progress, ShortWrite, Upload, bundle_tar, bundles, explain, free_bytes, free_space,
    free_space_script, in_flight, upload_all, upload_bundle, upload_bundles, upload_file,
    wait_or_cancel,
)

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import FileSpec
    from remote_runner.shell import Shell

LOG = logging.getLogger(__name__)

#: Files hashed per ``openssl`` invocation (keeps each exec well under ARG_MAX).
HASH_CHUNK = 500
HASH_TOOL_MARK = "RR-HASH-TOOL"
STAT_OK_MARK = "RR-STAT-OK"
HAS_TAR_MARK = "RR-HAS-TAR"
#: Called with (host, files, bytes) once a host knows what it really has to upload.
Planned = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Plan:
    """Everything one host needs: directories (path, mode or None) and files."""

    host: str
    dirs: Tuple[Tuple[str, Optional[int]], ...]
    files: Tuple[Upload, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class HostSync:
    """What a sync did on one host."""

    host: str
    copied: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    bytes: int = 0
    hash_tool: str = "openssl"

    def summary(self) -> str:
        """Return the one-line report the CLI logs."""
        return (f"{self.host}: copied {len(self.copied)} file{'s' if len(self.copied) != 1 else ''}"
                f" ({self.bytes} bytes), {len(self.skipped)} unchanged")


def make_plan(host: str, entries: Iterable[Tuple["FileSpec", str]]) -> Plan:
    """Build the plan for *host* from (FileSpec, base_dir) pairs; duplicates are merged."""
    files: Dict[str, Upload] = {}
    dirs: Dict[str, Optional[int]] = {}
    for spec, base_dir in entries:
        dest = posixpath.normpath(posixpath.join(base_dir, spec.dest))
        if spec.is_dir:
            _add_tree(host, spec.src, dest, files, dirs)
        else:
            _add_file(host, spec.src, dest, files)
    for upload in files.values():
        dirs.setdefault(posixpath.dirname(upload.dest), None)
    ordered = tuple(sorted(files.values(), key=lambda u: u.dest))
    return Plan(host, tuple(sorted(dirs.items())), ordered)


def _add_file(host: str, src: str, dest: str, files: Dict[str, Upload]) -> None:
    """Add one file to *files*, refusing two different sources for one destination."""
    try:
        st = os.stat(src)
    except OSError as exc:
        raise CopyError(f"cannot read local source: {exc.strerror}", host=host, path=src) from exc
    if not stat.S_ISREG(st.st_mode):
        raise CopyError("local source is not a regular file", host=host, path=src)
    if not os.access(src, os.R_OK):
        raise CopyError("cannot read local source: Permission denied", host=host, path=src)
    old = files.get(dest)
    if old is not None and os.path.realpath(old.src) != os.path.realpath(src):
        raise CopyError(f"two different sources go to {dest}: {old.src} and {src}", host=host,
                        path=dest)
    files[dest] = Upload(src, dest, stat.S_IMODE(st.st_mode), st.st_size)


def _add_tree(host: str, src: str, dest: str, files: Dict[str, Upload],
              dirs: Dict[str, Optional[int]]) -> None:
    """Add directory *src* (recursively) as *dest*."""
    def unreadable(exc: OSError) -> None:
        raise CopyError(f"cannot read local source directory: {exc.strerror}", host=host,
                        path=exc.filename)

    for root, subdirs, names in os.walk(src, onerror=unreadable):
        subdirs.sort()
        rel = os.path.relpath(root, src)
        target = dest if rel == "." else posixpath.join(dest, *rel.split(os.sep))
        dirs[target] = stat.S_IMODE(os.stat(root).st_mode)
        for name in sorted(names):
            _add_file(host, os.path.join(root, name), posixpath.join(target, name), files)


_sha1_cache: Dict[Tuple[str, int, int, int], str] = {}
_sha1_lock = threading.Lock()


def local_sha1(path: str) -> str:
    """Return the hex SHA1 of a local file (remembered while the file is unchanged)."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    with _sha1_lock:
        known = _sha1_cache.get(key)
    if known is not None:
        return known
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    with _sha1_lock:
        _sha1_cache[key] = digest.hexdigest()
    return digest.hexdigest()


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
        if path in wanted and len(digest) == 40:
            hashes[path] = digest.lower()
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


def changed_files(shell: "Shell", sftp: Callable[[], Any], plan: Plan
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
        local = pool.submit(lambda: {c.src: local_sha1(c.src) for c in candidates})
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
        out += (f"find {words} -maxdepth 1 \\( -name '.*.rr-????????.tmp' -type f -o "
                f"-name '.rr-stage-????????' -type d \\) -mmin +{STALE_MINUTES} "
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


def sync_host(shell: "Shell", sftp: Any, plan: Plan, always_copy: bool = False,
              progress: Optional[Progress] = None,
              open_lane: Optional[LaneOpener] = None, small_file: int = SMALL_FILE,
              on_plan: Optional[Planned] = None) -> HostSync:
    """Bring one host up to date with *plan* and report what was done.

    *sftp* is an SFTP client or a function returning one: it is only asked for
    when a file must go over SFTP (a warm run needs no SFTP at all).
    """
    report = HostSync(plan.host)
    if not plan.files and not plan.dirs:
        return report
    get_sftp = sftp if callable(sftp) else (lambda: sftp)
    if always_copy:
        todo, same = list(plan.files), []
    else:
        todo, same, report.hash_tool = changed_files(shell, get_sftp, plan)
    report.skipped = [u.dest for u in same]
    if on_plan is not None:
        on_plan(plan.host, len(todo), sum(u.size for u in todo))
    has_tar = make_dirs(shell, plan, todo)
    small = [u for u in todo if u.size <= small_file] if has_tar and hasattr(shell, "feed") else []
    if small:
        upload_bundles(shell, plan.host, small, progress)
    bundled = set(small)
    rest = [u for u in todo if u not in bundled]
    if rest:
        try:
            upload_all(get_sftp(), plan.host, rest, progress, open_lane)
        except ShortWrite as exc:
            raise explain(shell, plan.host, exc) from exc
    report.copied = [u.dest for u in todo]
    report.bytes = sum(u.size for u in todo)
    return report


def sync_all(jobs: Sequence[Tuple["Shell", Callable[[], Any], Plan]], forks: int = 10,
             always_copy: bool = False, progress: Optional[Progress] = None,
             lane_openers: Optional[Dict[str, LaneOpener]] = None,
             cancel: Optional[threading.Event] = None,
             on_plan: Optional[Planned] = None) -> Dict[str, HostSync]:
    """Sync every (shell, sftp factory, plan) job in parallel; raise one error for all failures.

    Ctrl-C (or *cancel* set by the caller) stops every upload at its next
    chunk: each removes its temporary file and the interrupt goes on at once,
    without waiting for the copies to finish.
    """
    reports: Dict[str, HostSync] = {}
    errors: List[RunnerError] = []
    openers = lane_openers or {}
    stop = cancel if cancel is not None else threading.Event()

    def checked(host: str, delta: int) -> None:
        if stop.is_set():
            raise Cancelled("interrupted: the copy was stopped", host=host)
        if progress is not None and delta:
            progress(host, delta)

    def one(job: Tuple["Shell", Callable[[], Any], Plan]) -> HostSync:
        shell, sftp_factory, plan = job
        if not plan.files and not plan.dirs:
            return HostSync(plan.host)
        with host_context(plan.host):
            return sync_host(shell, sftp_factory, plan, always_copy, checked,
                             openers.get(plan.host), on_plan=on_plan)

    pool = ThreadPoolExecutor(max_workers=max(1, forks), thread_name_prefix="sync")
    futures = [(job[2].host, pool.submit(one, job)) for job in jobs]
    wait_or_cancel(pool, [f for _, f in futures], stop)
    for host, future in futures:
        try:
            reports[host] = future.result()
        except ConnectionLost as exc:
            errors.append(ConnectionLost(host, "the SSH connection was lost while copying files",
                                         exc.hint))
        except RunnerError as exc:
            errors.append(exc)
        except Exception as exc:  # noqa: BLE001 - reported per host, not lost
            errors.append(CopyError(f"copy failed: {describe(exc)}", host=host))
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise CopyError("; ".join(str(e) for e in errors))
    return reports
