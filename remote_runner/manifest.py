"""What each host already has, remembered on the host: one exec tells which files differ.

SPAR's contract is "copy a file when its size or SHA-1 differs, the hash computed on
the host". Keeping it by hashing every destination file on every run costs a full
read of the tree on every host each time (a second on a 200 MiB tree). A *manifest*
on the host remembers, per destination file, the SHA-1 computed there together with
the file's full stat (size, mtime_ns, ctime_ns, inode, device). A run sends the list
of (path, size, mode) it wants and gets back, in **one** exec, each file's size, mode
and SHA-1, where the SHA-1 comes from the manifest only when the file's stat still
equals the entry's, and is computed again otherwise. ``touch -d`` can restore an
mtime but not a ctime, so any change by anyone behind the manifest's back is seen.

Where the manifest lives, and why there: ``$XDG_CACHE_HOME/remote-runner/manifests/``
(``~/.cache/...``) of the user the run logs in as, one JSON file per destination tree
(a component's base directory), named by the SHA-1 of the host's node name and the
tree's absolute path. Not in the tree itself: a file there would be copied,
listed, archived and fetched as if it were the experiment's data, and a tree the
user cannot write to would have none. The node name keeps hosts that share a home
directory over NFS from overwriting each other's entries.

Why it can be trusted, and where it is not:

* An entry is only used when the file's whole stat equals it, so a stale or
  interrupted manifest can never vouch for a file that changed or is partly
  written (files are only ever renamed into place whole, see :mod:`upload`; a
  rename gives the file a new ctime). A hash is only recorded when the file's
  stat was the same before and after reading it.
* After a copy the host hashes what was copied (from its page cache) and only
  then records it: an entry always describes the bytes really there, even when
  two runs copy different contents to one path at once. A file that arrived
  as a stream (:mod:`remote_runner.stream`), or in a bundle this program
  wrote itself (*write*, :func:`remote_runner.bundle.write_bundle`), was
  hashed on the host while it was written; that hash is recorded instead,
  only while the file is still exactly as written (else it is hashed again).
* Writes merge under ``flock`` on a lock file beside the manifest, into a
  temporary file renamed over the old one, keeping other runs' entries and
  dropping entries whose file is gone or changed. A lock held too long (30 s)
  means the update is skipped, never a hang.
* The host is not trusted: its manifest is parsed defensively on the host (bad
  JSON or odd entries count as absent), and its answer here (:func:`parse_answer`)
  must have exactly one well-formed item per file asked, else the run falls
  back to the shell commands of :mod:`sync` as if the host had no python3.

**Asked again, answered by the shell.** Most reruns ask exactly the question of
the run before and get exactly the answer it expects ("every file as here"),
yet starting python3 for it was half of the host's work in a warm run. A
request that knows every local SHA-1 says what it expects; the program, when
its answer is that, keeps each file's stat as GNU ``stat`` renders it, and the
next identical question is answered by the shell from one ``stat`` of the files
compared byte for byte with that: the same rule as the manifest's (the whole
stat, ctime included), checked by other tools. An edited file or few sent ahead
are written by the shell too, when every other file is as such an answer kept
them (:mod:`remote_runner.quickanswer`).

Hosts without python3 (a Debian minbase, say) get the old path: ``stat`` and
``openssl dgst`` on every file (:func:`remote_runner.hostdigest.changed_files`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from remote_runner import quickanswer
from remote_runner.digests import is_sha1
from remote_runner.shell import PYTHON_FLAGS
from remote_runner.upload import STAGED_MARK, STAGED_STALE_MINUTES, STALE_MINUTES

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.shell import Shell
    from remote_runner.upload import Upload

LOG = logging.getLogger(__name__)

ANSWER_MARK = "RR-MANIFEST"
NO_PYTHON_MARK = "RR-NO-PYTHON"
#: Seconds a run waits for another run's manifest lock before skipping its update.
LOCK_WAIT = 30

#: Runs on the host under python3 (3.5 or later: no f-strings), reading one JSON
#: request on stdin (all of it, or exactly the byte count given as its argument,
#: when stdin stays open afterwards) and printing one ``RR-MANIFEST {json}`` line.
HOST_PROGRAM = r'''
import errno, fcntl, os, stat, sys, time
try:
    from _sha1 import sha1 as name_hash  # built in: no OpenSSL to load for a file name
except ImportError:
    from hashlib import sha1 as name_hash
try:
    # CPython's JSON scanner and encoder without the json package, which pulls in
    # re and enum: ~8 ms of every host's CPU per run, for nothing used here.
    import _json
    def refuse(value):
        raise ValueError("not JSON: %r" % (value,))
    class JSONContext(object):
        strict, object_hook, object_pairs_hook = True, None, None
        parse_float, parse_int, parse_constant, memo = float, int, staticmethod(refuse), {}
    scan = _json.make_scanner(JSONContext())
    encoder = _json.make_encoder(None, refuse, _json.encode_basestring_ascii, None, ": ", ", ",
                                 False, False, True)
    def loads(text):
        try:
            value, end = scan(text, len(text) - len(text.lstrip(" \t\n\r")))
        except StopIteration:
            raise ValueError("no JSON value")
        if text[end:].strip(" \t\n\r"):
            raise ValueError("extra data after the JSON value")
        return value
    def dumps(value):
        return "".join(encoder(value, 0))
except Exception:
    from json import loads, dumps
HEXDIGITS = frozenset("0123456789abcdef")
def is_hex(s):
    return isinstance(s, str) and len(s) == 40 and HEXDIGITS.issuperset(s)
def is_temp(n):
    """.NAME.rr-XXXXXXXX.tmp, a staged file (see stage below)."""
    return len(n) >= 17 and n[0] == "." and n.endswith(".tmp") and n[-16:-12] == ".rr-" and "\n" not in n
def is_stage(n):
    """.rr-stage-XXXXXXXX, a bundle's stage directory."""
    return len(n) == 18 and n.startswith(".rr-stage-") and "\n" not in n
size = int(sys.argv[1]) if len(sys.argv) > 1 else -1
raw = sys.stdin.buffer.read(size)
req = loads(raw.decode("utf-8", "surrogateescape"))
ahead = req.get("ahead") or []
blob = sys.stdin.buffer.read(req.get("ahead_bytes", 0)) if ahead else b""
def key(st):
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
write = req.get("write")
wrote = {}  # destination -> [size, mtime_ns, inode, device, SHA-1, ctime_ns once in place]
def as_written(dest, st):
    """Whether dest (its lstat st) is still the file written above, as its rename left it.

    The ctime is the one the file had just after its rename: a write since then,
    even one that puts size and mtime back, changes it.
    """
    w = wrote.get(dest)
    return (w is not None and len(w) == 6 and w[5] == st.st_ctime_ns
            and w[:4] == [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev])
if write:
    # A bundle: its files' bytes follow on stdin, in the order of write["files"]. Each
    # is written into a stage directory made here beside its destination and hashed as
    # it arrives; only once all are whole are they renamed into place. Exit 3 if any
    # step fails, the stages removed: every destination keeps its old file or the new one.
    import hashlib, shutil
    made = []
    def failed(message):
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        os._exit(3)
    try:
        for d in write["stages"]:
            os.mkdir(d, 0o700)
            made.append(d)
        # Each file is created with its mode (umask off; writable by its owner, as some
        # network file systems want of a file opened for writing) and chmodded only when
        # that is not what it got: a default ACL, set-id bits (which a write by another
        # user than root clears), a read-only mode. Most files: no chmod.
        mask = os.umask(0)
        for p, dest, n, m in write["files"]:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                         (m & 0o777) | 0o200)
            try:
                h, left = hashlib.sha1(), n
                while left:
                    b = sys.stdin.buffer.read(min(left, 1 << 20))
                    if not b:
                        failed("RR-CUT-SHORT")
                    h.update(b)
                    left -= len(b)
                    view = memoryview(b)
                    while view:
                        view = view[os.write(fd, view):]
                st = os.fstat(fd)
                if stat.S_IMODE(st.st_mode) != m:
                    os.fchmod(fd, m)
                    st = os.fstat(fd)
            finally:
                os.close(fd)
            wrote[dest] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, h.hexdigest()]
        os.umask(mask)
        for p, dest, n, m in write["files"]:
            os.rename(p, dest)
            st = os.lstat(dest)  # at once: what the rename left, its ctime included
            w = wrote[dest]
            if w[:4] == [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]:
                w.append(st.st_ctime_ns)
        for d in write["stages"]:
            os.rmdir(d)
    except OSError as e:
        failed("%s: %s" % (getattr(e, "filename2", None) or e.filename, e.strerror))
    def placed(kind, value, tb):
        # The files are in place, so the copy succeeded: an error recording them
        # is reported, and the next run hashes them again.
        import traceback
        traceback.print_exception(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.excepthook = placed
    if not write.get("record", True):
        # One bundle of several (or beside streamed files): the caller records them all
        # at once, taking each hash while the file is still exactly as written here.
        receipts = []
        for p, dest, n, m in write["files"]:
            try:
                st = os.lstat(dest)
            except OSError:
                receipts.append(None)
                continue
            receipts.append(key(st) + [wrote[dest][4]] if as_written(dest, st) else None)
        sys.stdout.write("RR-MANIFEST " + dumps({"files": [], "receipts": receipts}) + "\n")
        sys.stdout.flush()
        os._exit(0)
home = os.environ.get("HOME") or os.path.expanduser("~")
mdir = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"),
                    "remote-runner", "manifests")
node = os.uname()[1]
def mpath(tree):
    name = name_hash(("%s\0%s" % (node, tree)).encode("utf-8", "surrogateescape"))
    return os.path.join(mdir, name.hexdigest() + ".json")
def load(tree):
    try:
        with open(mpath(tree)) as f:
            doc = loads(f.read())
        entries = doc["entries"] if doc["tree"] == tree else {}
        # (each entry is checked where it is used, by usable(): most never are)
        return entries if isinstance(entries, dict) else {}
    except Exception:
        return {}
def usable(e, st):
    """Whether manifest entry e (as read: anything) vouches for the file whose lstat is st."""
    return type(e) is list and len(e) == 6 and e[:5] == key(st) and is_hex(e[5])
def digest(path, st):
    """(sha1, stat unchanged while reading) of the regular file path, st its lstat."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        if key(os.fstat(fd)) != key(st):
            return None, False
        import hashlib  # (OpenSSL's SHA-1: only a run that hashes loads it)
        h = hashlib.sha1()
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
        return h.hexdigest(), key(os.fstat(fd)) == key(st) and key(os.lstat(path)) == key(st)
    finally:
        os.close(fd)
def save(tree, new):
    path = mpath(tree)
    try:
        os.makedirs(mdir, 0o700, exist_ok=True)
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        deadline = time.time() + req.get("lock_wait", 30)
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.time() > deadline:
                    return False
                time.sleep(0.05)
        kept = {}
        for p, e in load(tree).items():
            if p in new:
                continue
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and usable(e, st):
                kept[p] = e
        # (this program took each new entry from an lstat moments ago: not asked again; an
        # entry only vouches for a file whose stat is still exactly its own, ctime included)
        kept.update(new)
        tmp = "%s.%d.tmp" % (path, os.getpid())
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(dumps({"version": 1, "tree": tree, "entries": kept}))  # (C, not a streamed dump)
        os.rename(tmp, path)
        return True
    except OSError:
        return False
    finally:
        os.close(lock)
out = {"files": [], "hashed": 0, "trusted": 0, "received": 0, "saved": True}
trees = req["trees"]
for d, mode in req.get("dirs", []):
    if os.path.isdir(d):
        continue
    try:
        os.makedirs(d)
        if mode is not None:
            os.chmod(d, mode)
    except OSError as e:
        if not os.path.isdir(d):
            out["error"] = "could not create directory %s: %s" % (d, e.strerror)
            sys.stdout.write("RR-MANIFEST " + dumps(out) + "\n")
            sys.exit(0)
known = {}
fresh = {}
expect = req.get("expect") if not req.get("rehash") else None
seen = []  # (path, lstat) of every regular file asked, while an answer may go to a quick file
for f in req["files"]:
    dest, size, mode, t = f[:4]
    got = f[4] if len(f) > 4 else None
    if not (isinstance(got, list) and len(got) == 6 and all(type(x) is int for x in got[:5])
            and is_hex(got[5])):
        got = None
    try:
        st = os.lstat(dest)
    except OSError:
        out["files"].append(None)
        continue
    if not stat.S_ISREG(st.st_mode):
        out["files"].append(None)
        continue
    if expect:
        seen.append((dest, st))
    item = [st.st_size, stat.S_IMODE(st.st_mode), None]
    if size is None or (st.st_size == size and stat.S_IMODE(st.st_mode) == mode):
        if t not in known:
            known[t] = {} if req.get("rehash") else load(trees[t])
        entry = known[t].get(dest)
        if entry is not None and usable(entry, st):
            item[2] = entry[5]
            out["trusted"] += 1
        elif got is not None and got[:5] == key(st):
            item[2] = got[5]
            out["received"] += 1
            fresh.setdefault(t, {})[dest] = got
        elif as_written(dest, st):
            item[2] = wrote[dest][4]
            out["received"] += 1
            fresh.setdefault(t, {})[dest] = key(st) + [item[2]]
        else:
            try:
                item[2], steady = digest(dest, st)
            except OSError:
                steady = False
            out["hashed"] += 1
            if steady and item[2]:
                fresh.setdefault(t, {})[dest] = key(st) + [item[2]]
    out["files"].append(item)
for t in sorted(fresh) if not req.get("rehash") else range(len(trees)):
    out["saved"] = save(trees[t], fresh.get(t, {})) and out["saved"]
seconds = {}  # (files written together share their second: one strftime for all)
def stamp(ns):
    """A time as GNU stat's %y prints it with TZ=UTC0."""
    s, n = divmod(ns, 1000000000)
    t = seconds.get(s)
    if t is None:
        t = seconds[s] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s)).encode()
    return b"%s.%09d +0000" % (t, n)
def remember_quick():
    """The answer is what the request expected: keep the stat of every file it is about, as
    the shell renders it (quickanswer.QUICK_STAT), for the next identical question."""
    trees_id = name_hash("\0".join(trees).encode("utf-8", "surrogateescape")).hexdigest()
    base = os.path.join(mdir, "quick-%s-%s" % (node, trees_id))
    # (a bundle's writer answers for the check a next run asks: that request's SHA-1)
    asked = req.get("quick_id") if is_hex(req.get("quick_id")) else name_hash(raw).hexdigest()
    listed = b"".join(os.fsencode(p) + b"\0" for p, _ in seen)
    rows = [("%s %s %s\n" % (asked, name_hash(listed).hexdigest(), expect)).encode()]
    for p, st in seen:
        rows.append(b"%s|%d|%x|%d|%d|%s|%s\n" % (os.fsencode(p), st.st_size, st.st_mode, st.st_ino,
                                                st.st_dev, stamp(st.st_mtime_ns), stamp(st.st_ctime_ns)))
    try:
        os.makedirs(mdir, 0o700, exist_ok=True)
        for suffix, data in ((".list", listed), (".stat", b"".join(rows))):
            tmp = "%s%s.%d.tmp" % (base, suffix, os.getpid())
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(data)
            os.rename(tmp, base + suffix)
    except OSError:
        pass
if is_hex(expect) and seen and len(seen) == len(req["files"]):
    said = "".join("%d %d %s\n" % tuple(item) for item in out["files"])
    if name_hash(said.encode()).hexdigest() == expect:
        remember_quick()
def stage(dest, data, mode, token):
    """Write data beside dest as a temporary file (renamed into place by the start)."""
    d = os.path.dirname(dest)
    v = os.statvfs(d)
    if v.f_bavail * v.f_frsize < len(data) + (1 << 20):
        return False
    tmp = os.path.join(d, ".%s.rr-%s.tmp" % (os.path.basename(dest), token))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
    except OSError:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return True
staged, at = [], 0
for i, want, token in ahead:
    dest, fsize, fmode = req["files"][i][:3]
    data = blob[at:at + fsize]
    at += fsize
    if (len(data) != fsize or out["files"][i] == [fsize, fmode, want] or
            name_hash(data).hexdigest() != want):
        continue
    if out["files"][i] is None and os.path.lexists(dest):
        continue  # a directory, link or device there: the copy step says what to do
    try:
        if stage(dest, data, fmode, token):
            staged.append(i)
    except OSError:
        pass
if ahead:
    out["staged"] = staged
if req.get("prepare"):
    dirs = sorted(set(os.path.dirname(f[0]) for f in req["files"]))
    now = time.time()
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            if n[:1] != ".":
                continue  # (most names: no test, no lstat)
            temp, stage = is_temp(n), is_stage(n)
            if not (temp or stage):
                continue
            p = os.path.join(d, n)
            try:
                st = os.lstat(p)
                staged = temp and n[-12:-11] == req.get("staged_mark", "\0")
                if now - st.st_mtime < (req.get("staged_stale", 1440) if staged else req["stale"]) * 60:
                    continue
                if temp and stat.S_ISREG(st.st_mode):
                    os.unlink(p)
                elif stage and stat.S_ISDIR(st.st_mode):
                    import shutil
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass
    free = []
    for d in dirs:
        try:
            v, s = os.statvfs(d), os.stat(d)
        except OSError:
            continue
        free.append("RR-FREE %d %d %d %d %s" % (s.st_dev, v.f_bavail, v.f_bfree, v.f_frsize, d))
    free.append("RR-FREE uid %d" % os.getuid())
    out["free"] = free
    out["tar"] = any(os.access(os.path.join(b, "tar"), os.X_OK) and
                     os.path.isfile(os.path.join(b, "tar"))
                     for b in (os.environ.get("PATH") or os.defpath).split(os.pathsep) if b)
sys.stdout.write("RR-MANIFEST " + dumps(out) + "\n")
sys.stdout.flush()
os._exit(0)  # (no teardown: freeing every entry and stat took the host ~3 ms)
'''


@dataclass(frozen=True)
class Remote:
    """What the host said about one wanted file: None when missing or not a regular file."""

    size: int
    mode: int
    sha1: Optional[str]


@dataclass
class Answer:
    """The host's whole answer to a check (or a record) request."""

    files: List[Optional[Remote]]
    hashed: int = 0
    trusted: int = 0
    #: files whose SHA-1 a stream's receiver computed on the host (a record only)
    received: int = 0
    saved: bool = True
    has_tar: bool = False
    free: List[str] = field(default_factory=list)
    error: Optional[str] = None
    #: indices of the files sent ahead that the host staged beside their destination
    staged: List[int] = field(default_factory=list)
    #: what a bundle's writer that did not record its files reported for each (see *write*):
    #: (size, mtime_ns, ctime_ns, inode, device, SHA-1) while it is as written, else None
    receipts: List[Optional[Tuple[int, int, int, int, int, str]]] = field(default_factory=list)
    #: the host's shell found every file as the request expected, by their stat alone
    quick: bool = False
    #: (the request's SHA-1, the SHA-1 of the answer it expected) of a check that sent no
    #: file ahead: what a next run asks while nothing changes here (see :func:`request`)
    asked: Optional[Tuple[str, str]] = None
    #: the earlier answer the host's shell named (:data:`STATE_MARK`), if it named one
    named: Optional[str] = None
    #: the host's shell found that none of the files is there (:data:`quickanswer.ABSENT_MARK`)
    absent: bool = False


def run_script(size: Optional[int] = None, quick: Optional[quickanswer.Quick] = None,
               total: Optional[int] = None, absent: str = "") -> str:
    """The shell text that runs :data:`HOST_PROGRAM` with python3, or says there is none.

    With *size*, the program reads exactly that many bytes of request and
    leaves the rest of stdin alone (the session lock's channel, see
    :func:`remote_runner.sessionlock.lock_script`, stays open after it).
    With *quick* (a request that says what it expects), the host's shell
    answers first where it can (:func:`remote_runner.quickanswer.shell_first`);
    *absent* (:func:`remote_runner.quickanswer.shell_absent`) before that.
    """
    arg = "" if size is None else f" {int(size)}"
    fast = quickanswer.shell_first(quick, size, total) if quick is not None and size is not None else ""
    return (absent + fast + f"command -v python3 >/dev/null 2>&1 || {{ echo {NO_PYTHON_MARK}; exit 0; }}\n"
            f"exec python3 {PYTHON_FLAGS} -c {shlex.quote(HOST_PROGRAM)}{arg}\n")


def expectation_text(items: Sequence["Upload"], sums: Sequence[str]) -> str:
    """The answer that finds every file of *items* as here (*sums* their SHA-1s), as hashed."""
    return "".join(f"{u.size} {u.mode} {sha1}\n" for u, sha1 in zip(items, sums))


def expectation(items: Sequence["Upload"], sums: Sequence[str]) -> str:
    """The ``expect`` of a request: the SHA-1 of the answer that finds every file the same."""
    return expectation_digest(expectation_text(items, sums))


def expectation_digest(text: str) -> str:
    """The ``expect`` naming an :func:`expectation_text` (what a host quotes back to name it)."""
    return hashlib.sha1(text.encode()).hexdigest()


def request(items: Sequence["Upload"], trees: Sequence[str], tree_of: Sequence[int], *,
            dirs: Sequence[Tuple[str, Optional[int]]] = (), rehash: bool = False,
            prepare: bool = False, hash_all: bool = False,
            receipts: Optional[Mapping[str, Any]] = None,
            ahead: Sequence[Tuple[int, str, str]] = (), ahead_bytes: int = 0,
            write: Optional[Mapping[str, Any]] = None, expect: Optional[str] = None,
            quick_id: Optional[str] = None) -> bytes:
    """The JSON request for *items* (each in ``trees[tree_of[i]]``).

    A check sends size and mode: the host hashes only files that match them
    (and whose manifest entry is stale). *hash_all* (a record, after a copy)
    hashes every file, except one with a receipt (*receipts*: dest ->
    :class:`~remote_runner.stream.Receipt`, the SHA-1 the host's receiver
    computed while writing it and the file's stat after its rename), whose
    hash the host takes while the file's stat is still exactly that.
    *prepare* also creates *dirs*, sweeps stale temporary files and reports
    free space and tar, so that a check is the host's only exec before copying.
    *ahead* (with *prepare*) lists files whose bytes follow the request on
    stdin, *ahead_bytes* in all, in that order: (index, SHA-1, token). The
    host stages each one that differs there as ``.NAME.rr-TOKEN.tmp`` beside
    its destination (see :mod:`remote_runner.precheck`).
    *write* (a record of a bundle, :func:`remote_runner.bundle.write_bundle`)
    has the host first write the bundle's files, whose bytes follow the request
    on stdin: ``files`` [stage path, destination, size, mode] in the order of
    the bytes, each written into its stage directory (``stages``, made there
    and removed once empty), then all renamed to their destinations; the
    program exits 3 if any of that fails, and 0 once the files are in place,
    whatever the record does. A file still exactly as written (size, mtime,
    inode) is recorded with the SHA-1 taken of the bytes as they arrived. With
    ``"record": False`` in *write* the program records nothing and answers
    each file's receipt instead (:attr:`Answer.receipts`), for the caller's
    one record of the whole copy: bundles written at once would otherwise
    queue on the manifest's lock, each rewriting it.
    *expect* is the SHA-1 of the answer expected (:func:`expectation`): the
    host program given exactly that answer keeps its files' stat for the
    shell to answer the same question next time (see :func:`run_script`),
    under the request's own SHA-1, or *quick_id*'s: a bundle's writer asked
    about every file of a check after writing (*write* with *expect*) answers
    for that check, so the first run after a copy needs no python3 either.
    """
    files = []
    for u, t in zip(items, tree_of):
        entry: List[Any] = [u.dest, None if hash_all else u.size, None if hash_all else u.mode, t]
        receipt = (receipts or {}).get(u.dest)
        if receipt is not None and receipt.stat is not None:
            entry.append(list(receipt.stat) + [receipt.sha1])
        files.append(entry)
    doc: Dict[str, Any] = {"trees": list(trees), "files": files, "rehash": bool(rehash),
                           "dirs": [[d, m] for d, m in dirs], "prepare": prepare,
                           "stale": STALE_MINUTES, "staged_stale": STAGED_STALE_MINUTES,
                           "staged_mark": STAGED_MARK, "lock_wait": LOCK_WAIT}
    if ahead and prepare:
        doc["ahead"], doc["ahead_bytes"] = [list(a) for a in ahead], ahead_bytes
    if write is not None:
        doc["write"] = dict(write)
    if expect is not None:
        doc["expect"] = expect
    if quick_id is not None:
        doc["quick_id"] = quick_id
    return json.dumps(doc).encode("utf-8", "surrogateescape")


def exchange(shell: "Shell", payload: bytes, count: int, timeout: float = 600) -> Optional[Answer]:
    """Send one request; return the parsed answer, or None (no python3, or no usable answer)."""
    result = shell.feed(run_script(), payload, timeout=timeout)
    answer = read_answer(shell.host, result.stdout, count)
    if answer is None:
        LOG.debug("%s: unusable manifest answer (exit %s): %s", shell.host, result.exit_status,
                  (result.stderr.strip().splitlines() or ["no error output"])[-1][:300])
    return answer


def read_answer(host: str, output: str, count: int) -> Optional[Answer]:
    """The answer to a request for *count* files in a host's *output*, or None.

    None means the host has no python3 (it said :data:`NO_PYTHON_MARK`) or
    said nothing usable: either way the caller compares files the old way.
    """
    lines = output.splitlines()
    if NO_PYTHON_MARK in lines:
        LOG.debug("%s: no python3 on the host", host)
        return None
    return parse_answer(lines, count)


def parse_answer(lines: Sequence[str], count: int) -> Optional[Answer]:
    """Parse the host's ``RR-MANIFEST`` line defensively; None unless it is well formed.

    Well formed means one item per file asked (*count*), each null or
    ``[size, mode, sha1-or-null]`` with non-negative integers and a 40-digit
    lower-case hex SHA-1. Anything else (garbage, a truncated line, a host
    that lies about the count) is refused as a whole.
    """
    found = [line for line in lines if line.startswith(ANSWER_MARK + " ")]
    if len(found) != 1:
        return None
    try:
        doc = json.loads(found[0][len(ANSWER_MARK) + 1:])
    except (ValueError, RecursionError):  # (a host's "[[[[…" nests past Python's stack)
        return None
    if not isinstance(doc, dict):
        return None
    error = doc.get("error")
    if isinstance(error, str):
        return Answer([], error=error[:500])
    raw = doc.get("files")
    if not isinstance(raw, list) or len(raw) != count:
        return None
    files: List[Optional[Remote]] = []
    for item in raw:
        if item is None:
            files.append(None)
            continue
        if not (isinstance(item, list) and len(item) == 3 and _count(item[0]) and _count(item[1])
                and (item[2] is None or is_sha1(item[2]))):
            return None
        files.append(Remote(item[0], item[1], item[2]))
    free = doc.get("free", [])
    free = [x for x in free if isinstance(x, str)] if isinstance(free, list) else []
    staged = doc.get("staged", [])
    if not (isinstance(staged, list) and all(_count(i) and i < count for i in staged)):
        return None
    receipts = doc.get("receipts", [])
    if not (isinstance(receipts, list) and all(r is None or _receipt(r) for r in receipts)):
        return None
    return Answer(files, hashed=_int(doc.get("hashed")), trusted=_int(doc.get("trusted")),
                  received=_int(doc.get("received")), saved=doc.get("saved") is True,
                  has_tar=doc.get("tar") is True, free=free, staged=sorted(set(staged)),
                  receipts=[None if r is None else tuple(r) for r in receipts])


def _receipt(value: Any) -> bool:
    """A well-formed receipt: five non-negative integers (the stat) and a SHA-1."""
    return (isinstance(value, list) and len(value) == 6 and all(_count(x) for x in value[:5])
            and is_sha1(value[5]))


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _int(value: Any) -> int:
    return value if _count(value) else 0
