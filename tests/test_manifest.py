"""The host-side manifest and the local hash cache: a rerun where nothing changed costs one exec.

The claims, each proven on real lab hosts (sshd, the hosts' python3 and files):

* a warm sync is exactly one exec per host and reads no file on either side;
* a file changed behind the manifest's back (same size, mtime restored with
  ``touch -d``, or replaced by another inode) is seen and copied again;
* a manifest never claims a file that is not fully there, also after a copy
  that was killed half-way;
* two runs copying into one destination tree at once keep one consistent manifest;
* without python3 on the host the old ``stat`` + ``openssl`` check still works;
* ``--rehash`` and ``--always-copy`` keep their meaning.

The host's answer and the files it keeps are not trusted: garbage is refused
or counts as empty (unit tests at the top, no hosts needed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from remote_runner import events as ev
from remote_runner import expectations, hashcache, manifest, quickanswer, sync
from remote_runner.config import FileSpec
from remote_runner.loader import load_experiment
from remote_runner.errors import CopyError, RunnerError
from remote_runner.runner import RunOptions, Runner
from remote_runner.sessionlock import EARLY_MARK
from remote_runner.shell import LocalShell, RemoteShell, ScriptResult
from remote_runner.ssh import Connection, SSHOptions
from tests.conftest import quit_screen, ssh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "remote_runner.py")

#: Checks, on the host, every manifest of one tree: which paths it has entries for, and
#: which entries claim a SHA-1 the file (with exactly that stat) does not have.
AUDIT = r'''
import glob, hashlib, json, os, sys
tree, found, bad, manifests = sys.argv[1], [], [], 0
base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
for name in glob.glob(os.path.join(base, "remote-runner", "manifests", "*.json")):
    try:
        doc = json.load(open(name))
    except ValueError:
        continue
    if doc.get("tree") != tree:
        continue
    manifests += 1
    for path, e in doc["entries"].items():
        found.append(path)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev] != e[:5]:
            continue
        if hashlib.sha1(open(path, "rb").read()).hexdigest() != e[5]:
            bad.append(path)
print(json.dumps({"entries": sorted(found), "bad": bad, "manifests": manifests}))
'''


def audit(lab, host: str, tree: str) -> dict:
    """What the host's manifests say about *tree* (see :data:`AUDIT`)."""
    import shlex
    out = ssh(lab, host, f"python3 -c {shlex.quote(AUDIT)} {shlex.quote(tree)}").stdout
    return json.loads(out)


class NoPython:
    """A real shell (with ``feed``) whose PATH hides python3 but keeps the usual tools."""

    def __init__(self, inner, bin_dir: str) -> None:
        self.inner, self.host, self.bin_dir = inner, inner.host, bin_dir

    def _path(self) -> str:
        return f"PATH={self.bin_dir}; export PATH\n"

    def script(self, text: str, timeout: float) -> ScriptResult:
        return self.inner.script(self._path() + text, timeout)

    def feed(self, script: str, data: bytes, timeout: float) -> ScriptResult:
        return self.inner.feed(self._path() + script, data, timeout)


# --------------------------------------------------------------------------- no hosts needed

def _line(doc) -> list:
    return [manifest.ANSWER_MARK + " " + json.dumps(doc)]


def test_a_garbled_or_lying_answer_is_refused_as_a_whole():
    good = {"files": [None, [3, 0o644, "a" * 40]], "hashed": 1, "trusted": 0, "saved": True,
            "tar": True, "free": ["RR-FREE uid 0"]}
    answer = manifest.parse_answer(_line(good), 2)
    assert answer is not None and answer.files[0] is None and answer.files[1].sha1 == "a" * 40
    assert answer.has_tar and answer.hashed == 1 and answer.free == ["RR-FREE uid 0"]
    assert manifest.parse_answer(_line(good), 3) is None  # not one item per file asked
    for item in ([3, 0o644, "A" * 40], [3, 0o644, "a" * 39], [-1, 0o644, None], ["3", 1, None],
                 [3, 0o644], {"size": 3}, [True, 0o644, None]):
        assert manifest.parse_answer(_line({**good, "files": [None, item]}), 2) is None, item
    assert manifest.parse_answer(["RR-MANIFEST {not json"], 2) is None
    assert manifest.parse_answer(_line(good) * 2, 2) is None
    assert manifest.parse_answer([], 2) is None
    assert manifest.parse_answer(_line({"error": "could not create directory /x: Denied"}),
                                 2).error == "could not create directory /x: Denied"
    assert manifest.parse_answer(_line({**good, "staged": [1, 1]}), 2).staged == [1]
    for staged in ([2], [-1], ["1"], 1, [True]):  # only files asked about can be staged
        assert manifest.parse_answer(_line({**good, "staged": staged}), 2) is None, staged


def test_the_host_stages_only_the_files_sent_ahead_that_differ_and_arrived_whole(tmp_path):
    """Each file sent ahead is compared by SHA-1 with what the host has; one that differs is
    written beside its destination as a temporary (the destination untouched), with its mode;
    bytes that do not match their SHA-1 are not staged at all, nor is a file whose destination
    is a directory or a link (the copy step deals with those, as before)."""
    import hashlib
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "same").write_bytes(b"same\n")
    (tree / "old").write_bytes(b"old\n")
    (tree / "dir").mkdir()  # (a directory where a file goes: left to the copy step)
    (tree / "link").symlink_to("same")
    datas = {"same": b"same\n", "old": b"new text\n", "fresh": b"fresh\n", "bad": b"torn\n",
             "dir": b"a file\n", "link": b"a file\n"}
    names = list(datas)
    sums = {n: hashlib.sha1(d).hexdigest() for n, d in datas.items()}
    sums["bad"] = hashlib.sha1(b"what was meant\n").hexdigest()
    for name in ("same", "old"):
        (tree / name).chmod(0o644)
    files = [[str(tree / n), len(datas[n]), 0o640 if n == "fresh" else 0o644, 0] for n in names]
    ahead = [[i, sums[n], f"tok{i:05d}"] for i, n in enumerate(names)]
    blob = b"".join(datas[n] for n in names)
    request = json.dumps({"trees": [str(tree)], "files": files, "prepare": True, "stale": 60,
                          "dirs": [], "ahead": ahead, "ahead_bytes": len(blob)}).encode()
    done = _host_program(tmp_path, request, blob + b"left for the lock")
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    answer = manifest.parse_answer(out.splitlines(), 6)
    assert answer is not None and answer.staged == [1, 2], out
    assert (tree / "old").read_bytes() == b"old\n" and not (tree / "fresh").exists()
    assert (tree / ".old.rr-tok00001.tmp").read_bytes() == b"new text\n"
    assert (tree / ".fresh.rr-tok00002.tmp").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tree.iterdir()) == [
        ".fresh.rr-tok00002.tmp", ".old.rr-tok00001.tmp", "dir", "link", "old", "same"]


def _write(tmp_path, names, extra=None, short=0, write_extra=None, modes=None):
    """Run the host program with a writing request for *names* (name -> bytes, destined for
    tree/, with *modes*: name -> mode) and their bytes after it (*short* bytes fewer); return
    (tree, stage, the process)."""
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    stage = tree / ".rr-stage-ab12cd34"
    modes = modes or {"x": 0o640}
    files = [[str(stage / name), str(tree / name), len(data), modes.get(name, 0o755)]
             for name, data in names.items()]
    doc = {"trees": [str(tree)], "files": [[dest, None, None, 0] for _, dest, _, _ in files],
           "write": dict({"files": files, "stages": [str(stage)]}, **(write_extra or {})),
           "stale": 60, "lock_wait": 5}
    doc.update(extra or {})
    request = json.dumps(doc).encode()
    data = b"".join(names.values())
    return tree, stage, _host_program(tmp_path, request, data[:len(data) - short])


def _host_program(home, request: bytes, after: bytes = b""):
    """Run the host program on *request* (its size given) followed by *after*, with *home*
    as its home and cache."""
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-I", "-S", "-c", manifest.HOST_PROGRAM, str(len(request))],
                          input=request + after, capture_output=True, env=env)


def test_the_host_program_writes_a_bundle_places_it_then_records_it(tmp_path):
    """Written into a stage, chmodded, renamed into place, the stage removed, and each file
    recorded with the SHA-1 of the bytes that arrived: one python3 where the shell ran mkdir,
    tar, stat, chmod, mv and a python3 that read every file again."""
    import hashlib
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "x").write_bytes(b"old")
    tree, stage, done = _write(tmp_path, {"x": b"one\n", "y": b"two\n"})
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tree.iterdir()) == ["x", "y"]
    assert (tree / "x").read_bytes() == b"one\n" and (tree / "x").stat().st_mode & 0o777 == 0o640
    assert (tree / "y").read_bytes() == b"two\n" and (tree / "y").stat().st_mode & 0o777 == 0o755
    answer = manifest.parse_answer(done.stdout.decode().splitlines(), 2)
    assert answer is not None and answer.saved and (answer.received, answer.hashed) == (2, 0)
    assert [f.sha1 for f in answer.files] == [hashlib.sha1(b"one\n").hexdigest(), hashlib.sha1(b"two\n").hexdigest()]


def test_a_file_changed_once_in_place_is_not_recorded_as_the_one_written(tmp_path):
    """A same-size rewrite with its mtime put back, made after the file's rename (here: while
    the stage is removed, after every rename), changes its ctime: the program hashes the file
    it finds instead of vouching for the bytes it wrote."""
    import hashlib
    (tmp_path / "tree").mkdir()
    tree = tmp_path / "tree"
    prelude = ("import os as _os\n_rmdir = _os.rmdir\n"
               "def _meddle(d):\n"
               "    _rmdir(d)\n"
               f"    x = {str(tree / 'x')!r}\n"
               "    st = _os.stat(x)\n"
               "    with open(x, 'r+b') as f: f.write(b'EVIL')\n"
               "    _os.utime(x, ns=(st.st_atime_ns, st.st_mtime_ns))\n"
               "_os.rmdir = _meddle\n")
    stage = tree / ".rr-stage-ab12cd34"
    files = [[str(stage / "x"), str(tree / "x"), 4, 0o644], [str(stage / "y"), str(tree / "y"), 4, 0o644]]
    doc = {"trees": [str(tree)], "files": [[dest, None, None, 0] for _, dest, _, _ in files],
           "write": {"files": files, "stages": [str(stage)]}, "stale": 60, "lock_wait": 5}
    request = json.dumps(doc).encode()
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", prelude + manifest.HOST_PROGRAM,
                           str(len(request))], input=request + b"goodfine", capture_output=True, env=env)
    assert done.returncode == 0, done.stderr
    assert (tree / "x").read_bytes() == b"EVIL"
    answer = manifest.parse_answer(done.stdout.decode().splitlines(), 2)
    assert answer is not None and (answer.received, answer.hashed) == (1, 1)
    assert [f.sha1 for f in answer.files] == [hashlib.sha1(b"EVIL").hexdigest(),
                                              hashlib.sha1(b"fine").hexdigest()]


def test_a_bundle_keeps_every_mode_whatever_the_umask(tmp_path):
    """Files are created with their mode and chmodded only where that did not give it:
    read-only, private and set-id modes all come out exact under a umask, or a default ACL,
    that would take bits away, and what the program makes for itself keeps its own modes."""
    modes = {"ro": 0o444, "private": 0o600, "suid": 0o4755, "sgid": 0o2750, "open": 0o777}
    old = os.umask(0o077)
    try:
        tree, _, done = _write(tmp_path, {name: name.encode() for name in modes}, modes=modes)
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    assert {name: (tree / name).stat().st_mode & 0o7777 for name in modes} == modes
    assert all((tree / name).read_bytes() == name.encode() for name in modes)
    kept = list((tmp_path / "cache" / "remote-runner" / "manifests").glob("*.json"))
    assert kept and all(path.stat().st_mode & 0o777 == 0o600 for path in kept)
    # a default ACL taking bits from every new file (here: nothing for others) takes none
    # from these: what a file got at its creation is checked, and set right
    import struct
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                          for tag, perm in ((0x01, 7), (0x04, 5), (0x20, 0)))
    try:
        os.setxattr(tree, "system.posix_acl_default", acl)
    except OSError:
        pytest.skip("no POSIX ACLs here")
    for name in modes:
        (tree / name).unlink()
    _, _, done = _write(tmp_path, {name: name.encode() for name in modes}, modes=modes)
    assert done.returncode == 0, done.stderr
    assert {name: (tree / name).stat().st_mode & 0o7777 for name in modes} == modes


def test_a_writer_that_does_not_record_answers_each_files_receipt(tmp_path):
    """One bundle of several: written and placed, nothing saved, and for each file the stat it
    has in place with the SHA-1 of what arrived, for the copy's one record."""
    import hashlib
    tree, _stage, done = _write(tmp_path, {"x": b"one\n", "y": b"two\n"}, write_extra={"record": False})
    assert done.returncode == 0, done.stderr
    answer = manifest.parse_answer(done.stdout.decode().splitlines(), 0)
    assert answer is not None and answer.files == [] and len(answer.receipts) == 2
    for name, data, receipt in zip("xy", (b"one\n", b"two\n"), answer.receipts):
        st = os.lstat(tree / name)
        assert receipt == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev,
                           hashlib.sha1(data).hexdigest())
    assert not (tmp_path / "cache").exists()  # no manifest written


def test_a_receipt_that_is_not_a_stat_and_a_sha1_makes_the_answer_unusable():
    good = [1, 2, 3, 4, 5, "a" * 40]
    assert manifest.parse_answer(_line({"files": [], "receipts": [good, None]}), 0).receipts == [tuple(good), None]
    for bad in ([1, 2, 3, 4, "a" * 40], [1, 2, 3, 4, -5, "a" * 40], [1, 2, 3, 4, 5, "A" * 40],
                [1, 2, 3, 4, 5.0, "a" * 40], "x"):
        assert manifest.parse_answer(_line({"files": [], "receipts": [bad]}), 0) is None, bad


def test_the_host_program_places_nothing_when_the_bytes_end_short(tmp_path):
    from remote_runner.bundle import CUT_MARK
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "x").write_bytes(b"old")
    tree, stage, done = _write(tmp_path, {"x": b"one\n", "y": b"two\n"}, short=1)
    assert done.returncode == 3 and CUT_MARK in done.stderr.decode().split()
    assert sorted(p.name for p in tree.iterdir()) == ["x"]  # its stage removed, x untouched
    assert (tree / "x").read_bytes() == b"old" and done.stdout == b""


def test_the_host_program_fails_naming_the_destination_it_could_not_replace(tmp_path):
    (tmp_path / "tree" / "x" / "blocker").mkdir(parents=True)  # a directory where the file goes
    tree, stage, done = _write(tmp_path, {"x": b"one\n"})
    assert done.returncode == 3 and done.stdout == b""
    assert done.stderr.decode().strip() == f"{tree / 'x'}: Is a directory"
    assert sorted(p.name for p in tree.iterdir()) == ["x"] and not stage.exists()


def test_the_host_program_never_writes_through_a_name_already_at_its_stage(tmp_path):
    """A stage directory is made by the program: a symlink (or anything) with its name fails
    the bundle and nothing is written where it points."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / ".rr-stage-ab12cd34").symlink_to(elsewhere)
    tree, stage, done = _write(tmp_path, {"x": b"one\n"})
    assert done.returncode == 3 and "File exists" in done.stderr.decode()
    assert list(elsewhere.iterdir()) == [] and stage.is_symlink() and not (tree / "x").exists()


def test_once_placed_an_error_recording_the_files_does_not_fail_the_copy(tmp_path):
    """Exit 0 means "every file is in place" (anything else fails the copy): a record that
    breaks after that is reported on stderr and leaves no manifest line."""
    tree, stage, done = _write(tmp_path, {"x": b"one\n"}, {"trees": None})  # the record cannot work
    assert done.returncode == 0 and (tree / "x").read_bytes() == b"one\n"
    assert "Traceback" in done.stderr.decode() and manifest.ANSWER_MARK not in done.stdout.decode()
    missing = str(tmp_path / "no-such-dir" / ".rr-stage-ab12cd34")
    _tree, _stage, broken = _write(tmp_path / "tree", {"x": b"one\n"},
                                   {"trees": None, "write": {"files": [[missing + "/x", str(tree / "x"), 4, 0o644]],
                                                             "stages": [missing]}})
    assert broken.returncode == 3 and "No such file" in broken.stderr.decode()  # (before: a failure)


def test_only_files_changed_here_go_ahead_and_only_when_all_of_them_fit(tmp_path, monkeypatch):
    """A guess, by the local hash cache: a file whose stat it knows did not change here."""
    from remote_runner import precheck
    from remote_runner.upload import Upload
    cache = hashcache.LocalHashes(str(tmp_path / "cache"))
    monkeypatch.setattr(hashcache, "LOCAL", cache)
    src = tmp_path / "src"
    src.mkdir()
    items = []
    for i in range(precheck.AHEAD_FILES + 1):
        (src / f"f{i:02d}").write_text(f"file {i}\n")
        items.append(Upload(str(src / f"f{i:02d}"), f"/base/f{i:02d}", 0o644, len(f"file {i}\n")))
    assert precheck._changed_here(items, {}) == []  # more than AHEAD_FILES new: none go ahead
    for item in items:
        cache.sha1(item.src)
    assert precheck._changed_here(items, {}) == []  # all known: nothing changed here
    (src / "f03").write_text("edited\n")
    items[3] = Upload(items[3].src, items[3].dest, 0o644, 7)
    memo: precheck.AheadMemo = {}
    [(index, (data, sha1))] = precheck._changed_here(items, memo)
    assert (index, data) == (3, b"edited\n") and sha1 == hashcache.hash_file(items[3].src)[0]
    assert precheck._changed_here(items, memo) == [(3, (data, sha1))]  # the memo holds for every host
    # the copy step compares with the hashes the cache gave while planning
    assert precheck.known_sums(memo) == {item.src: hashcache.hash_file(item.src)[0]
                                         for i, item in enumerate(items) if i != 3}
    (src / "big").write_bytes(b"x" * (precheck.AHEAD_FILE + 1))
    big = Upload(str(src / "big"), "/base/big", 0o644, precheck.AHEAD_FILE + 1)
    assert precheck._changed_here(items + [big], {}) == []  # the copy step is needed anyway


def test_a_planned_file_is_looked_up_in_the_hash_cache_by_the_stat_the_plan_took(tmp_path, monkeypatch):
    """No second stat while the connections are made: the plan's own says which hash holds."""
    from remote_runner import precheck
    cache = hashcache.LocalHashes(str(tmp_path / "cache"))
    monkeypatch.setattr(hashcache, "LOCAL", cache)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_text("one\n")
    [item] = _local_plan(tmp_path / "src", "/base").files
    assert item.seen == hashcache.stat_key(os.stat(item.src)) and item.size == 4
    sha1 = cache.sha1(item.src)
    monkeypatch.setattr(precheck.hashcache.os, "stat", lambda *a, **k: pytest.fail("stat again"))
    assert precheck._read_if_changed(item) == sha1
    # rewritten after the plan: the plan's answer stands (its size with its hash); the next plan's is new
    monkeypatch.undo()
    monkeypatch.setattr(hashcache, "LOCAL", cache)
    (tmp_path / "src" / "a").write_text("two, longer\n")
    assert precheck._read_if_changed(item) == sha1
    [again] = _local_plan(tmp_path / "src", "/base").files
    assert precheck._read_if_changed(again) == (b"two, longer\n", hashlib.sha1(b"two, longer\n").hexdigest())


def _local_plan(src, dest):
    return sync.make_plan("localhost", [(FileSpec(str(src), "tree", True), str(dest))])


class Local(LocalShell):
    host = "local"


def _local_tree(tmp_path, monkeypatch, count):
    """A plan copying *count* small files into tmp_path/dest here, the manifests in tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(count):
        (src / f"f{i}").write_text(f"content {i}\n")
    return _local_plan(src, tmp_path / "dest")


def _synced_tree(tmp_path, monkeypatch, count):
    """A small tree copied here once (see :func:`_local_tree`): (plan, its files, trees, the
    files' tree indices, their SHA-1s)."""
    plan = _local_tree(tmp_path, monkeypatch, count)
    sync.sync_host(Local(), None, plan)
    items = list(plan.files)
    trees, index = plan.tree_index(items)
    sums = [hashlib.sha1(open(u.src, "rb").read()).hexdigest() for u in items]
    return plan, items, trees, index, sums


def test_a_garbage_manifest_counts_as_empty_and_is_rewritten(tmp_path, monkeypatch):
    plan = _local_tree(tmp_path, monkeypatch, 3)
    assert len(sync.sync_host(Local(), None, plan).copied) == 3
    warm = sync.sync_host(Local(), None, plan)
    assert (warm.hash_tool, warm.hashed, warm.trusted, warm.copied) == ("manifest", 0, 3, [])
    [kept] = (tmp_path / "cache" / "remote-runner" / "manifests").glob("*.json")
    good = json.loads(kept.read_text())
    # entries whose stat is right but whose hash is not one, or that are not lists at all
    bad_hash = {p: e[:5] + ["Z" * 40] for p, e in good["entries"].items()}
    not_lists = {p: {"sha1": e[5]} for p, e in good["entries"].items()}
    for garbage in (b"\x00\xff garbage", b'{"tree": 1, "entries": []}', b"[]",
                    json.dumps({"tree": str(tmp_path / "dest"), "entries": {
                        str(tmp_path / "dest" / "tree" / "f0"): [1, 2, "x", 4, 5, "zz"]}}).encode(),
                    json.dumps(dict(good, entries=bad_hash)).encode(),
                    json.dumps(dict(good, entries=not_lists)).encode()):
        kept.write_bytes(garbage)
        again = sync.sync_host(Local(), None, plan)
        assert (again.hashed, again.trusted, again.copied) == (3, 0, []), garbage
        assert len(json.loads(kept.read_text())["entries"]) == 3


def _absent_check(tmp_path, monkeypatch):
    """A check of five files in three directories (one nested) under tmp_path/dest, as a
    run's lock asks it: (the check, its script with ``REST:`` and what it left on stdin)."""
    from remote_runner import precheck
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    names = ["a/f0", "a/f1", "b/c/f2", "b/c/f3", "top"]
    specs = []
    for i, name in enumerate(names):
        (src / f"s{i}").write_text(f"content {i}\n")
        specs.append((FileSpec(str(src / f"s{i}"), name, False), str(tmp_path / "dest")))
    plan = sync.make_plan("local", specs)
    items = list(plan.files)
    trees, index = plan.tree_index(items)
    request = manifest.request(items, trees, index, dirs=plan.dirs, prepare=True)
    check = precheck.EarlyCheck("local", plan, {}, request, json_size=len(request),
                                absent=precheck.absent_answer(plan, request, len(request)))
    return check, "(\n" + check.script + ")\nprintf 'REST:'; cat\n"


def test_the_shell_says_no_file_is_there_makes_the_directories_and_reads_just_the_request(
        tmp_path, monkeypatch):
    """A first copy: no file there, every directory missing or empty. The shell answers
    (no program), makes the directories, reads exactly the request and gives each directory's
    free space; the answer lists every file as missing."""
    from remote_runner.freespace import free_space
    check, script = _absent_check(tmp_path, monkeypatch)
    (tmp_path / "dest" / "b").mkdir(parents=True)  # there, and empty
    out = subprocess.run(["sh", "-c", script], input=check.request + b"tail", capture_output=True,
                         check=True).stdout.decode()
    assert out.endswith("REST:tail") and manifest.ANSWER_MARK + " " not in out, out
    # the whole answer, then the early mark: the run goes on before the request arrives
    lines = out.splitlines()
    assert lines.index(EARLY_MARK) == len(lines) - 2 and lines[-3].startswith("RR-FREE uid"), out
    check.take(out)
    answer = check.answer
    assert answer is not None and answer.absent and answer.files == [None] * 5
    assert answer.has_tar == (shutil.which("tar") is not None)
    dirs = [d for d, _ in check.plan.dirs]
    assert all(os.path.isdir(d) for d in dirs) and len(dirs) == 3
    free = free_space(answer.free)
    assert sorted(free) == sorted(dirs) and all(room > 0 for _, room in free.values())
    # the copy step's check of the same files finds them missing too, and copies them all
    report = sync.sync_host(Local(), None, check.plan, answer=answer)
    assert report.absent and len(report.copied) == 5
    assert (tmp_path / "dest" / "b" / "c" / "f3").read_text() == "content 3\n"
    # the answer is only ever taken for its own request
    assert quickanswer.said_absent(out, "0" * 40) is None
    assert quickanswer.said_absent(out.replace(" tar\n", " yes\n").replace(" -\n", " yes\n"),
                                   check.absent[0]) is None


def test_the_shells_no_file_answer_stays_within_the_lock_commands_room():
    """Its text rides on the lock's command line (one argument of at most 128 KiB): a tree
    whose names would make it too long, quoted as it is there, is left to the program."""
    from remote_runner.loginshell import ARG_MAX
    plain = [(f"/base/d{d}", [f"module_{i}.py" for i in range(100)]) for d in range(10)]
    quoted = [(f"/base/d{d}", [f"it's {i}" for i in range(400)]) for d in range(10)]
    assert quickanswer.shell_absent(plain)
    assert quickanswer.shell_absent(quoted) == ""  # (short as text, long quoted)
    for groups in (plain, quoted[:2]):
        text = quickanswer.absent_for("0" * 40, 10 ** 12, quickanswer.shell_absent(groups))
        assert text and len(shlex.quote(text)) <= quickanswer.ABSENT_TEXT < ARG_MAX // 3
    assert quickanswer.shell_absent([("/base/two\nlines", ["f"])]) == ""


@pytest.mark.parametrize("there", ["a file", "a dangling link", "a directory", "a file for a directory",
                                   "other names"])
def test_the_shell_says_no_file_is_there_only_when_none_of_their_names_is(tmp_path, monkeypatch, there):
    """Anything under one of the files' names (a file, a dangling link, a directory: whatever
    ``lstat`` finds), or a directory's name taken by a file, leaves the question to the
    program, which answers it; other names beside them do not."""
    check, script = _absent_check(tmp_path, monkeypatch)
    a, c = tmp_path / "dest" / "a", tmp_path / "dest" / "b" / "c"
    c.mkdir(parents=True)
    a.mkdir()
    if there == "a file":
        (c / "f3").write_text("content 3\n")  # (not the first file, a/f0)
    elif there == "a dangling link":
        (c / "f3").symlink_to(tmp_path / "nowhere")
    elif there == "a directory":
        (tmp_path / "dest" / "top").mkdir()
    elif there == "a file for a directory":
        a.rmdir()
        a.write_text("not a directory")
    else:
        (c / ".hidden").write_text("x")
        (a / "f0.old").write_text("x")
        (a / ".f1.rr-0123abcd.tmp").write_text("x")
    out = subprocess.run(["sh", "-c", script], input=check.request + b"tail", capture_output=True,
                         check=True).stdout.decode()
    check.take(out)
    assert check.answer is not None
    if there == "other names":
        assert check.answer.absent and check.answer.files == [None] * 5 and out.endswith("REST:tail")
        return
    assert quickanswer.ABSENT_MARK not in out and not check.answer.absent, out
    if there == "a file for a directory":
        assert check.answer.error and "could not create directory" in check.answer.error, out
        return
    assert [f is not None for f in check.answer.files] == [False, False, False, there == "a file", False]


def test_an_answer_as_expected_is_given_again_from_the_files_stat_alone(tmp_path, monkeypatch):
    """Once the host program has answered a request exactly what it expected, the shell answers
    the same request again from one stat of the files, reading exactly the request off stdin;
    a file changed since, even with its size and mtime put back, sends it to the program."""
    plan, items, trees, index, sums = _synced_tree(tmp_path, monkeypatch, 5)
    expect = manifest.expectation(items, sums)
    request = manifest.request(items, trees, index, dirs=plan.dirs, prepare=True, expect=expect)
    quick = quickanswer.quick_for(request, items, trees, expect)
    digest = quick.request
    script = "(\n" + manifest.run_script(len(request), quick) + ")\nprintf 'REST:'; cat\n"

    def ask():
        out = subprocess.run(["sh", "-c", script], input=request + b"tail", capture_output=True,
                             check=True).stdout.decode()
        if quickanswer.said_same(out, digest):  # the request read, not a byte more, once
            assert out.endswith(f"\n{EARLY_MARK}\nREST:tail"), out  # the answer said whole
        return out

    first = ask()  # the program answers, and keeps the stat of what it vouched for
    assert not quickanswer.said_same(first, digest)
    assert [r.sha1 for r in manifest.read_answer("local", first, len(items)).files] == sums
    [kept] = (tmp_path / "cache" / "remote-runner" / "manifests").glob("quick-*.stat")
    assert kept.stat().st_mode & 0o777 == 0o600
    assert quickanswer.said_same(ask(), digest)
    changed = tmp_path / "dest" / "tree" / "f2"
    before, original = changed.stat(), changed.read_bytes()
    changed.write_text("CONTENT 2\n")
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))
    third = ask()
    assert not quickanswer.said_same(third, digest)
    answer = manifest.read_answer("local", third, len(items))
    assert [r.sha1 == s for r, s in zip(answer.files, sums)] == [i != 2 for i in range(5)]
    # a file removed since: the shell's stat stops at it (its complaint is no kept line) and
    # the program answers, the complaint printed nowhere
    changed.write_bytes(original)
    assert not quickanswer.said_same(ask(), digest)  # (the program: f2's stat is new)
    assert quickanswer.said_same(ask(), digest)
    (tmp_path / "dest" / "tree" / "f0").unlink()
    gone = subprocess.run(["sh", "-c", script], input=request + b"tail", capture_output=True,
                          check=True)
    assert not quickanswer.said_same(gone.stdout.decode(), digest)
    assert b"stat" not in gone.stderr and b"cannot" not in gone.stdout, gone
    answer = manifest.read_answer("local", gone.stdout.decode(), len(items))
    assert [r is not None and r.sha1 == s for r, s in zip(answer.files, sums)] == [i != 0 for i in range(5)]
    # another question (here: expecting something else) is never answered by the kept stat
    wrong = manifest.expectation(items, ["0" * 40] * 5)
    other = manifest.request(items, trees, index, dirs=plan.dirs, prepare=True, expect=wrong)
    run = subprocess.run(["sh", "-c", manifest.run_script(len(other), quickanswer.quick_for(
        other, items, trees, wrong))], input=other, capture_output=True, check=True).stdout.decode()
    assert not quickanswer.said_same(run, quickanswer.quick_ids(other, trees)[0])
    assert manifest.read_answer("local", run, len(items)) is not None


def test_with_files_sent_ahead_the_shell_names_the_answer_the_others_are_still_in(tmp_path,
                                                                                monkeypatch):
    """The edited-one-file rerun: every file not sent ahead is as an answer kept (by stat), so
    the shell names that answer and writes the files sent ahead beside their destination, as
    new files, reading exactly their bytes; this machine looks the name up in what it expected.
    A file not sent ahead changed behind the manifest's back sends the question to python3."""
    _local_tree(tmp_path, monkeypatch, 5)
    (tmp_path / "src" / "f1").chmod(0o640)
    plan = _local_plan(tmp_path / "src", tmp_path / "dest")
    sync.sync_host(Local(), None, plan)
    items = list(plan.files)
    trees, index = plan.tree_index(items)
    sums = [hashlib.sha1(open(u.src, "rb").read()).hexdigest() for u in items]
    said = manifest.expectation_text(items, sums)
    before = manifest.expectation(items, sums)
    expectations.keep(before, said)
    asked = manifest.request(items, trees, index, dirs=plan.dirs, prepare=True, expect=before)
    first = subprocess.run(["sh", "-c", manifest.run_script(len(asked), quickanswer.quick_for(
        asked, items, trees, before))], input=asked, capture_output=True, check=True).stdout.decode()
    assert manifest.read_answer("local", first, len(items)) is not None  # (keeps the stat)

    def ask_with_ahead(new_bytes, blocked=False):
        data = [new_bytes, b"CONTENT 3\n"]
        temps = [str(tmp_path / "dest" / "tree" / f".f{i}.rr-ab12cd3{i}.tmp") for i in (1, 3)]
        if blocked:
            os.mkdir(temps[0])  # (something of that name already there: not written)
        ahead = [(i, len(d), items[i].mode, t) for i, d, t in zip((1, 3), data, temps)]
        now = list(sums)
        now[1], now[3] = (hashlib.sha1(d).hexdigest() for d in data)
        expect = manifest.expectation(items, now)
        request = manifest.request(items, trees, index, dirs=plan.dirs, prepare=True,
                                   ahead=[(1, now[1], "ab12cd31"), (3, now[3], "ab12cd33")],
                                   ahead_bytes=sum(map(len, data)), expect=expect)
        quick = quickanswer.quick_for(request, items, trees, expect, ahead)
        script = "(\n" + manifest.run_script(len(request), quick, len(request) + 20) + \
            ")\nprintf 'REST:'; cat\n"
        out = subprocess.run(["sh", "-c", script], input=request + b"".join(data) + b"tail",
                             capture_output=True, check=True).stdout.decode()
        return out, temps

    out, temps = ask_with_ahead(b"CONTENT 1\n")
    assert quickanswer.said_state(out) == (before, [1, 3]) and out.endswith("REST:tail"), out
    assert [open(t, "rb").read() for t in temps] == [b"CONTENT 1\n", b"CONTENT 3\n"]
    assert [os.stat(t).st_mode & 0o777 for t in temps] == [0o640, 0o644]
    assert expectations.recall(before, 5) == [(u.size, u.mode, h) for u, h in zip(items, sums)]
    for t in temps:
        os.unlink(t)
    out, temps = ask_with_ahead(b"CONTENT 1\n", blocked=True)  # the first's bytes still read
    assert quickanswer.said_state(out) == (before, [3]) and out.endswith("REST:tail"), out
    assert open(temps[1], "rb").read() == b"CONTENT 3\n"
    os.rmdir(temps[0])
    os.unlink(temps[1])
    changed = tmp_path / "dest" / "tree" / "f2"  # not sent ahead: changed behind its back
    stat_before = changed.stat()
    changed.write_text("CONTENT 2\n")
    os.utime(changed, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    out, _ = ask_with_ahead(b"CONTENT 1\n")
    assert quickanswer.said_state(out) is None  # (python3 reads its stdin buffered: not the tail)
    answer = manifest.read_answer("local", out, len(items))
    assert answer is not None and answer.hashed == 1 and sorted(answer.staged) == [1, 3]


@pytest.mark.parametrize("meddled", [False, True])
def test_files_the_shell_wrote_ahead_keep_the_stat_current_once_renamed(tmp_path, monkeypatch,
                                                                        meddled):
    """The start renames what the shell wrote ahead and puts those files' new stat in the kept
    stat, under the answer this run expected: the next unchanged question is answered by the
    shell. A file written to meanwhile (here: the temporary, before its rename) leaves it to
    the program."""
    plan, items, trees, index, sums = _synced_tree(tmp_path, monkeypatch, 4)
    before = manifest.expectation(items, sums)
    expectations.keep(before, manifest.expectation_text(items, sums))
    asked = manifest.request(items, trees, index, dirs=plan.dirs, prepare=True, expect=before)
    subprocess.run(["sh", "-c", manifest.run_script(len(asked), quickanswer.quick_for(
        asked, items, trees, before))], input=asked, capture_output=True, check=True)
    data = b"CONTENT 2\n"
    temp = str(tmp_path / "dest" / "tree" / ".f2.rr-0badcafe.tmp")
    now = list(sums)
    now[2] = hashlib.sha1(data).hexdigest()
    expect = manifest.expectation(items, now)
    request = manifest.request(items, trees, index, dirs=plan.dirs, prepare=True,
                               ahead=[(2, now[2], "0badcafe")], ahead_bytes=len(data), expect=expect)
    quick = quickanswer.quick_for(request, items, trees, expect, [(2, len(data), items[2].mode, temp)])
    out = subprocess.run(["sh", "-c", manifest.run_script(len(request), quick)], input=request + data,
                         capture_output=True, check=True).stdout.decode()
    assert quickanswer.said_state(out) == (before, [2])
    following = manifest.request(items, trees, index, dirs=plan.dirs, prepare=True, expect=expect)
    first, then = quickanswer.placing_refresh(quick, quickanswer.quick_ids(following, trees)[0],
                                           [(2, temp, items[2].dest)])
    if meddled:
        with open(temp, "ab") as handle:
            handle.write(b"!")
    subprocess.run(["sh", "-c", first + f"mv -f -- {shlex.quote(temp)} {shlex.quote(items[2].dest)}\n"
                    + then], check=True)
    assert not list((tmp_path / "cache" / "remote-runner" / "manifests").glob("*.pending*"))
    next_quick = quickanswer.quick_for(following, items, trees, expect)
    out = subprocess.run(["sh", "-c", manifest.run_script(len(following), next_quick)],
                         input=following, capture_output=True, check=True).stdout.decode()
    assert quickanswer.said_same(out, next_quick.request) is not meddled, out


def test_a_host_naming_an_answer_this_machine_does_not_have_unchanged_is_not_believed(tmp_path,
                                                                                    monkeypatch):
    """Only this machine's own kept answers count: a name it does not have, a kept file
    changed since (its SHA-1 no longer its name) or about another number of files, and
    a garbled mark, are no answer."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    text = "3 420 " + "a" * 40 + "\n5 420 " + "b" * 40 + "\n"
    name = hashlib.sha1(text.encode()).hexdigest()
    expectations.keep(name, text)
    assert expectations.recall(name, 2) == [(3, 420, "a" * 40), (5, 420, "b" * 40)]
    assert expectations.recall(name, 3) is None
    assert expectations.recall("c" * 40, 2) is None and expectations.recall("../x", 2) is None
    with open(os.path.join(expectations.folder(), name), "w") as kept:
        kept.write(text.replace("3 420", "4 420"))
    assert expectations.recall(name, 2) is None
    for garbled in (f"RR-MANIFEST-STATE {name} x", f"RR-MANIFEST-STATE {name[:-1]}",
                    f"RR-MANIFEST-STATE {name} 1\nRR-MANIFEST-STATE {name}", "RR-MANIFEST-STATE",
                    f"RR-MANIFEST-STATE {name} \u0663"):
        assert quickanswer.said_state(garbled) is None, garbled
    assert quickanswer.said_state(f"x\nRR-MANIFEST-STATE {name} 0 2\n") == (name, [0, 2])


def test_kept_answers_are_bounded_the_oldest_go_first(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(expectations, "KEEP", 3)
    names = []
    for i in range(5):
        text = f"{i} 420 " + "a" * 40 + "\n"
        names.append(hashlib.sha1(text.encode()).hexdigest())
        expectations.keep(names[-1], text)
        os.utime(os.path.join(expectations.folder(), names[-1]), (1000 + i, 1000 + i))
    assert sorted(os.listdir(expectations.folder())) == sorted(names[2:])


def test_the_host_program_names_its_manifest_by_sha1_and_finds_tar_on_path(tmp_path):
    """The program loads no OpenSSL for a file name and no shutil for ``which``: the manifest
    keeps the name earlier runs gave it, and ``tar`` is found as a shell would."""
    import hashlib
    tree_dir = tmp_path / "tree"
    tree_dir.mkdir()
    (tree_dir / "f").write_bytes(b"x")
    bins = {name: tmp_path / name for name in ("with", "without")}
    for name, folder in bins.items():
        folder.mkdir()
        (folder / "tar").mkdir() if name == "without" else (folder / "tar").write_text("#!/bin/sh\n")
    (bins["with"] / "tar").chmod(0o755)
    request = json.dumps({"trees": [str(tree_dir)], "files": [[str(tree_dir / "f"), 1, 0o644, 0]],
                          "prepare": True, "stale": 60, "dirs": []}).encode()
    for name, folder in bins.items():
        env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": str(folder)}
        out = subprocess.run([sys.executable, "-I", "-S", "-c", manifest.HOST_PROGRAM], input=request,
                             capture_output=True, env=env, check=True).stdout.decode()
        answer = manifest.parse_answer(out.splitlines(), 1)
        assert answer is not None and answer.has_tar is (name == "with"), out
    expected = hashlib.sha1(f"{os.uname()[1]}\0{tree_dir}".encode()).hexdigest() + ".json"
    assert [p.name for p in (tmp_path / "cache" / "remote-runner" / "manifests").glob("*.json")] == [expected]


def test_the_host_program_imports_no_json_package_and_answers_alike_without_its_scanner(tmp_path):
    """Every host pays the program's imports on every run: ``json`` alone (with the re and enum
    it pulls in) was half of a warm check's CPU. The program uses CPython's scanner and encoder
    directly, and the json package only where they are missing, with the same answer."""
    tree = tmp_path / "tree"
    tree.mkdir()
    odd = os.fsencode(str(tree)) + b"/caf\xc3\xa9 \xff \"quoted\"\n"
    with open(odd, "wb") as handle:
        handle.write(b"data")
    (tree / "gone").mkdir()
    (tree / ".x.rr-ab12cd34.tmp").write_bytes(b"stale")
    os.utime(tree / ".x.rr-ab12cd34.tmp", (0, 0))
    names = [os.fsdecode(odd), str(tree / "missing"), str(tree / "gone")]
    request = json.dumps({"trees": [str(tree)], "files": [[n, 4, 0o644, 0] for n in names],
                          "prepare": True, "stale": 60, "dirs": []}).encode("utf-8", "surrogateescape")
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    answers = []
    for prelude in ("", "import sys; sys.modules['_json'] = None\n"):  # then: no _json here
        done = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", "-c",
                               prelude + manifest.HOST_PROGRAM], input=request, capture_output=True, env=env)
        assert done.returncode == 0, done.stderr
        imported = {line.split("|")[-1].strip() for line in done.stderr.decode().splitlines()
                    if line.startswith("import time:")}
        if prelude:
            assert "json" in imported, sorted(imported)
        else:
            assert not imported & {"json", "re", "enum"}, sorted(imported)
        answer = manifest.parse_answer(done.stdout.decode().splitlines(), 3)
        assert answer is not None and answer.saved, done.stdout
        answers.append(answer)
    first, second = answers
    assert first.files[0] is not None and first.files[0].sha1 == hashlib.sha1(b"data").hexdigest()
    assert first.files[1:] == [None, None] and (first.hashed, first.trusted) == (1, 0)
    assert not (tree / ".x.rr-ab12cd34.tmp").exists()  # swept as stale
    saved = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("*.json")]
    assert [list(doc["entries"]) for doc in saved] == [[os.fsdecode(odd)]]
    # The fallback reads the manifest the first run wrote and trusts its entry.
    assert second.files == first.files and (second.hashed, second.trusted) == (0, 1)


def test_a_file_read_whole_is_remembered_only_if_it_did_not_change_meanwhile(tmp_path):
    import hashlib
    cache = hashcache.LocalHashes(str(tmp_path / "cache"))
    path = tmp_path / "f"
    path.write_bytes(b"first\n")
    with open(path, "rb") as handle:
        before = hashcache.stat_key(os.fstat(handle.fileno()))
        data = handle.read()
        cache.remember(str(path), handle.fileno(), data, before)
    assert cache.known(str(path)) == hashlib.sha1(b"first\n").hexdigest()
    with open(path, "r+b") as handle:
        before = hashcache.stat_key(os.fstat(handle.fileno()))
        data = handle.read()
        handle.seek(0)
        handle.write(b"FIRST\n")  # written while (after) it was read: the read is not kept
        handle.flush()
        os.utime(handle.fileno(), ns=(1, 1))
        cache.remember(str(path), handle.fileno(), data, before)
    assert cache.known(str(path)) is None


def test_local_hashes_are_remembered_by_full_stat(tmp_path):
    cache = hashcache.LocalHashes(str(tmp_path / "cache"))
    path = tmp_path / "f"
    path.write_bytes(b"one")
    first = cache.sha1(str(path))
    cache.save()
    again = hashcache.LocalHashes(str(tmp_path / "cache"))
    assert again.known(str(path)) == first
    mtime = os.stat(path).st_mtime_ns
    path.write_bytes(b"two")  # same size, mtime put back: the ctime still moves
    os.utime(path, ns=(mtime, mtime))
    assert again.known(str(path)) is None
    assert again.sha1(str(path)) != first
    _bucket_file(tmp_path / "cache", path).write_text("{garbage")
    assert hashcache.LocalHashes(str(tmp_path / "cache")).known(str(path)) is None


def test_a_malformed_cache_entry_is_never_used_and_goes_at_the_next_rewrite(tmp_path, monkeypatch):
    import json
    path = tmp_path / "f"
    path.write_bytes(b"one")
    other = tmp_path / "g"
    other.write_bytes(b"two")
    key = list(hashcache.stat_key(os.stat(path)))
    cache_file = _bucket_file(tmp_path / "cache", path)
    cache_file.parent.mkdir()
    cache_file.write_text(json.dumps({"version": 1, "entries": {
        str(path): key + ["not a sha1"],              # the right stat, a bad hash
        str(other): [str(k) for k in key] + ["a" * 40]}}))  # ints as strings
    cache = hashcache.LocalHashes(str(tmp_path / "cache"))
    assert cache.known(str(path)) is None and cache.known(str(other)) is None
    assert cache.sha1(str(other)) == __import__("hashlib").sha1(b"two").hexdigest()
    monkeypatch.setattr(hashcache, "JOURNAL_MIN", 0)  # the new line outgrows the base: rewritten
    (tmp_path / "filler").write_bytes(b"x")
    for n in range(4):
        cache.sha1(str(tmp_path / "filler"), rehash=True)
        cache._new[str(tmp_path / f"gone{n}")] = key + ["b" * 40]
    cache.save()
    lines = cache_file.read_text().splitlines()
    kept = json.loads(lines[0])["entries"]
    assert len(lines) == 1 and str(path) not in kept and kept[str(other)][5] == cache.known(str(other))
    assert not any(name.startswith(str(tmp_path / "gone")) for name in kept)  # no such files


def test_a_save_appends_what_it_added_and_rewrites_once_the_journal_outgrows_the_base(tmp_path,
                                                                                   monkeypatch):
    import json
    cache_dir = tmp_path / "cache"
    files = []
    for n in range(6):
        files.append(tmp_path / f"f{n}")
        files[-1].write_bytes(b"%d" % n)
    cache = hashcache.LocalHashes(str(cache_dir))
    cache_file = _bucket_file(cache_dir, files[0])
    cache.sha1(str(files[0]))
    cache.save()  # no file yet: a base line
    assert len(cache_file.read_text().splitlines()) == 1
    base = cache_file.read_bytes()
    for f in files[1:3]:
        cache.sha1(str(f))
        cache.save()  # one journal line each; the base line is left as it was
    text = cache_file.read_bytes()
    assert text.startswith(base) and len(text.splitlines()) == 3
    again = hashcache.LocalHashes(str(cache_dir))
    assert [again.known(str(f)) for f in files[:3]] == [hashcache.hash_file(str(f))[0] for f in files[:3]]

    # A line cut short by a crash is skipped, and the next save starts a line of its own.
    with open(cache_file, "ab") as handle:
        handle.write(b'{"entries": {"' + str(files[5]).encode())
    cache.sha1(str(files[3]))
    cache.save()
    again = hashcache.LocalHashes(str(cache_dir))
    assert [again.known(str(f)) for f in files[:4]] == [hashcache.hash_file(str(f))[0] for f in files[:4]]
    assert again.known(str(files[5])) is None

    # Once the journal would outgrow the base, the save rewrites one merged, pruned base line.
    monkeypatch.setattr(hashcache, "JOURNAL_MIN", 0)
    files[0].unlink()
    cache.sha1(str(files[4]))
    cache.save()
    lines = cache_file.read_text().splitlines()
    assert len(lines) == 1
    assert set(json.loads(lines[0])["entries"]) == {str(f) for f in files[1:5]}


def _bucket_file(cache_dir, path):
    """The file of the local hash cache in *cache_dir* that holds *path*'s entry."""
    return cache_dir / (hashcache.bucket_of(str(path)) + ".json")


def test_the_local_hash_cache_reads_only_the_buckets_of_the_directories_looked_up(tmp_path):
    cache_dir = tmp_path / "cache"
    folders = [tmp_path / f"d{n}" for n in range(40)]
    for folder in folders:
        folder.mkdir()
        (folder / "f").write_bytes(folder.name.encode())
    buckets = {hashcache.bucket_of(str(folder / "f")) for folder in folders}
    assert len(buckets) > 20  # (by their directories' SHA-1s: spread)
    cache = hashcache.LocalHashes(str(cache_dir))
    digests = [cache.sha1(str(folder / "f")) for folder in folders]
    cache.save()
    assert sorted(p.stem for p in cache_dir.glob("*.json")) == sorted(buckets)
    again = hashcache.LocalHashes(str(cache_dir))
    assert again.known(str(folders[7] / "f")) == digests[7]
    assert list(again._loaded) == [hashcache.bucket_of(str(folders[7] / "f"))]
    # a garbage bucket costs only its own entries
    _bucket_file(cache_dir, folders[3] / "f").write_bytes(b"\x00 garbage")
    again = hashcache.LocalHashes(str(cache_dir))
    known = [again.known(str(folder / "f")) for folder in folders]
    lost = {n for n, sha1 in enumerate(known) if sha1 is None}
    assert 3 in lost and all(hashcache.bucket_of(str(folders[n] / "f"))
                             == hashcache.bucket_of(str(folders[3] / "f")) for n in lost)
    assert all(known[n] == digests[n] for n in range(40) if n not in lost)


def test_the_first_save_removes_the_single_cache_file_of_earlier_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    old = tmp_path / "xdg" / "remote-runner" / hashcache.OLD_FILE
    old.parent.mkdir(parents=True)
    old.write_text('{"version": 1, "entries": {}}\n')
    (tmp_path / "f").write_bytes(b"x")
    cache = hashcache.LocalHashes()
    cache.sha1(str(tmp_path / "f"))
    cache.save()
    assert not old.exists()
    assert hashcache.LocalHashes().known(str(tmp_path / "f")) == hashcache.hash_file(str(tmp_path / "f"))[0]


# --------------------------------------------------------------------------- lab

@pytest.fixture
def target(lab):
    """(connection, remote shell, base dir) on h2; the base dir is removed afterwards."""
    connection = Connection("h2", SSHOptions(ssh_config_file=lab.ssh_config)).connect()
    base = f"/tmp/rr-manifest-{uuid.uuid4().hex[:8]}"
    yield connection, RemoteShell(connection, "h2"), base
    connection.close()
    ssh(lab, "h2", f"rm -rf {base} {base}-bin", check=False)


def _files(tmp_path, count=20, big=0):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (src / "sub" / f"f{i:02d}.txt").write_text(f"file {i}\n")
    if big:
        (src / "big.bin").write_bytes(os.urandom(big))
    return src


def _plan(src, base, host="h2"):
    return sync.make_plan(host, [(FileSpec(str(src), ".", True), base)])


def _fresh_sync(lab, host, plan, **kw):
    """Sync *plan* over a new connection; return (report, that connection's counts)."""
    with Connection(host, SSHOptions(ssh_config_file=lab.ssh_config)) as connection:
        connection.connect()
        report = sync.sync_host(RemoteShell(connection, host), connection.sftp, plan, **kw)
        return report, connection.traffic.snapshot()


@pytest.mark.parametrize("host", ["h2", "h9"])
def test_a_warm_sync_is_one_exec_that_reads_no_file(lab, foreign_host, tmp_path, host):
    base = f"/tmp/rr-manifest-{uuid.uuid4().hex[:8]}"
    try:
        src = _files(tmp_path, big=3 << 20)
        plan = _plan(src, base, host)
        cold, _ = _fresh_sync(lab, host, plan)
        assert len(cold.copied) == 21 and cold.hash_tool == "manifest"
        warm, counts = _fresh_sync(lab, host, plan)
        assert warm.copied == [] and len(warm.skipped) == 21
        assert counts == {"execs": 1, "steps": 0, "sftp_sessions": 0, "sftp_requests": 0}
        assert (warm.hashed, warm.trusted) == (0, 21)  # the host read no file
        assert hashcache.LOCAL.known(str(src / "big.bin")) is not None  # nor did we
        assert audit(lab, host, base)["bad"] == []
    finally:
        ssh(lab, host, f"rm -rf {base}", check=False)


def test_changes_behind_the_manifests_back_are_seen_and_copied(lab, target, tmp_path):
    connection, shell, base = target
    src = _files(tmp_path)
    plan = _plan(src, base)
    sync.sync_host(shell, connection.sftp, plan)
    f1, f2, f3 = (f"{base}/sub/f{i:02d}.txt" for i in (1, 2, 3))
    # Same size, mtime restored: only the ctime tells. Then a same-size file put in its place
    # (another inode, mtime copied), then a partly written one (zeros, same size).
    ssh(lab, "h2", f"m=$(stat -c %y {f1}); printf 'FILE 1\\n' > {f1}; touch -d \"$m\" {f1}; "
                   f"printf 'FILE 2\\n' > {f2}.new && touch -r {f2} {f2}.new && mv {f2}.new {f2}; "
                   f"m=$(stat -c %y {f3}); truncate -s 0 {f3}; truncate -s 7 {f3}; touch -d \"$m\" {f3}")
    report, counts = _fresh_sync(lab, "h2", plan)
    assert sorted(report.copied) == [f1, f2, f3]
    assert report.hashed == 3 and report.trusted == 17
    for i in (1, 2, 3):
        assert ssh(lab, "h2", f"cat {base}/sub/f{i:02d}.txt").stdout == f"file {i}\n"
    assert counts["execs"] == 2  # check, one bundle that also records them
    assert audit(lab, "h2", base)["bad"] == []
    again, _ = _fresh_sync(lab, "h2", plan)
    assert again.copied == [] and again.hashed == 0


def test_a_killed_copy_leaves_a_manifest_that_claims_only_whole_files(lab, target, tmp_path):
    connection, shell, base = target
    src = _files(tmp_path, count=2, big=4 << 20)
    plan = _plan(src, base)
    sync.sync_host(shell, connection.sftp, plan)
    old = ssh(lab, "h2", f"sha1sum {base}/big.bin").stdout.split()[0]
    (src / "big.bin").write_bytes(os.urandom(4 << 20))
    seen = [0]

    def cut(_host, delta):  # the link drops after the first megabyte of the new big.bin
        seen[0] += delta
        if seen[0] > 1 << 20:
            raise OSError("link dropped")

    with pytest.raises(CopyError):
        sync.sync_host(shell, connection.sftp, plan, progress=cut)
    assert ssh(lab, "h2", f"sha1sum {base}/big.bin").stdout.split()[0] == old
    state = audit(lab, "h2", base)
    assert state["bad"] == [] and f"{base}/big.bin" in state["entries"]
    # A manifest written for a file that is then replaced half-written never vouches for it.
    ssh(lab, "h2", f"m=$(stat -c %y {base}/big.bin); head -c 1048576 /dev/zero > {base}/big.x && "
                   f"truncate -s {4 << 20} {base}/big.x && touch -d \"$m\" {base}/big.x && "
                   f"mv {base}/big.x {base}/big.bin")
    report = sync.sync_host(shell, connection.sftp, plan)
    assert report.copied == [f"{base}/big.bin"]
    assert ssh(lab, "h2", f"sha1sum {base}/big.bin").stdout.split()[0] == \
        hashcache.hash_file(str(src / "big.bin"))[0]
    assert audit(lab, "h2", base)["bad"] == []


def test_two_runs_into_one_tree_at_once_keep_one_consistent_manifest(lab, tmp_path):
    tag = uuid.uuid4().hex[:8]
    base, screens = f"/tmp/rr-manifest-{tag}", [f"rrt-{tag}-a", f"rrt-{tag}-b"]
    configs, wanted = [], set()
    for name in ("a", "b"):
        src = tmp_path / name
        src.mkdir()
        for i in range(40):
            (src / f"{name}{i:02d}.txt").write_text(f"{name} {i}\n")
            wanted.add(f"{base}/{name}{i:02d}.txt")
        (src / "common.txt").write_text("shared by both\n")
        config = tmp_path / f"{name}.py"
        config.write_text(textwrap.dedent(f"""
            c = Component()
            c.name = 'copier-{name}'
            c.host = 'h3'
            c.executable = '/bin/true'
            c.base_dir = {base!r}
            c.files = util.recursive_files_dict({str(src)!r}, '.')
            c.start_index = 0
            config.add_component(c)
        """))
        configs.append(str(config))
    wanted.add(f"{base}/common.txt")
    try:
        for _ in range(2):  # a cold round, then one where both find everything in place
            procs = [subprocess.Popen([sys.executable, SCRIPT, "-c", config, "-F", lab.ssh_config,
                                       "--screen", screen, "--remote-done-dir",
                                       f"/tmp/{screen}-state", "-l", "WARNING"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=REPO)
                     for config, screen in zip(configs, screens)]
            for proc in procs:
                out, err = proc.communicate(timeout=300)
                assert proc.returncode == 0, err
            state = audit(lab, "h3", base)
            assert state["manifests"] == 1 and state["bad"] == []
            assert wanted <= set(state["entries"])
        for name in ("a", "b"):
            report, counts = _fresh_sync(lab, "h3", _plan(tmp_path / name, base, "h3"))
            assert report.copied == [] and report.hashed == 0 and counts["execs"] == 1
    finally:
        for screen in screens:
            quit_screen(lab, "h3", screen, f"/tmp/{screen}-state")
        ssh(lab, "h3", f"rm -rf {base}", check=False)


def test_without_python3_the_stat_and_openssl_check_still_works(lab, target, tmp_path, caplog):
    connection, shell, base = target
    tools = " ".join(f'"$(command -v {t})"' for t in
                     ("sh", "openssl", "stat", "mkdir", "chmod", "tar", "mv", "rm", "rmdir",
                      "find", "id", "cat", "sha1sum"))
    ssh(lab, "h2", f"mkdir -p {base}-bin && ln -sf {tools} {base}-bin/")
    limited = NoPython(shell, f"{base}-bin")
    caplog.set_level(logging.INFO, logger="remote_runner.sync")
    src = _files(tmp_path)
    plan = _plan(src, base)
    cold = sync.sync_host(limited, connection.sftp, plan)
    assert len(cold.copied) == 20 and cold.hash_tool == "openssl"
    (src / "sub" / "f05.txt").write_text("FILE 5\n")
    with Connection("h2", SSHOptions(ssh_config_file=lab.ssh_config)) as fresh:
        fresh.connect()
        report = sync.sync_host(NoPython(RemoteShell(fresh, "h2"), f"{base}-bin"), fresh.sftp, plan)
        execs = fresh.traffic.execs
    assert report.hash_tool == "openssl" and report.copied == [f"{base}/sub/f05.txt"]
    assert execs == 5  # the manifest attempt, stat, openssl, directories, one bundle
    assert ssh(lab, "h2", f"cat {base}/sub/f05.txt").stdout == "FILE 5\n"
    assert "no python3 there" in caplog.text
    assert audit(lab, "h2", base)["entries"] == []  # nothing recorded without python3


def test_rehash_reads_everything_again_and_always_copy_copies_everything(lab, target, tmp_path):
    connection, shell, base = target
    src = _files(tmp_path)
    plan = _plan(src, base)
    sync.sync_host(shell, connection.sftp, plan)
    rehashed = sync.sync_host(shell, connection.sftp, plan, rehash=True)
    assert (rehashed.hashed, rehashed.trusted, rehashed.copied) == (20, 0, [])
    always = sync.sync_host(shell, connection.sftp, plan, always_copy=True)
    assert len(always.copied) == 20
    after = sync.sync_host(shell, connection.sftp, plan)
    assert (after.hashed, after.trusted, after.copied) == (0, 20, [])  # recorded after copying
    assert audit(lab, "h2", base)["bad"] == []


class CopyPhase:
    """Counts each host's execs and SFTP sessions during a run's copy phase only."""

    def __init__(self) -> None:
        self.runner = None
        self.begin = {}
        self.spent = {}

    def emit(self, event) -> None:
        if event.phase != "copy" or self.runner is None:
            return
        now = {h: c.traffic.snapshot() for h, c in self.runner.connections.items()}
        if event.kind == ev.KIND_PHASE_BEGIN:
            self.begin = now
        elif event.kind == ev.KIND_PHASE_END:
            self.spent = {h: {k: now[h][k] - self.begin[h][k] for k in now[h]} for h in now}


def _counted_runs(lab, tmp_path, screen_name, base, rounds, component=None, big=1 << 20,
                  hosts=("h1", "h2")):
    """Run an experiment copying a tree into *base* on each of *hosts* once per round.

    *rounds* is a list of functions called before each run; each gets the
    run's report and its copy phase's counts after it. *component* gives a
    host's component text (default :func:`_component`), *big* the size of the
    tree's one big file (0: none).
    """
    state = f"/tmp/{screen_name}-state"
    src = _files(tmp_path, big=big)
    config = tmp_path / "experiment.py"
    config.write_text(textwrap.dedent("".join((component or _component)(h, src, base)
                                              for h in hosts)))
    experiment = load_experiment(str(config), None)
    options = RunOptions(screen=screen_name, remote_done_dir=state)
    ssh_options = SSHOptions(ssh_config_file=lab.ssh_config)
    try:
        for before, after in rounds:
            before(src)
            watch = CopyPhase()
            runner = Runner(experiment, options, ssh_options, reporter=watch)
            watch.runner = runner
            after(runner.run(), watch.spent)
    finally:
        for host in hosts:
            quit_screen(lab, host, screen_name, state, base)


def test_a_rerun_of_an_unchanged_experiment_is_one_round_trip_per_host_and_wave(lab, tmp_path,
                                                                                screen_name):
    """The change check rides on the session lock's channel: no exec of its own.

    A run is then the lock's exec (prepare + check) and one step on its shell per start wave;
    a file changed on the host behind the manifest's back (same size, mtime
    put back) is still found and copied again by that early check, also once
    the host answers it from its files' stat alone; the bundle that copied it
    answered that check as well, so the run after it is answered by the shell;
    an edited file sent ahead is written by the shell too, and its start keeps the
    kept stat current, so the next run is again answered by the shell.
    """
    base = f"/tmp/{screen_name}-base"
    nothing = lambda src: None  # noqa: E731

    def cold(report, spent):
        assert all(len(r.copied) == 21 for r in report.sync.values()), report.sync

    def warm(report, spent, quick=False):
        assert all(r.copied == [] and r.hashed == 0 for r in report.sync.values())
        assert spent == {h: {"execs": 0, "steps": 0, "sftp_sessions": 0, "sftp_requests": 0}
                         for h in ("h1", "h2")}
        assert {h: (report.traffic[h]["execs"], report.traffic[h]["steps"])
                for h in ("h1", "h2")} == {"h1": (1, 1), "h2": (1, 1)}
        # once a request said what it expected (every local SHA-1 known: after the first warm
        # run) and got it, the program kept its files' stat: the next one is answered by it
        assert [r.quick for _, r in sorted(report.sync.items())] == [quick, quick]

    def tamper(src):
        target = f"{base}/data/sub/f03.txt"
        ssh(lab, "h2", f"m=$(stat -c %y {target}) && printf 'FILE 3\\n' > {target} && "
                       f"touch -d \"$m\" {target}")

    def repaired(report, spent):
        assert report.sync["h2"].copied == [f"{base}/data/sub/f03.txt"], report.sync["h2"]
        assert report.sync["h1"].copied == []
        assert ssh(lab, "h2", f"cat {base}/data/sub/f03.txt").stdout == "file 3\n"

    def quick(report, spent):
        warm(report, spent, quick=True)

    def edit(src):
        (src / "sub" / "f05.txt").write_text("FILE 5, edited\n")

    def edited(report, spent):
        # the edited file went ahead with the check; each host's shell found every other
        # file as the last answer had them, wrote it beside its destination, and the start
        # put it in place: no python3, and nothing in the copy phase
        assert all(r.copied == [f"{base}/data/sub/f05.txt"] and r.quick
                   for r in report.sync.values()), report.sync
        assert all(spent[h]["execs"] + spent[h]["steps"] == 0 for h in ("h1", "h2")), spent
        for host in ("h1", "h2"):
            assert ssh(lab, host, f"cat {base}/data/sub/f05.txt; ls -a {base}/data/sub | "
                                  "grep -c rr- || true").stdout == "FILE 5, edited\n0\n"

    _counted_runs(lab, tmp_path, screen_name, base,
                  [(nothing, cold), (nothing, warm), (nothing, warm), (nothing, quick),
                   (tamper, repaired), (nothing, quick), (edit, edited), (nothing, quick)])


def test_a_first_copy_is_answered_by_the_hosts_shell_and_so_is_the_run_after_it(lab, tmp_path,
                                                                                 screen_name):
    """Files listed one by one (SPAR's ``util.recursive_files_dict``) going where none of them
    is yet: each host's shell answers the lock's check (none there: no python3) and the copy
    lands every file whole. A file then removed on one host is found missing by the program
    and copied again; a tree removed whole is the shell's again, and, once this machine
    knows its files' SHA-1s, the bundle that copied it answered the next run's check, which
    the shell then answers from the files' stat."""
    base = f"/tmp/{screen_name}-base"
    nothing = lambda src: None  # noqa: E731

    def absent(report, spent, hosts=("h1", "h2")):
        for host in hosts:
            done = report.sync[host]
            assert done.absent and not done.quick and len(done.copied) == 20, done
            assert ssh(lab, host, f"cat {base}/data/sub/f00.txt {base}/data/sub/f19.txt").stdout == \
                "file 0\nfile 19\n"

    def warm(report, spent):  # (the first run could not say what it expected: sources new here)
        assert all(not r.absent and r.trusted == 20 and r.copied == [] for r in report.sync.values())

    def quick(report, spent):
        assert all(r.quick and not r.absent and r.copied == [] for r in report.sync.values()), report.sync

    def remove_one(src):
        ssh(lab, "h2", f"rm {base}/data/sub/f07.txt")

    def one_again(report, spent):
        assert report.sync["h2"].copied == [f"{base}/data/sub/f07.txt"] and not report.sync["h2"].absent
        assert report.sync["h1"].copied == [] and report.sync["h1"].quick
        assert ssh(lab, "h2", f"cat {base}/data/sub/f07.txt").stdout == "file 7\n"

    def remove_tree(src):
        ssh(lab, "h1", f"rm -rf {base}/data")

    def tree_again(report, spent):
        absent(report, spent, ("h1",))
        assert report.sync["h2"].copied == [] and report.sync["h2"].quick

    _counted_runs(lab, tmp_path, screen_name, base,
                  [(nothing, absent), (nothing, warm), (nothing, quick), (remove_one, one_again),
                   (nothing, quick), (remove_tree, tree_again), (nothing, quick)],
                  component=lambda host, src, base: _component(host, src, base, one_by_one=True),
                  big=0)


def test_the_run_after_a_copy_of_streamed_and_bundled_files_is_answered_by_the_shell(lab, tmp_path,
                                                                                     screen_name):
    """A copy with a large file (streamed to a receiver) beside small ones (a bundle) ends with
    one record; when the check said what it expected (this machine knew every SHA-1), that
    record answers the check again, as expected, so the next run's is the host's shell's
    (no python3), as after a copy that is one bundle."""
    base = f"/tmp/{screen_name}-base"
    nothing = lambda src: None  # noqa: E731

    def copied_all(report, spent):
        assert all(len(r.copied) == 21 and not r.quick for r in report.sync.values()), report.sync

    def not_copied(report, spent):
        assert all(r.copied == [] for r in report.sync.values()), report.sync

    def quick(report, spent):
        assert all(r.quick and r.copied == [] for r in report.sync.values()), report.sync
        for host in ("h1", "h2"):  # (and the files are whole)
            assert ssh(lab, host, f"stat -c %s {base}/data/big.bin; cat {base}/data/sub/f19.txt"
                       ).stdout == f"{1 << 20}\nfile 19\n"

    def remove_trees(src):
        for host in ("h1", "h2"):
            ssh(lab, host, f"rm -rf {base}/data")

    _counted_runs(lab, tmp_path, screen_name, base,
                  [(nothing, copied_all), (nothing, not_copied), (remove_trees, copied_all),
                   (nothing, quick)])


@pytest.mark.parametrize("release", ["11", "13"])
def test_a_first_copy_to_another_release_is_answered_by_its_shell(lab, request, tmp_path, screen_name,
                                                                    release):
    """The shell's "none there" on hosts that are no copy of this machine (Debian 11 and 13:
    their own sh, stat and mkdir): a first copy, then the same files again (the program
    answers, nothing copied), then the tree removed and copied whole again."""
    host = request.getfixturevalue("foreign_host" if release == "11" else "newer_host")
    base = f"/tmp/{screen_name}-base"
    nothing = lambda src: None  # noqa: E731

    def absent(report, spent):
        done = report.sync[host]
        assert done.absent and len(done.copied) == 20, done
        assert ssh(lab, host, f"cat {base}/data/sub/f13.txt").stdout == "file 13\n"

    def warm(report, spent):
        assert not report.sync[host].absent and report.sync[host].copied == []

    _counted_runs(lab, tmp_path, screen_name, base,
                  [(nothing, absent), (nothing, warm),
                   (lambda src: ssh(lab, host, f"rm -rf {base}/data"), absent)],
                  component=lambda h, src, b: _component(h, src, b, one_by_one=True), big=0,
                  hosts=(host,))


def test_a_base_dir_behind_a_symlink_is_checked_again_under_its_real_path(lab, tmp_path,
                                                                         screen_name):
    """An early answer about another name for the tree is dropped, never trusted."""
    real, link = f"/tmp/{screen_name}-real", f"/tmp/{screen_name}-link"
    for host in ("h1", "h2"):
        ssh(lab, host, f"mkdir -p {real} && ln -sfn {real} {link}")

    def cold(report, spent):
        assert all(len(r.copied) == 21 for r in report.sync.values()), report.sync

    def warm(report, spent):
        assert all(r.copied == [] for r in report.sync.values()), report.sync
        # the copy step asked again, under the path the host resolved
        # asked again: one step on the lock's shell, no exec
        assert all(spent[h]["execs"] + spent[h]["steps"] == 1 for h in ("h1", "h2")), spent

    try:
        _counted_runs(lab, tmp_path, screen_name, link,
                      [(lambda src: None, cold), (lambda src: None, warm)])
        for host in ("h1", "h2"):
            assert ssh(lab, host, f"cat {real}/data/sub/f07.txt").stdout == "file 7\n"
    finally:
        for host in ("h1", "h2"):
            ssh(lab, host, f"rm -rf {real} {link}", check=False)

def _run_config(lab, tmp_path, screen_name, name, body):
    """Run the experiment *body* (config text) with the lab's ssh config; return the runner."""
    config = tmp_path / f"{name}.py"
    config.write_text(textwrap.dedent(body))
    watch = CopyPhase()
    runner = Runner(load_experiment(str(config), None),
                    RunOptions(screen=screen_name, remote_done_dir=f"/tmp/{screen_name}-state"),
                    SSHOptions(ssh_config_file=lab.ssh_config), reporter=watch)
    watch.runner = runner
    return runner, watch


def _component(host, src, base, one_by_one=False):
    """Config text of a component on *host* sleeping, with *src* copied to *base*/data: as a
    directory, or *one_by_one* as its files (SPAR's ``util.recursive_files_dict``)."""
    files = (f"util.recursive_files_dict({str(src)!r}, 'data')" if one_by_one
             else f"{{{str(src)!r}: 'data'}}")
    return f"""
        c = Component()
        c.name = 'sleeper-{host}'
        c.host = '{host}'
        c.executable = '/bin/sleep'
        c.args = ['600']
        c.base_dir = {base!r}
        c.files = {files}
        c.start_index = 0
        config.add_component(c)
    """


def test_a_file_edited_here_rides_with_the_check_and_the_start_renames_it(lab, tmp_path,
                                                                          screen_name):
    """The everyday rerun (one file edited) costs no copy step: lock + check, then the start.

    The edited file travels with the change check, is staged beside its
    destination and renamed into place by the host's start command; nothing
    temporary is left, and the host's next check finds it as copied.
    """
    base = f"/tmp/{screen_name}-base"
    src = _files(tmp_path)
    body = "".join(_component(h, src, base) for h in ("h1", "h2"))
    try:
        runner, _ = _run_config(lab, tmp_path, screen_name, "cold", body)
        assert all(len(r.copied) == 20 for r in runner.run().sync.values())
        # (the cold copy's bundles told the local hash cache what they read)
        (src / "sub" / "f05.txt").write_text("edited here\n")
        runner, watch = _run_config(lab, tmp_path, screen_name, "edited", body)
        report = runner.run()
        assert {h: r.copied for h, r in report.sync.items()} == {
            h: [f"{base}/data/sub/f05.txt"] for h in ("h1", "h2")}
        assert all(r.placed == [f"{base}/data/sub/f05.txt"] for r in report.sync.values())
        # no exec and no step of its own for the copy: the lock's exec and one start step
        assert watch.spent == {h: {"execs": 0, "steps": 0, "sftp_sessions": 0, "sftp_requests": 0}
                               for h in ("h1", "h2")}
        assert {h: (report.traffic[h]["execs"], report.traffic[h]["steps"])
                for h in ("h1", "h2")} == {"h1": (1, 1), "h2": (1, 1)}
        for host in ("h1", "h2"):
            assert ssh(lab, host, f"cat {base}/data/sub/f05.txt").stdout == "edited here\n"
            assert ssh(lab, host, f"ls -a {base}/data/sub | grep -c rr- || true").stdout.strip() == "0"
        runner, _ = _run_config(lab, tmp_path, screen_name, "warm", body)
        assert all(r.copied == [] for r in runner.run().sync.values())
    finally:
        for host in ("h1", "h2"):
            quit_screen(lab, host, screen_name, f"/tmp/{screen_name}-state", base)


def test_a_run_that_fails_before_its_start_leaves_the_files_sent_ahead_out_of_place(
        lab, tmp_path, screen_name):
    """h2 cannot be prepared, so the run stops before any start: h1 keeps its old file."""
    base = f"/tmp/{screen_name}-base"
    src = _files(tmp_path)
    good = _component("h1", src, base)
    try:
        for name in ("cold", "warm"):
            runner, _ = _run_config(lab, tmp_path, screen_name, name, good)
            runner.run()
        (src / "sub" / "f05.txt").write_text("edited here\n")
        runner, _ = _run_config(lab, tmp_path, screen_name, "broken",
                                good + _component("h2", src, "/proc/rr-no-such-base"))
        with pytest.raises(RunnerError):
            runner.run()
        assert ssh(lab, "h1", f"cat {base}/data/sub/f05.txt").stdout == "file 5\n"
        assert ssh(lab, "h1", f"ls -a {base}/data/sub | grep -c rr- || true").stdout.strip() == "0"
        runner, _ = _run_config(lab, tmp_path, screen_name, "again", good)
        assert runner.run().sync["h1"].placed == [f"{base}/data/sub/f05.txt"]
        assert ssh(lab, "h1", f"cat {base}/data/sub/f05.txt").stdout == "edited here\n"
    finally:
        quit_screen(lab, "h1", screen_name, f"/tmp/{screen_name}-state", base)


def test_a_file_staged_for_a_runs_start_outlives_the_sweep_of_upload_leftovers(tmp_path):
    """Another run's sweep removes upload temporaries untouched for 10 minutes, but a file staged
    at a check waits for its own run's start however long that run's copy takes (a day)."""
    from remote_runner.hostdigest import _sweep_script
    from remote_runner.upload import STAGED_MARK, staged_token
    token = staged_token()
    assert token.startswith(STAGED_MARK) and len(token) == 8
    for how in ("program", "shell"):
        tree = tmp_path / how
        tree.mkdir()
        left, staged, old_staged = (tree / ".a.rr-ab12cd34.tmp", tree / f".b.rr-{token}.tmp",
                                    tree / f".c.rr-{staged_token()}.tmp")
        for path, minutes in ((left, 11), (staged, 11), (old_staged, 24 * 60 + 1)):
            path.write_bytes(b"x")
            then = time.time() - minutes * 60
            os.utime(path, (then, then))
        if how == "program":
            request = json.dumps({"trees": [str(tree)], "files": [[str(tree / "f"), 1, 0o644, 0]],
                                  "prepare": True, "stale": 10, "staged_stale": 24 * 60,
                                  "staged_mark": STAGED_MARK, "dirs": []}).encode()
            done = _host_program(tmp_path, request)
        else:
            done = subprocess.run(["sh", "-c", _sweep_script([str(tree)])], capture_output=True)
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in tree.iterdir()) == [staged.name], how
