"""Copy the files components need to their hosts, skipping what is already there.

Per host the work is: a plan (unique destination -> source, directories
expanded, relative destinations joined to the component's base_dir), **one**
``stat -c`` command for the size and mode of every destination (one SFTP
``listdir`` per directory where ``stat -c`` is missing), **one** remote hash
command for every file whose size and mode already match (``openssl dgst -sha1
-r``, or ``sha1sum`` with a warning where openssl is missing) while the local
hashes are computed, one ``mkdir -p`` for all directories, then the upload of
what differs. A run with nothing to copy opens no SFTP channel.

Nothing is ever written in place. Large files go over SFTP to a temporary name
in the destination directory and are renamed into place (``posix_rename``);
small files, where round trips cost more than bytes, travel as one tar stream
per directory (and chunk) into a stage directory beside their destination and
are renamed into place by one ``mv``. Either way a reader sees the old file or
the new one, never half of one, an executable that is running can be replaced
(its old inode stays alive), and a failed copy removes its temporary file or
stage directory. Hosts are synced in parallel, bounded by ``--forks``; within a
host paramiko's ``putfo`` pipelines each file's writes and several SFTP
channels (:data:`LANES`) or bundle commands run at once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import secrets
import shlex
import stat
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from remote_runner.errors import EXIT_INTERRUPTED, ConnectionLost, CopyError, RunnerError, describe
from remote_runner.events import for_host, host_context

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import FileSpec
    from remote_runner.shell import Shell

LOG = logging.getLogger(__name__)

#: Files hashed per ``openssl`` invocation (keeps each exec well under ARG_MAX).
HASH_CHUNK = 500
HASH_TOOL_MARK = "RR-HASH-TOOL"
STAT_OK_MARK = "RR-STAT-OK"
#: SFTP channels used at once per host. Each file costs a few round trips
#: (open, close, chmod, rename) that paramiko cannot pipeline across files, so
#: small files go through several channels in parallel. Kept under OpenSSH's
#: default ``MaxSessions 10`` (a refused channel just means fewer lanes).
LANES = 8
#: Files up to this size travel in tar bundles (one exec per directory and
#: chunk) instead of one SFTP exchange each: round trips, not bytes, dominate them.
SMALL_FILE = 256 << 10
#: Most files and bytes in one bundle (the file names are on one command line).
BUNDLE_FILES = 400
BUNDLE_BYTES = 16 << 20
HAS_TAR_MARK = "RR-HAS-TAR"
SHORT_MARK = "RR-SHORT-WRITE"
FREE_MARK = "RR-FREE"
#: Minutes after which a temporary file of ours is known to be left by a killed copy.
STALE_MINUTES = 10
#: Seconds the uploads get, after Ctrl-C, to remove their temporary files.
CANCEL_GRACE = 1.0
#: Called with (host, bytes_done_delta) while uploading.
Progress = Callable[[str, int], None]
#: Opens one more SFTP client on the host's connection (for a parallel lane).
LaneOpener = Callable[[], Any]
#: Called with (host, files, bytes) once a host knows what it really has to upload.
Planned = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Upload:
    """One regular file to place on a host."""

    src: str
    dest: str
    mode: int
    size: int


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
    for start in range(0, len(targets), HASH_CHUNK):
        chunk = " ".join(shlex.quote(d) for d in targets[start:start + HASH_CHUNK])
        script += f"stat -f -c '{FREE_MARK} %i %a %f %S %n' -- {chunk} 2>/dev/null\n"
    if targets:
        script += f"echo {FREE_MARK} uid $(id -u)\n"
    script += "exit 0\n"
    result = shell.script(script, timeout=120)
    if result.exit_status != 0:
        raise CopyError(f"could not create directories: {result.stderr.strip()}", host=plan.host)
    lines = result.stdout.splitlines()
    check_free_space(plan.host, uploads, [line for line in lines if line.startswith(FREE_MARK)])
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

    *report* holds ``RR-FREE fsid avail free bsize dir`` lines and one ``RR-FREE
    uid N`` line (root may use the blocks reserved for it). Lines that do not
    parse are ignored: a host without ``stat -f`` is simply not checked here,
    and the size check after each write still catches a full disk.
    """
    root = any(line.split()[1:] == ["uid", "0"] for line in report)
    fs_of: Dict[str, str] = {}
    room: Dict[str, int] = {}
    for line in report:
        parts = line.split(" ", 5)
        if len(parts) != 6 or not all(p.isdigit() for p in parts[2:5]):
            continue
        _, fsid, avail, free, bsize, directory = parts
        fs_of[directory] = fsid
        room[fsid] = int(free if root else avail) * int(bsize)
    on: Dict[str, List[Upload]] = {}
    for upload in uploads:
        fsid = fs_of.get(posixpath.dirname(upload.dest))
        if fsid is not None:
            on.setdefault(fsid, []).append(upload)
    for fsid, items in on.items():
        size = sum(u.size for u in items)
        if size > room[fsid]:
            biggest = max(items, key=lambda u: u.size)
            more = f" with {len(items) - 1} other file(s)" if len(items) > 1 else ""
            raise CopyError(f"No space left on device: copying it{more} needs {size} bytes on "
                            f"its filesystem, which has {room[fsid]} free; nothing was copied",
                            host=host, path=biggest.dest)


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


def upload_file(sftp: Any, host: str, item: Upload, progress: Optional[Progress] = None) -> None:
    """Upload one file under a temporary name and rename it into place."""
    directory, base = posixpath.split(item.dest)
    tmp = posixpath.join(directory, f".{base}.rr-{secrets.token_hex(4)}.tmp")
    seen = [0]

    def callback(done: int, _total: int) -> None:
        if progress is not None:
            progress(host, done - seen[0])
        seen[0] = done

    _in_flight(host, tmp, True)
    try:
        with open(item.src, "rb") as handle:
            sftp.putfo(handle, tmp, file_size=item.size, callback=callback, confirm=False)
        # paramiko drops the status of pipelined writes it has not read back when
        # the file is closed (a full disk answers them with SSH_FX_FAILURE): the
        # size the host reports for the temporary file is what proves the write.
        written = sftp.stat(tmp).st_size
        if written != item.size:
            raise ShortWrite(item, written)
        sftp.chmod(tmp, item.mode)
        sftp.posix_rename(tmp, item.dest)
        _in_flight(host, tmp, False)
    except BaseException as exc:
        _remove_quietly(sftp, tmp)
        _in_flight(host, tmp, False)
        if isinstance(exc, (RunnerError, KeyboardInterrupt)):
            raise
        raise CopyError(f"upload of {item.src} failed: {describe(exc)}", host=host,
                        path=item.dest) from exc


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


#: Bytes free for unprivileged users on the filesystem of each directory (POSIX ``df -P``).
_FREE_SCRIPT = "df -Pk -- {dirs} 2>/dev/null | awk 'NR > 1 {{ print $4 }}'\n"


def free_bytes(shell: "Shell", directory: str) -> Optional[int]:
    """Return the bytes available on *directory*'s filesystem on the host (None: unknown)."""
    try:
        result = shell.script(_FREE_SCRIPT.format(dirs=shlex.quote(directory)), timeout=60)
    except RunnerError:
        return None
    words = result.stdout.split()
    return int(words[-1]) * 1024 if words and words[-1].isdigit() else None


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
    """Upload *items* over *sftp* plus up to ``lanes - 1`` extra SFTP channels in parallel."""
    clients = [sftp]
    extra: List[Any] = []
    while open_lane is not None and len(clients) < min(lanes, len(items)):
        try:
            extra.append(open_lane())
        except Exception as exc:  # noqa: BLE001 - a server limit (MaxSessions) is fine
            LOG.debug("%s: no extra SFTP channel (%s); using %d", host, exc, len(clients))
            break
        clients.append(extra[-1])
    pending = iter(items)
    lock = threading.Lock()
    failed = threading.Event()

    def lane(client: Any) -> None:
        while not failed.is_set():
            with lock:
                item = next(pending, None)
            if item is None:
                return
            try:
                LOG.debug("%s: uploading %s -> %s (%d bytes)", host, item.src, item.dest, item.size)
                upload_file(client, host, item, progress)
            except BaseException:
                failed.set()
                raise

    try:
        if len(clients) == 1:
            lane(sftp)
            return
        with ThreadPoolExecutor(max_workers=len(clients)) as pool:
            futures = [pool.submit(for_host(host, lane), c) for c in clients]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]
    finally:
        for client in extra:
            _close_quietly(client)


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
