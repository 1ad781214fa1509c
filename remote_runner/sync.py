"""Copy the files components need to their hosts, skipping what is already there.

Per host the work is: a plan (unique destination -> source, directories
expanded, relative destinations joined to the component's base_dir), then
**one** exec that tells which files differ. With python3 on the host that is
the manifest check (:mod:`remote_runner.manifest`): the host answers each
file's size, mode and SHA-1, hashing only files whose stat no longer matches
what it remembered, and in the same exec creates the directories, sweeps
temporary files that killed copies left behind and reports free space (a copy
that cannot fit is refused before anything is written). Local SHA-1s come
from :mod:`remote_runner.hashcache`, so a run where nothing changed reads no
file on either side. After copying, one more exec has the host hash and
remember what arrived.

Without python3 the old path is taken: one ``stat -c`` command for the size
and mode of every destination (one SFTP ``listdir`` per directory where
``stat -c`` is missing), one remote hash command for every file whose size
and mode already match (``openssl dgst -sha1 -r``, or ``sha1sum`` with a
warning where openssl is missing), and one command for directories, free
space and the sweep. A run with nothing to copy opens no SFTP channel. How
the bytes get there without ever leaving half a file is
:mod:`remote_runner.upload`. Hosts are synced in parallel, bounded by ``--forks``.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from remote_runner import hashcache, manifest, stream
from remote_runner.errors import ConnectionLost, CopyError, RunnerError, describe
from remote_runner.events import for_host, host_context
from remote_runner.hostdigest import (  # noqa: F401 - re-exported: sync is where callers look
    HAS_TAR_MARK, HASH_CHUNK, HASH_TOOL_MARK, STAT_OK_MARK, _sweep_script, changed_files,
    check_free_space, make_dirs, remote_attrs, remote_sha1, remote_stat,
)
from remote_runner.bundle import (  # noqa: F401 - re-exported: sync is where callers look
    BUNDLE_BYTES, BUNDLE_FILES, BUNDLE_SCRIPT, SHARED, SharedTars, bundle_tar, bundles, upload_bundle,
    WriteRequest, upload_bundles, write_bundle,
)
from remote_runner.upload import (  # noqa: F401 - re-exported: sync is where callers look
    LANES, SMALL_FILE, STALE_MINUTES, STREAM_LANES, Cancelled, LaneOpener, Progress, ShortWrite,
    Upload, explain, free_bytes, free_space, free_space_script, in_flight, upload_all,
    upload_file, wait_or_cancel,
)

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import FileSpec
    from remote_runner.shell import Shell

LOG = logging.getLogger(__name__)

#: Bundles sent at once while the same host's large files stream: with the
#: streams' and compressed lanes and the session lock's channel, within
#: OpenSSH's default ``MaxSessions 10``.
BUNDLE_WORKERS_BESIDE = 2
#: Called with (host, files, bytes) once a host knows what it really has to upload.
Planned = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Plan:
    """Everything one host needs: directories (path, mode or None) and files.

    *trees* names, for each destination, the tree (base directory) whose
    manifest on the host remembers it (see :mod:`remote_runner.manifest`).
    """

    host: str
    dirs: Tuple[Tuple[str, Optional[int]], ...]
    files: Tuple[Upload, ...]
    trees: Tuple[Tuple[str, str], ...] = ()

    def tree_index(self, items: Sequence[Upload]) -> Tuple[List[str], List[int]]:
        """(trees, index of each item's tree): an item the plan has no tree for is its directory's."""
        named = dict(self.trees)
        trees: Dict[str, int] = {}
        index = [trees.setdefault(named.get(u.dest) or posixpath.dirname(u.dest), len(trees))
                 for u in items]
        return list(trees), index

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
    #: how the host told which files differ: manifest (python3), openssl, sha1sum, python3, none
    hash_tool: str = "openssl"
    #: files the host hashed for the check (the rest it vouched for from its manifest)
    hashed: int = 0
    #: files the host's manifest vouched for without reading them
    trusted: int = 0
    #: files the host staged from the check's request (sent ahead): the start puts them in place
    placed: List[str] = field(default_factory=list)
    #: the host's shell vouched for every file by its stat alone (no python3 started)
    quick: bool = False
    #: the host's shell found none of the files there (no python3 started)
    absent: bool = False

    def summary(self) -> str:
        """Return the one-line report the CLI logs."""
        return (f"{self.host}: copied {len(self.copied)} file{'s' if len(self.copied) != 1 else ''}"
                f" ({self.bytes} bytes), {len(self.skipped)} unchanged")


class PlanMemo:
    """Plans already built in this run, by what they were built from.

    A run plans each host's files before it connects (to refuse unreadable or
    conflicting sources before any host is touched) and again once connected;
    hosts given the same files get the same plan. Each build stats every file
    (4,000 stats for 1,000 files to 4 hosts), so a plan is built once per
    distinct list of (source, destination, base directory) and handed to every
    host with its own name. The local files are read again when they are copied.
    """

    def __init__(self) -> None:
        self._plans: Dict[Tuple[Tuple[str, str, bool, str], ...], Plan] = {}

    def plan(self, host: str, entries: Iterable[Tuple["FileSpec", str]]) -> Plan:
        """Return :func:`make_plan` (*host*, *entries*), built once per distinct *entries*."""
        entries = list(entries)
        key = tuple((spec.src, spec.dest, spec.is_dir, base) for spec, base in entries)
        known = self._plans.get(key)
        if known is None:
            known = self._plans[key] = make_plan(host, entries)
        return known if known.host == host else replace(known, host=host)


def make_plan(host: str, entries: Iterable[Tuple["FileSpec", str]]) -> Plan:
    """Build the plan for *host* from (FileSpec, base_dir) pairs; duplicates are merged."""
    files: Dict[str, Upload] = {}
    dirs: Dict[str, Optional[int]] = {}
    trees: Dict[str, str] = {}
    bases: Dict[str, str] = {}  # (a component's files share their base directory)
    for spec, base_dir in entries:
        base = bases.get(base_dir)
        if base is None:
            base = bases[base_dir] = posixpath.normpath(base_dir)
        dest = posixpath.normpath(posixpath.join(base_dir, spec.dest))
        tree = (base, trees)
        if spec.is_dir:
            _add_tree(host, spec.src, dest, files, dirs, tree)
        else:
            _add_file(host, spec.src, dest, files, tree)
    for upload in files.values():
        dirs.setdefault(posixpath.dirname(upload.dest), None)
    ordered = tuple(sorted(files.values(), key=lambda u: u.dest))
    return Plan(host, tuple(sorted(dirs.items())), ordered, tuple(sorted(trees.items())))


def _add_file(host: str, src: str, dest: str, files: Dict[str, Upload],
              tree: Optional[Tuple[str, Dict[str, str]]] = None) -> None:
    """Add one file to *files*, refusing two different sources for one destination.

    *tree* is (base directory, dest -> tree): the file's tree is the base
    directory when it lies inside it, else its own directory.
    """
    if tree is not None and dest not in tree[1]:
        base = tree[0]
        inside = dest.startswith(base.rstrip("/") + "/")
        tree[1][dest] = base if inside else posixpath.dirname(dest)
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
        clash = CopyError(f"two different sources go to {dest}: {old.src} and {src}", host=host,
                          path=dest)
        clash.sources = (old.src, src)  # type: ignore[attr-defined]
        raise clash
    files[dest] = Upload(src, dest, stat.S_IMODE(st.st_mode), st.st_size, hashcache.stat_key(st))


def _add_tree(host: str, src: str, dest: str, files: Dict[str, Upload],
              dirs: Dict[str, Optional[int]],
              tree: Optional[Tuple[str, Dict[str, str]]] = None) -> None:
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
            _add_file(host, os.path.join(root, name), posixpath.join(target, name), files, tree)


def local_sha1(path: str, rehash: bool = False, sums: Optional[Dict[str, str]] = None) -> str:
    """Return the hex SHA1 of a local file (remembered across runs while its stat holds).

    *sums* (source -> SHA-1) is one sync's memo: every host of a run compares
    against the same local hash, and the file is looked at once, not once per host.
    """
    if sums is None:
        return hashcache.LOCAL.sha1(path, rehash)
    known = sums.get(path)
    if known is None:
        known = sums[path] = hashcache.LOCAL.sha1(path, rehash)
    return known


def sync_host(shell: "Shell", sftp: Any, plan: Plan, always_copy: bool = False,
              progress: Optional[Progress] = None,
              open_lane: Optional[LaneOpener] = None, small_file: int = SMALL_FILE,
              on_plan: Optional[Planned] = None, rehash: bool = False,
              answer: Optional[manifest.Answer] = None,
              sums: Optional[Dict[str, str]] = None,
              staged: Optional[Dict[int, str]] = None) -> HostSync:
    """Bring one host up to date with *plan* and report what was done.

    *sftp* is an SFTP client or a function returning one: it is only asked for
    when a file must go over SFTP (a warm run needs no SFTP at all). With
    python3 on the host, the change check is one exec against the host's
    manifest (:func:`manifest_check`) and what is copied is recorded there
    afterwards (:func:`record`); else ``stat`` and ``openssl``
    (:func:`changed_files`). *rehash* trusts no remembered hash on either side.
    *answer* is the manifest's answer when it was asked already (for exactly
    *plan*'s files, see :mod:`remote_runner.precheck`). *sums* is the local
    hashes this sync already took (see :func:`local_sha1`). *staged* (index
    in the plan -> SHA-1) is what the host staged from *answer*'s request: a
    file still equal to it here is not sent again (:attr:`HostSync.placed`).
    """
    report = HostSync(plan.host)
    if not plan.files and not plan.dirs:
        return report
    get_sftp = sftp if callable(sftp) else (lambda: sftp)
    checked = None
    if plan.files and not always_copy and hasattr(shell, "feed"):
        checked = manifest_check(shell, plan, report, rehash, answer, sums)
    placed: List[Upload] = []  # staged by the host from the check's request (sent ahead)
    if checked is not None:
        todo, same, has_tar = checked
        if answer is not None and staged:
            todo, placed = _unless_staged(plan, todo, staged, rehash, sums)
            report.placed = [u.dest for u in placed]
    else:
        if always_copy:
            todo, same = list(plan.files), []
        else:
            todo, same, report.hash_tool = changed_files(shell, get_sftp, plan, rehash)
    report.skipped = [u.dest for u in same]
    if on_plan is not None:
        on_plan(plan.host, len(todo), sum(u.size for u in todo))
    if checked is None:
        has_tar = make_dirs(shell, plan, todo)
    small = [u for u in todo if u.size <= small_file] if has_tar and hasattr(shell, "feed") else []
    bundled = set(small)
    rest = [u for u in todo if u not in bundled]
    # With the manifest's program on the host, it writes each bundle; a bundle that is the
    # whole copy is recorded by it too, else it answers receipts for the one record below.
    chunks = bundles(small) if small else []
    alone = not rest and len(chunks) == 1
    # A copy leaves the host as the check expected (when it said what it expected): whatever
    # records it then answers that check too, so that the next run's is answered by the shell.
    # That is the writer of a copy that is one bundle and nothing else, else the one record.
    expected = answer.asked if answer is not None and not placed and not rehash else None
    asked = expected if alone else None
    writer = _write_request(plan, record=alone, asked=asked) if checked is not None else None
    receipts: Dict[str, Any] = {}
    written: List[Tuple[List[Upload], Optional[str]]] = []
    side: Optional[ThreadPoolExecutor] = None
    bundling = None
    if small and rest:
        # The bundles' round trips overlap the large files' bytes, on fewer
        # channels so that both stay within the host's MaxSessions.
        side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundles")
        bundling = side.submit(for_host(plan.host, upload_bundles), shell, plan.host, chunks,
                               progress, BUNDLE_WORKERS_BESIDE, writer, sums or {})
    elif small:
        written = upload_bundles(shell, plan.host, chunks, progress, request=writer, hashed=sums or {})
    try:
        if rest:
            link = _stream_link(shell) if checked is not None else None
            try:
                receipts = upload_all(get_sftp, plan.host, rest, progress, open_lane, link=link)
            except ShortWrite as exc:
                raise explain(shell, plan.host, exc) from exc
    finally:
        if side is not None:
            side.shutdown(wait=True)
    if bundling is not None:
        written = bundling.result()
    report.copied = [u.dest for u in todo + placed]
    report.bytes = sum(u.size for u in todo + placed)
    recorded = _writers_answers(plan, written, alone, receipts, sums, whole=asked is not None)
    unrecorded = [u for u in todo if u.dest not in recorded]
    if unrecorded and (checked is not None or (always_copy and hasattr(shell, "feed"))):
        record(shell, plan, unrecorded, receipts, sums, asked=expected if checked is not None else None)
    return report


def _writers_answers(plan: Plan, written: Sequence[Tuple[List[Upload], Optional[str]]], recording: bool,
                     receipts: Dict[str, Any], sums: Optional[Dict[str, str]] = None,
                     whole: bool = False) -> Set[str]:
    """Read what the bundles' writers answered: the files they recorded (*recording*), or else
    their receipts, added to *receipts* for the copy's one record. A chunk unpacked by tar, or
    whose answer is unusable, is in neither: the record hashes it. *whole*: the writer
    answered about every file of *plan* (see :func:`_write_request`)."""
    recorded: Set[str] = set()
    for chunk, out in written:
        if out is None:
            continue
        lines = out.splitlines()
        if recording:
            about = plan.files if whole else chunk
            if _recorded(plan, about, manifest.parse_answer(lines, len(about)), sums,
                         copied=len(chunk)) is not None:
                recorded.update(u.dest for u in chunk)
            continue
        answer = manifest.parse_answer(lines, 0)
        if answer is not None and len(answer.receipts) == len(chunk):
            receipts.update((u.dest, stream.Receipt(r[5], r[:5])) for u, r in zip(chunk, answer.receipts)
                            if r is not None)
    return recorded


def _write_request(plan: Plan, record: bool = True,
                   asked: Optional[Tuple[str, str]] = None) -> WriteRequest:
    """The writing request of a bundle of *plan*'s files: write and place them, then record
    them (*record*) or answer their receipts.

    With *asked* (:attr:`manifest.Answer.asked`: the bundle is the whole copy),
    the writer records them and then answers the check about every file of
    *plan*, which, as it expects, leaves the files' stat for the shell to
    answer that check next time: no python3 in the first run after a copy.
    """
    def request(items: Sequence[Upload], what: Dict[str, Any]) -> bytes:
        if asked is not None:
            trees, index = plan.tree_index(plan.files)
            return manifest.request(plan.files, trees, index, write=dict(what, record=True),
                                    quick_id=asked[0], expect=asked[1])
        trees, index = plan.tree_index(items)
        return manifest.request(items, trees, index, hash_all=True, write=dict(what, record=record))
    return request


def _unless_staged(plan: Plan, todo: List[Upload], staged: Dict[int, str], rehash: bool,
                   sums: Optional[Dict[str, str]]) -> Tuple[List[Upload], List[Upload]]:
    """(*todo* left to copy, the files of it the host staged that are still what this machine has)."""
    ready = {plan.files[i].dest: sha1 for i, sha1 in staged.items() if i < len(plan.files)}
    left: List[Upload] = []
    placed: List[Upload] = []
    for item in todo:
        if ready.get(item.dest) == local_sha1(item.src, rehash, sums):
            placed.append(item)
        else:
            left.append(item)
    return left, placed


def _stream_link(shell: "Shell") -> Optional[Tuple[Any, Any]]:
    """(transport, traffic counters) of a remote shell's connection, for streamed uploads.

    Only asked once the host answered the manifest check, i.e. it runs
    python3, which the stream's receiver needs; None for anything else.
    """
    connection = getattr(shell, "connection", None)
    if connection is None or not hasattr(connection, "transport"):
        return None
    try:
        return connection.transport, getattr(connection, "traffic", None)
    except RunnerError:
        return None


def manifest_check(shell: "Shell", plan: Plan, report: HostSync, rehash: bool = False,
                   answer: Optional[manifest.Answer] = None,
                   sums: Optional[Dict[str, str]] = None
                   ) -> Optional[Tuple[List[Upload], List[Upload], bool]]:
    """Ask the host, in one exec, which files differ: (to upload, unchanged, host has tar).

    The same exec creates the plan's directories, sweeps stale temporary files
    and reports free space (a copy that cannot fit is refused here). None when
    the host cannot answer (no python3, or an answer that does not parse): the
    caller then uses :func:`changed_files` and :func:`make_dirs`.
    """
    items = list(plan.files)
    if answer is None:
        trees, index = plan.tree_index(items)
        payload = manifest.request(items, trees, index, dirs=plan.dirs, rehash=rehash,
                                   prepare=True)
        answer = manifest.exchange(shell, payload, len(items))
    if answer is None:
        LOG.info("%s: no python3 there (or it failed): files are compared with stat and "
                 "openssl instead of the host's manifest", plan.host)
        return None
    if answer.error is not None:
        raise CopyError(answer.error, host=plan.host)
    report.hash_tool, report.hashed, report.trusted = "manifest", answer.hashed, answer.trusted
    report.quick, report.absent = answer.quick, answer.absent
    if answer.absent:
        LOG.debug("%s: the host's shell found none of the %d file(s) there", plan.host, len(items))
    elif answer.quick and answer.named:
        LOG.debug("%s: the host's shell found the %d file(s) not sent ahead as an earlier answer "
                  "had them (by their stat alone) and wrote %d sent ahead", plan.host,
                  answer.trusted, len(answer.staged))
    elif answer.quick:
        LOG.debug("%s: the host's shell found all %d file(s) as expected, by their stat alone",
                  plan.host, answer.trusted)
    else:
        LOG.debug("%s: the host's manifest vouched for %d file(s), %d were hashed there",
                  plan.host, answer.trusted, answer.hashed)
    if not answer.saved:
        LOG.warning("%s: the manifest of what this host has could not be updated (locked by "
                    "another run or not writable); the next run hashes these files again",
                    plan.host)
    todo: List[Upload] = []
    same: List[Upload] = []
    for item, remote in zip(items, answer.files):
        if (remote is None or remote.size != item.size or remote.mode != item.mode
                or remote.sha1 is None or remote.sha1 != local_sha1(item.src, rehash, sums)):
            todo.append(item)
        else:
            same.append(item)
    check_free_space(plan.host, todo, answer.free)
    return todo, same, answer.has_tar


def record(shell: "Shell", plan: Plan, copied: Sequence[Upload],
           receipts: Optional[Dict[str, Any]] = None,
           sums: Optional[Dict[str, str]] = None,
           asked: Optional[Tuple[str, str]] = None) -> Optional[manifest.Answer]:
    """Have the host remember what was just copied in its manifest (one exec).

    The host hashes the files as they are now, so the manifest describes the
    bytes really there even when another run wrote one of them meanwhile; a
    file that differs from what was sent is named (it was changed during the
    copy). A file streamed to a receiver that hashed it while writing
    (*receipts*, dest -> :class:`~remote_runner.stream.Receipt`) is not read
    again: the host takes that hash while the file's stat is still the one
    the receiver saw after its rename, and hashes the file otherwise.

    With *asked* (:attr:`manifest.Answer.asked`: the check said what it
    expected), the record is that check asked again, about every file of
    *plan*, once they are copied: the answer is then the one expected, so the
    host's program keeps the files' stat and the next run's check is answered
    by the host's shell (no python3), as after a copy that was one bundle.
    """
    items = list(plan.files) if asked is not None else list(copied)
    trees, index = plan.tree_index(items)
    payload = (manifest.request(items, trees, index, receipts=receipts, quick_id=asked[0],
                                expect=asked[1]) if asked is not None else
               manifest.request(items, trees, index, hash_all=True, receipts=receipts))
    try:
        answer = manifest.exchange(shell, payload, len(items))
    except ConnectionLost:
        raise
    except RunnerError as exc:  # the files are in place: only the next run's check pays
        LOG.warning("%s: could not record the copied files in the host's manifest (%s); the "
                    "next run hashes them again", plan.host, exc)
        return None
    return _recorded(plan, items, answer, sums, copied=len(copied))


def _recorded(plan: Plan, items: Sequence[Upload], answer: Optional[manifest.Answer],
              sums: Optional[Dict[str, str]] = None, copied: Optional[int] = None
              ) -> Optional[manifest.Answer]:
    """Report what the host said to a record of *items*, *copied* of them just copied (all
    by default); None when there is no usable answer.

    A file the host hashed afterwards (not as it arrived) whose hash is not
    the local one (from *sums*, this sync's memo, else the hash cache) was
    changed there during the copy.
    """
    if answer is None or answer.error is not None:
        return None
    LOG.debug("%s: recorded %d copied file(s): %d hashed by their receiver as they arrived, "
              "%d hashed now", plan.host, len(items) if copied is None else copied,
              answer.received, answer.hashed)
    if not answer.saved:
        LOG.warning("%s: the manifest of what this host has could not be updated (locked by "
                    "another run or not writable); the next run hashes these files again",
                    plan.host)
    if not answer.hashed:  # every hash is of the bytes as they arrived: those sent
        return answer
    for item, remote in zip(items, answer.files):
        if remote is None or not remote.sha1:
            continue
        known = (sums or {}).get(item.src) or hashcache.LOCAL.known(item.src)
        if known and remote.sha1 != known:
            LOG.warning("%s: %s changed on the host while it was being copied (another run "
                        "copying to it?); the next run compares it again", plan.host, item.dest)
    return answer


def sync_all(jobs: Sequence[Tuple["Shell", Callable[[], Any], Plan]], forks: int = 10,
             always_copy: bool = False, progress: Optional[Progress] = None,
             lane_openers: Optional[Dict[str, LaneOpener]] = None,
             cancel: Optional[threading.Event] = None,
             on_plan: Optional[Planned] = None, rehash: bool = False,
             answers: Optional[Dict[str, manifest.Answer]] = None,
             staged: Optional[Dict[str, Dict[int, str]]] = None,
             sums: Optional[Dict[str, str]] = None,
             save_hashes: bool = True) -> Dict[str, HostSync]:
    """Sync every (shell, sftp factory, plan) job in parallel; raise one error for all failures.

    *answers* holds, per host, the manifest's answer to its plan when it was asked already,
    and *staged* what the host staged from it (see :func:`sync_host`). *sums* are local
    SHA-1s the run took already (see :func:`local_sha1`). *save_hashes* False leaves the
    saving of the local hash cache to the caller.

    Ctrl-C (or *cancel* set by the caller) stops every upload at its next
    chunk: each removes its temporary file and the interrupt goes on at once,
    without waiting for the copies to finish.
    """
    reports: Dict[str, HostSync] = {}
    errors: List[RunnerError] = []
    openers = lane_openers or {}
    stop = cancel if cancel is not None else threading.Event()
    sums = dict(sums or {})  # local SHA-1s, taken once for every host

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
                             openers.get(plan.host), on_plan=on_plan, rehash=rehash,
                             answer=(answers or {}).get(plan.host), sums=sums,
                             staged=(staged or {}).get(plan.host))

    pool = ThreadPoolExecutor(max_workers=max(1, forks), thread_name_prefix="sync")
    try:
        with SHARED.one_copy():  # hosts given the same files get one token and one tar
            futures = [(job[2].host, pool.submit(one, job)) for job in jobs]
            wait_or_cancel(pool, [f for _, f in futures], stop)
    finally:
        if save_hashes:
            hashcache.LOCAL.save()
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
