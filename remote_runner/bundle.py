"""Small files as bundles: one exec per chunk of files instead of one SFTP exchange each.

For a file of a few KiB the round trips (open, write, close, chmod, rename)
cost far more than its bytes, so small files travel in bundles of at most
:data:`BUNDLE_FILES` files and :data:`BUNDLE_BYTES` bytes, one exec each,
whatever directories they go to. Each file is first written into a stage
directory beside its destination (``dir/.rr-stage-TOKEN/name``), so that
every later rename stays within one file system; only once every file of
the bundle is whole are they renamed into place. A failed bundle removes its
stage directories and says why (a full disk is named as such), and a file is
never half-written in place: it is the old one or the new one.

Two ways to write them. Where the host's python3 runs the manifest's program
(:func:`write_bundle`), the request and then the files' bytes back to back go
to that program, which writes and renames them, hashing each file as it
arrives; a bundle that is the whole copy is recorded in the host's manifest
by it too, the others answer each file's receipt (its stat in place and that
hash) for the copy's one record, as streamed files do: bundles written at
once and each rewriting the manifest would queue on its lock. Measured
here, 1,000 files of 2 KiB in 50 directories to 4 hosts at 0 ms: the host's
part of the copy took 90 ms a host as a tar (a 274 KiB script, ``mkdir``,
``tar``, then a python3 that renamed the files and read them all again to
hash them) and 52 ms so; the bytes sent fell from 2.8 to 2.2 MB a host, and
the copy phase from 0.47 to 0.33 s. Elsewhere (no python3, or a copy with
``--always-copy``, which checks nothing first) one tar unpacks the bundle below the
directories' common ancestor (:func:`upload_bundle`), then ``stat``,
``chmod`` and one ``mv`` per directory (one python3 for them all, past
:data:`RENAMER_FROM` directories, where there is one).

Why a bundle spans directories: on the host each directory cost an exec (a
login session and a shell) and five processes, and a source tree is many
small directories (42 execs a host and 2.2 s for the tree above, once).
Several bundles of a host go at once (exec channels, within OpenSSH's
``MaxSessions``), and they may run while the large files of the same host
stream (:func:`remote_runner.sync.sync_host`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import posixpath
import secrets
import shlex
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import (TYPE_CHECKING, Any, Callable, Container, Dict, Iterator, List, Optional, Sequence, Set,
                    Tuple, Union)

from remote_runner import hashcache, manifest
from remote_runner.errors import CopyError, RunnerError, describe
from remote_runner.events import for_host
from remote_runner.shell import PYTHON_FLAGS
from remote_runner.upload import LANES, Progress, Upload

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.shell import ScriptResult, Shell

LOG = logging.getLogger(__name__)

#: Most files and bytes in one bundle (each mv, stat and chmod names its files).
BUNDLE_FILES = 2000
BUNDLE_BYTES = 16 << 20
#: ... and about this many bytes of script (it travels on stdin, on the session lock's
#: shell or in an exec of its own: see :meth:`remote_runner.shell.RemoteShell.feed`).
BUNDLE_SCRIPT = 512 << 10
#: Bytes of tars kept for the other hosts of a run (see :class:`SharedTars`).
SHARED_TAR_BYTES = 64 << 20
SHORT_MARK = "RR-SHORT-WRITE"
#: What the manifest's writer says when its input ends before the bundle's last byte.
CUT_MARK = "RR-CUT-SHORT"


def bundles(items: Sequence[Upload]) -> List[List[Upload]]:
    """Cut small files into chunks of bounded count, size and script, each directory's files together."""
    chunks: List[List[Upload]] = [[]]
    size = text = 0
    seen: Set[str] = set()
    for item in sorted(items, key=lambda u: (posixpath.dirname(u.dest), u.dest)):
        directory = posixpath.dirname(item.dest)
        # the script names each file's stage path about three times, each directory about four
        file_text, dir_text = 3 * (len(item.dest) + 25), 4 * (len(directory) + 30)
        more = file_text + (0 if directory in seen else dir_text)
        if chunks[-1] and (len(chunks[-1]) >= BUNDLE_FILES or size + item.size > BUNDLE_BYTES
                           or text + more > BUNDLE_SCRIPT):
            chunks.append([])
            size = text = 0
            seen = set()
            more = file_text + dir_text
        chunks[-1].append(item)
        seen.add(directory)
        size += item.size
        text += more
    return [chunk for chunk in chunks if chunk]


def bundle_tar(items: Sequence[Upload], names: Optional[Sequence[str]] = None) -> bytes:
    """Return a tar of *items* (modes kept, owned by uid 0), named *names* (default: base names).

    Each file's SHA-1 goes to the local hash cache as it is read (a first
    copy compares nothing here): the next run knows these sources, so one
    edited among them is recognised as changed here and sent ahead
    (:mod:`remote_runner.precheck`).

    The headers are plain ustar ones written here (:func:`ustar_header`):
    ``tarfile`` spent about 80 of the 110 ms a 1,000-file bundle took, on the
    critical path of every cold copy (the tar is built before any host gets
    it). A name ustar cannot hold (over 255 bytes, or no ``/`` to split it
    at) makes the whole bundle go through ``tarfile`` as before.
    """
    now = int(time.time())
    wanted = [names[index] if names is not None else posixpath.basename(item.dest)
              for index, item in enumerate(items)]
    encoded = [name.encode("utf-8", "surrogateescape") for name in wanted]
    sources = [_read_source(item) for item in items]
    if all(ustar_split(name) is not None for name in encoded):
        parts: List[bytes] = []
        for name, item, data in zip(encoded, items, sources):
            parts += [ustar_header(name, item.size, item.mode, now), data, bytes(-item.size % BLOCK)]
        parts.append(bytes(2 * BLOCK))  # the end of the archive
        size = sum(len(part) for part in parts)
        parts.append(bytes(-size % RECORD))  # padded to whole records, as tar writes them
        return b"".join(parts)
    import tarfile  # (here: 2 ms of every run's start-up, for names ustar cannot hold)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, item, data in zip(wanted, items, sources):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = item.size, item.mode, now
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _read_source(item: Upload, hashed: Container[str] = ()) -> bytes:
    """The bytes of *item*'s source, its size checked; its SHA-1 remembered (see
    :func:`bundle_tar`) unless *hashed* says the local hash cache held it when the run planned.

    Plain descriptor calls, and no cache lookup for a source it knows: of the
    ~23 ms 1,000 small sources took to read, on the critical path of a cold
    copy (the hosts wait for the bytes), 6 were the reads themselves.
    """
    fd = os.open(item.src, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        before = hashcache.stat_key(os.fstat(fd))
        parts, got = [], 0
        while got <= item.size:  # (one byte past the planned size tells a file that grew)
            part = os.read(fd, item.size + 1 - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) == item.size and item.src not in hashed:
            hashcache.LOCAL.remember(item.src, fd, data, before)
    finally:
        os.close(fd)
    if len(data) != item.size:
        raise CopyError("local file changed while copying", path=item.src)
    return data


#: tar's block and record sizes.
BLOCK = 512
RECORD = 20 * BLOCK


def ustar_split(name: bytes) -> Optional[Tuple[bytes, bytes]]:
    """(prefix, name) fields for a member *name* in a ustar header, or None if it does not fit."""
    if len(name) <= 100:
        return b"", name
    cut = name.rfind(b"/", 0, 156)  # the longest prefix leaves the shortest name
    if cut <= 0 or not 0 < len(name) - cut - 1 <= 100:
        return None
    return name[:cut], name[cut + 1:]


def ustar_header(name: bytes, size: int, mode: int, mtime: int) -> bytes:
    """The 512-byte ustar header of a regular file *name* (see :func:`ustar_split`), owned by 0:0."""
    split = ustar_split(name)
    if split is None or size >= 8 ** 11:
        raise ValueError("not a ustar member: %r (%d bytes)" % (name, size))
    prefix, short = split
    header = bytearray(BLOCK)
    header[0:len(short)] = short
    header[100:108] = b"%07o\0" % (mode & 0o7777)
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % mtime
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[156:157] = b"0"  # a regular file
    header[257:265] = b"ustar\x0000"
    header[345:345 + len(prefix)] = prefix
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


#: Bundles to more directories than this rename their files with one python3, not a mv each.
RENAMER_FROM = 4
#: Runs on the host under python3 (3.5 or later): moves every file of each stage
#: directory given into the stage's parent, as ``mv -f`` would (a file replaces a file;
#: a directory in the way is an error). The stages hold only the bundle's files.
RENAMER = r'''
import os, sys
try:
    for stage in sys.argv[1:]:
        parent = os.path.dirname(stage)
        for name in os.listdir(stage):
            os.rename(os.path.join(stage, name), os.path.join(parent, name))
except OSError as e:
    sys.stderr.write("%s: %s\n" % (getattr(e, "filename2", None) or e.filename, e.strerror))
    sys.exit(1)
'''


class SharedTars:
    """The tar of a bundle, built once for every host that gets the same files.

    A run copies the same sources to the same destinations on many hosts, and
    building a tar is this machine's CPU (~50 us a file in Python, the hashes
    included): four hosts built four of each. A bundle's tar is named after
    its files (sources and their stat, destinations, modes) and made by the first
    host to ask; the others wait for it. Its stage directories' name comes
    from the same key and this process's own random part, so it is the same
    on every host, differs between bundles, and differs from any other run's.
    At most :data:`SHARED_TAR_BYTES` of tars are kept (the oldest go first).
    """

    def __init__(self, budget: int = SHARED_TAR_BYTES) -> None:
        self.budget = budget
        self._secret = secrets.token_hex(8)
        self._lock = threading.Lock()
        self._built: "OrderedDict[str, bytes]" = OrderedDict()
        self._building: Dict[str, threading.Event] = {}
        #: Within one copy to many hosts (:meth:`one_copy`): token by the bundle's files.
        self._tokens: Optional[Dict[str, Union[str, threading.Event]]] = None
        self._copies = 0

    def token(self, items: Sequence[Upload]) -> str:
        """The stage directories' suffix of the bundle of *items* as they are now (8 hex digits).

        The sources' stat is part of it: a source changed since an earlier tar
        (same size, new bytes) makes another tar, never the old one. Within
        :meth:`one_copy` the first host's token (so its tar) serves every host
        given the same files: they all get the bytes read once, and the other
        hosts do not stat every source again (four hosts took 4,000 stats
        for a 1,000-file bundle on the way to their first byte: 20 ms of the
        copy phase's 360 here).
        """
        files = "\0".join(f"{u.src}\0{u.dest}\0{u.mode}\0{u.size}" for u in items)
        made: Optional[threading.Event] = None
        while True:
            with self._lock:
                known = self._tokens.get(files) if self._tokens is not None else None
                if isinstance(known, str):
                    return known
                if known is None:
                    if self._tokens is not None:  # this host makes it; the others wait for it
                        made = self._tokens[files] = threading.Event()
                    break
            known.wait()  # (the hosts start together: each used to stat every source)
        token = None
        try:
            key = "\0".join(f"{u.src}\0{_stat_of(u.src)}" for u in items)
            token = hashlib.sha1((self._secret + files + "\0" + key).encode("utf-8", "surrogateescape")
                                 ).hexdigest()[:8]
            return token
        finally:
            if made is not None:
                with self._lock:
                    if self._tokens is not None:
                        if token is None:  # failed: the next host makes it
                            self._tokens.pop(files, None)
                        else:
                            self._tokens[files] = token
                    made.set()

    @contextlib.contextmanager
    def one_copy(self) -> Iterator[None]:
        """Hand every host of one copy the same token (and tar) for the same files (see :meth:`token`)."""
        with self._lock:
            self._copies += 1
            if self._tokens is None:
                self._tokens = {}
        try:
            yield
        finally:
            with self._lock:
                self._copies -= 1
                if not self._copies:
                    self._tokens = None

    def get(self, token: str, build: Callable[[], bytes]) -> bytes:
        """The tar of bundle *token*, built by *build* unless another host's copy is kept."""
        while True:
            with self._lock:
                if token in self._built:
                    return self._built[token]
                waiting = self._building.get(token)
                if waiting is None:
                    self._building[token] = threading.Event()
                    break
            waiting.wait()
        try:
            data = build()
        except BaseException:
            with self._lock:
                self._building.pop(token).set()  # the next host builds it (and says why it cannot)
            raise
        with self._lock:
            if len(data) <= self.budget:
                self._built[token] = data
                while sum(len(d) for d in self._built.values()) > self.budget:
                    self._built.popitem(last=False)
            self._building.pop(token).set()
        return data


def _stat_of(path: str) -> str:
    try:
        return repr(hashcache.stat_key(os.stat(path)))
    except OSError:
        return "-"  # unreadable: the tar's build says so


#: The tars of this process's runs.
SHARED = SharedTars()


def _staging(items: Sequence[Upload]) -> Tuple[List[Upload], str, Dict[str, List[Upload]], Dict[str, str]]:
    """*items* grouped by directory (the order of their bytes), the bundle's token, the
    groups, and the stage directory of each destination directory (named after the token)."""
    groups: Dict[str, List[Upload]] = {}
    for item in items:
        groups.setdefault(posixpath.dirname(item.dest), []).append(item)
    ordered = [item for group in groups.values() for item in group]
    token = SHARED.token(ordered)
    return ordered, token, groups, {d: posixpath.join(d, f".rr-stage-{token}") for d in groups}


def _staged_path(stages: Dict[str, str], item: Upload) -> str:
    return posixpath.join(stages[posixpath.dirname(item.dest)], posixpath.basename(item.dest))


def write_bundle(shell: "Shell", host: str, items: Sequence[Upload],
                 request: Callable[[Dict[str, Any]], bytes], hashed: Container[str] = ()) -> Optional[str]:
    """Copy *items* with the manifest's program, which writes and places them in one exec.

    The host's python3 reads the request (*request*, given what is to be
    written: ``{"files": [[stage path, destination, size, mode], ...],
    "stages": [...]}``) and then the files' bytes, back to back: no tar
    headers, no per-file shell text, no second read of what it wrote to hash
    it (see :data:`remote_runner.manifest.HOST_PROGRAM`); then it records
    them in the host's manifest, or answers their receipts, as the request
    says. Returns what the program printed (its answer), or None when the
    host turned out to have no python3 (nothing was written: the caller
    unpacks a tar instead). *hashed*: the sources the local hash cache knew
    (see :func:`_read_source`).
    """
    ordered, token, _groups, stages = _staging(items)
    payload = request({"files": [[_staged_path(stages, u), u.dest, u.size, u.mode] for u in ordered],
                       "stages": list(stages.values())})
    data = SHARED.get(token + "-raw", lambda: b"".join(_read_source(u, hashed) for u in ordered))
    result = shell.feed(manifest.run_script(len(payload)), payload + data, timeout=600)
    if result.exit_status == 0 and manifest.NO_PYTHON_MARK in result.stdout.splitlines():
        return None
    _check(result, host, items, next(iter(stages)))
    return result.stdout


def upload_bundle(shell: "Shell", host: str, items: Sequence[Upload]) -> str:
    """Unpack *items* with tar into a stage dir beside each destination directory, then rename them.

    The way for a host whose python3 cannot run the manifest's program (or
    a copy that asked the host nothing first): tar, ``stat``, ``chmod`` and
    ``mv``; the caller records the files afterwards. Returns the exec's output.
    """
    q = shlex.quote
    ordered, token, groups, stages = _staging(items)
    top = posixpath.commonpath(list(groups)) if len(groups) > 1 else next(iter(groups))
    # members named after their stage, relative to *top*: one tar unpacks them all
    staged = [_staged_path(stages, u) for u in ordered]  # each file in its stage
    members = [posixpath.relpath(path, top) for path in staged]
    every_stage = " ".join(q(stage) for stage in stages.values())
    paths = [q(path) for path in staged]
    sizes = "\n".join(str(u.size) for u in ordered)
    # Each stage is made here first (one mkdir for all), not by tar: a name
    # already there (a symlink, say) fails the bundle instead of being written through.
    script = ("fail() { cd / && rm -rf " + every_stage + "; exit 1; }\n" +
              f"mkdir {every_stage} || fail\n" +
              # tar's status covers write errors (a full disk) and a cut stream; the
              # sizes are checked as well before anything is renamed into place.
              f"tar -xf - -C {q(top)} || fail\n")
    script += (f"if got=$(stat -c %s -- {' '.join(paths)} 2>/dev/null) && [ \"$got\" != {q(sizes)} ]; then\n"
               f"  echo {SHORT_MARK} >&2; fail\nfi\n")
    for mode in sorted({u.mode for u in ordered}):
        same = " ".join(path for path, u in zip(paths, ordered) if u.mode == mode)
        script += f"chmod {mode:o} {same} || fail\n"
    moves = ""
    for directory, group in groups.items():
        # "./name" keeps names that start with '-' from looking like options.
        names = " ".join(q("./" + posixpath.basename(u.dest)) for u in group)
        moves += f"cd {q(stages[directory])} && mv -f {names} {q(directory)}/ || fail\n"
    if len(groups) > RENAMER_FROM:
        # one python3 for every directory's renames, where there is one (else the mv's)
        moves = (f"if command -v python3 >/dev/null 2>&1; then\n"
                 f"  cd / && python3 {PYTHON_FLAGS} -c {q(RENAMER)} {every_stage} || fail\n"
                 f"else\n{moves}fi\n")
    script += moves + "cd / && rmdir " + every_stage + "\n"
    result = shell.feed(script, SHARED.get(token, lambda: bundle_tar(ordered, members)), timeout=600)
    _check(result, host, items, next(iter(groups)))
    return result.stdout


def _check(result: "ScriptResult", host: str, items: Sequence[Upload], directory: str) -> None:
    """Raise the :class:`CopyError` of a bundle whose exec failed (*directory*: its first)."""
    if result.exit_status != 0:
        raise CopyError(f"bundled upload of {len(items)} file(s) failed: "
                        f"{_bundle_failure(result.stderr, result.exit_status)}; "
                        "no file is left half-written (each is the old one or the new one)",
                        host=host, path=directory)


def _bundle_failure(stderr: str, status: int) -> str:
    """The cause of a failed bundle in a few words (tar repeats it for every file)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for cause in ("No space left on device", "Disk quota exceeded", "Read-only file system",
                  "Permission denied"):
        if any(cause in line for line in lines):
            return cause
    if SHORT_MARK in lines:
        return "the host kept fewer bytes than were sent"
    if CUT_MARK in lines:
        return "the host received fewer bytes than were sent (the link dropped?)"
    return lines[0] if lines else f"exit status {status}"


#: Builds the manifest's writing request for a chunk of files, given what is to be written.
WriteRequest = Callable[[Sequence[Upload], Dict[str, Any]], bytes]


def upload_bundles(shell: "Shell", host: str, chunks: Sequence[List[Upload]],
                   progress: Optional[Progress] = None, workers: int = LANES,
                   request: Optional[WriteRequest] = None,
                   hashed: Container[str] = ()) -> List[Tuple[List[Upload], Optional[str]]]:
    """Upload small files as bundles (*chunks*, as :func:`bundles` cuts them), up to *workers* at once.

    With *request* (the host runs the manifest's program), each chunk is
    written by that program (:func:`write_bundle`), which records it or
    answers its receipts as *request* says; else, or where the host turns
    out to have no python3, unpacked by tar (:func:`upload_bundle`). Returns
    each chunk with the program's output (its answer), None for a chunk that
    went as a tar (neither recorded nor with receipts). *hashed*: the sources
    the local hash cache knew (see :func:`_read_source`).
    """
    def one(chunk: List[Upload]) -> Tuple[List[Upload], Optional[str]]:
        if progress is not None:
            progress(host, 0)  # lets a cancelled copy stop before the next bundle
        out = None
        if request is not None:
            out = write_bundle(shell, host, chunk, lambda what: request(chunk, what), hashed)
        if out is None:
            upload_bundle(shell, host, chunk)
        if progress is not None:
            progress(host, sum(u.size for u in chunk))
        return chunk, out

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(for_host(host, one), chunk) for chunk in chunks]
    for future in futures:
        error = future.exception()
        if error is not None:
            if isinstance(error, RunnerError):
                raise error
            LOG.debug("%s: bundled upload failed", host, exc_info=error)
            raise CopyError(f"bundled upload failed: {describe(error)}", host=host) from error
    return [future.result() for future in futures]
