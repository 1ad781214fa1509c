"""File sync: plans (pure), hashing (local shell with a trimmed PATH), uploads on lab hosts.

Lab checks read the result back through the system OpenSSH client, so they do
not rely on the code under test to tell them what is on the host.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from remote_runner import bundle, manifest, sync
from remote_runner.config import FileSpec
from remote_runner.errors import CopyError
from remote_runner.shell import LocalShell, RemoteShell, ScriptResult
from remote_runner.ssh import Connection, SSHOptions
from tests.conftest import ssh


class PathShell:
    """A real shell whose PATH is replaced (to hide openssl)."""

    def __init__(self, inner, path: str) -> None:
        self.inner = inner
        self.host = inner.host
        self.path = path

    def script(self, text: str, timeout: float) -> ScriptResult:
        return self.inner.script(f"PATH={self.path}; export PATH\n{text}", timeout)


def tree(tmp_path):
    """A local tree: an executable, a data file and a nested directory."""
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "run.sh").write_text("#!/bin/sh\necho run\n")
    (src / "run.sh").chmod(0o755)
    (src / "data.txt").write_text("data\n")
    (src / "sub" / "deeper" / "x y.txt").write_text("spaced\n")
    (src / "sub").chmod(0o750)
    return src


def test_plan_joins_base_dir_expands_dirs_and_merges_duplicates(tmp_path):
    src = tree(tmp_path)
    entries = [
        (FileSpec(str(src / "run.sh"), "bin/run.sh", False), "/base"),
        (FileSpec(str(src / "run.sh"), "/base/bin/run.sh", False), "/other"),  # same pair again
        (FileSpec(str(src / "sub"), "tree", True), "/base"),
        (FileSpec(str(src / "data.txt"), "/abs/data.txt", False), "/base"),
    ]
    plan = sync.make_plan("h1", entries)
    dests = [f.dest for f in plan.files]
    assert dests == ["/abs/data.txt", "/base/bin/run.sh", "/base/tree/deeper/x y.txt"]
    modes = dict(plan.dirs)
    assert modes["/base/tree"] == 0o750 and "/base/tree/deeper" in modes
    assert modes["/base/bin"] is None
    assert {f.dest: f.mode for f in plan.files}["/base/bin/run.sh"] == 0o755


def test_plan_refuses_two_sources_for_one_destination(tmp_path):
    src = tree(tmp_path)
    entries = [(FileSpec(str(src / "run.sh"), "x", False), "/b"),
               (FileSpec(str(src / "data.txt"), "/b/x", False), "/c")]
    with pytest.raises(CopyError) as info:
        sync.make_plan("h2", entries)
    assert info.value.host == "h2" and "/b/x" in str(info.value)


def test_a_plan_memo_stats_files_once_for_every_host_with_the_same_files(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(5):
        (src / "d" / f"f{i}").write_bytes(b"x" * i)
    entries = [(FileSpec(str(src / "d"), "d", True), "/opt/run")]
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: calls.append(path) or real_stat(path, *a, **k))
    memo = sync.PlanMemo()
    first = memo.plan("h1", entries)
    stats = len(calls)
    second = memo.plan("h2", list(entries))
    assert len(calls) == stats and stats >= 5
    assert (first.host, second.host) == ("h1", "h2")
    assert second.files == first.files and second.dirs == first.dirs and second.trees == first.trees
    other = memo.plan("h3", [(FileSpec(str(src / "d"), "d", True), "/opt/other")])
    assert len(calls) > stats and other.files[0].dest.startswith("/opt/other/d/")


def test_one_sync_takes_each_local_hash_once_for_all_hosts(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"one")
    sums = {}
    first = sync.local_sha1(str(path), sums=sums)
    monkeypatch.setattr(sync.hashcache.LOCAL, "sha1", lambda *a, **k: pytest.fail("hashed again"))
    assert sync.local_sha1(str(path), sums=sums) == first == sums[str(path)]


def test_remote_sha1_parses_openssl_and_falls_back_to_sha1sum(tmp_path, caplog):
    files = []
    for name in ("a", "with space", "*star"):
        path = tmp_path / name
        path.write_bytes(os.urandom(100))
        files.append(str(path))
    files.append(str(tmp_path / "missing"))
    hashes, tool = sync.remote_sha1(LocalShell(), files)
    assert tool == "openssl"
    for path in files[:3]:
        assert hashes[path] == sync.local_sha1(path)
    assert files[3] not in hashes
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("sha1sum"), bin_dir / "sha1sum")
    hashes, tool = sync.remote_sha1(PathShell(LocalShell(), str(bin_dir)), files)
    assert tool == "sha1sum"
    for path in files[:3]:
        assert hashes[path] == sync.local_sha1(path)
    os.unlink(bin_dir / "sha1sum")
    os.symlink(os.path.realpath(sys.executable), bin_dir / "python3")
    hashes, tool = sync.remote_sha1(PathShell(LocalShell(), str(bin_dir)), files)
    assert tool == "python3"
    for path in files[:3]:
        assert hashes[path] == sync.local_sha1(path)
    assert files[3] not in hashes
    os.unlink(bin_dir / "python3")
    assert sync.remote_sha1(PathShell(LocalShell(), str(bin_dir)), files) == ({}, "none")


# --------------------------------------------------------------------------- lab

@pytest.fixture
def host(lab):
    """(shell, sftp, remote base dir) on h2; the base dir is removed afterwards."""
    connection = Connection("h2", SSHOptions(ssh_config_file=lab.ssh_config)).connect()
    base = f"/tmp/rr-sync-{uuid.uuid4().hex[:8]}"
    yield RemoteShell(connection, "h2"), connection.sftp(), base
    connection.close()
    ssh(lab, "h2", f"rm -rf {base}", check=False)


def plan_for(src, base):
    return sync.make_plan("h2", [(FileSpec(str(src / "run.sh"), "bin/run.sh", False), base),
                                 (FileSpec(str(src / "data.txt"), "data.txt", False), base),
                                 (FileSpec(str(src / "sub"), "tree", True), base)])


def test_sync_copies_then_skips_unchanged(lab, host, tmp_path):
    shell, sftp, base = host
    src = tree(tmp_path)
    first = sync.sync_host(shell, sftp, plan_for(src, base))
    assert len(first.copied) == 3 and first.skipped == []
    listing = ssh(lab, "h2", f"cd {base} && find . -printf '%p %m\\n' | sort").stdout
    assert "./bin/run.sh 755" in listing
    assert "./tree 750" in listing
    assert "./tree/deeper/x y.txt 644" in listing
    assert ssh(lab, "h2", f"cat '{base}/tree/deeper/x y.txt'").stdout == "spaced\n"
    second = sync.sync_host(shell, sftp, plan_for(src, base))
    assert second.copied == [] and len(second.skipped) == 3 and second.bytes == 0
    assert ".rr-" not in ssh(lab, "h2", f"find {base}").stdout


def test_same_size_content_change_and_mode_change_are_copied(lab, host, tmp_path):
    shell, sftp, base = host
    src = tree(tmp_path)
    sync.sync_host(shell, sftp, plan_for(src, base))
    (src / "data.txt").write_text("DATA\n")  # same size, other content: only SHA1 tells
    (src / "run.sh").chmod(0o700)
    report = sync.sync_host(shell, sftp, plan_for(src, base))
    assert sorted(report.copied) == [f"{base}/bin/run.sh", f"{base}/data.txt"]
    assert ssh(lab, "h2", f"cat {base}/data.txt").stdout == "DATA\n"
    assert ssh(lab, "h2", f"stat -c %a {base}/bin/run.sh").stdout.strip() == "700"
    always = sync.sync_host(shell, sftp, plan_for(src, base), always_copy=True)
    assert len(always.copied) == 3


def test_missing_openssl_falls_back_to_sha1sum_with_warning(lab, host, tmp_path, caplog):
    shell, sftp, base = host
    src = tree(tmp_path)
    sync.sync_host(shell, sftp, plan_for(src, base))
    ssh(lab, "h2", f"mkdir -p {base}-bin && ln -sf \"$(command -v sha1sum)\" {base}-bin/sha1sum "
                   f"&& ln -sf \"$(command -v mkdir)\" {base}-bin/mkdir "
                   f"&& ln -sf \"$(command -v chmod)\" {base}-bin/chmod")
    try:
        limited = PathShell(shell, f"{base}-bin")
        with caplog.at_level(logging.WARNING, logger="remote_runner.sync"):
            report = sync.sync_host(limited, sftp, plan_for(src, base))
        assert report.hash_tool == "sha1sum"
        assert report.copied == [] and len(report.skipped) == 3
        assert any("openssl is not installed" in r.getMessage() for r in caplog.records)
    finally:
        ssh(lab, "h2", f"rm -rf {base}-bin", check=False)


def test_running_executable_is_replaced(lab, host, tmp_path):
    shell, sftp, base = host
    exe = tmp_path / "prog"
    shutil.copy2(shutil.which("sleep"), exe)
    plan = sync.make_plan("h2", [(FileSpec(str(exe), "prog", False), base)])
    sync.sync_host(shell, sftp, plan)
    ssh(lab, "h2", f"cd {base} && (./prog 600 </dev/null >/dev/null 2>&1 & echo $! > pid)")
    try:
        with open(exe, "ab") as handle:
            handle.write(b"\0changed")
        report = sync.sync_host(shell, sftp, sync.make_plan(
            "h2", [(FileSpec(str(exe), "prog", False), base)]))
        assert report.copied == [f"{base}/prog"]
        assert ssh(lab, "h2", f"tail -c 7 {base}/prog").stdout == "changed"
        assert ssh(lab, "h2", f"kill -0 $(cat {base}/pid)", check=False).returncode == 0
    finally:
        ssh(lab, "h2", f"kill $(cat {base}/pid)", check=False)


def test_failed_upload_leaves_no_temporary_file(lab, host, tmp_path):
    shell, sftp, base = host
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    plan = sync.make_plan("h2", [(FileSpec(str(big), "big.bin", False), base)])

    def explode(_host, _delta):
        raise OSError("link dropped")

    with pytest.raises(CopyError) as info:
        sync.sync_host(shell, sftp, plan, progress=explode)
    assert info.value.host == "h2" and "big.bin" in str(info.value)
    assert ssh(lab, "h2", f"ls -A {base}").stdout == ""


def test_sync_all_runs_hosts_in_parallel_and_aggregates(lab, tmp_path):
    src = tree(tmp_path)
    base = f"/tmp/rr-syncall-{uuid.uuid4().hex[:8]}"
    conns = {h: Connection(h, SSHOptions(ssh_config_file=lab.ssh_config)).connect()
             for h in ("h1", "h2", "h3")}
    try:
        jobs = [(RemoteShell(c, h), c.sftp, sync.make_plan(h, [
            (FileSpec(str(src / "data.txt"), "data.txt", False), base)])) for h, c in conns.items()]
        reports = sync.sync_all(jobs, forks=2)
        assert {h: len(r.copied) for h, r in reports.items()} == {"h1": 1, "h2": 1, "h3": 1}
        for h in conns:
            assert ssh(lab, h, f"cat {base}/data.txt").stdout == "data\n"
    finally:
        for h, c in conns.items():
            c.close()
            ssh(lab, h, f"rm -rf {base}", check=False)


def test_many_files_go_through_parallel_sftp_lanes(lab, host, tmp_path):
    import paramiko

    shell, sftp, base = host
    src = tmp_path / "many"
    for i in range(60):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i:03d}").write_bytes(os.urandom(4096))
    opened = []

    def open_lane():
        opened.append(paramiko.SFTPClient.from_transport(sftp.get_channel().get_transport()))
        return opened[-1]

    plan = sync.make_plan("h2", [(FileSpec(str(src), "many", True), base)])
    report = sync.sync_host(shell, sftp, plan, open_lane=open_lane, small_file=0)
    assert len(report.copied) == 60 and len(opened) == sync.LANES - 1
    local = {f"{base}/many/{p.relative_to(src)}": sync.local_sha1(str(p))
             for p in src.rglob("f*")}
    remote, _ = sync.remote_sha1(shell, sorted(local))
    assert remote == local
    assert ".rr-" not in ssh(lab, "h2", f"find {base}").stdout
    assert all(client.sock.closed for client in opened)

    def explode(_host, _delta):
        raise OSError("link dropped")

    for p in src.rglob("f*"):
        p.write_bytes(os.urandom(4096))
    with pytest.raises(CopyError):
        sync.sync_host(shell, sftp, plan, progress=explode, open_lane=open_lane, small_file=0)
    assert ".rr-" not in ssh(lab, "h2", f"find {base}").stdout


def test_small_files_travel_in_tar_bundles_renamed_into_place(lab, host, tmp_path):
    shell, sftp, base = host
    src = tmp_path / "small"
    names = ["plain", ".hidden", "-dash", "sp ace", "ünï", "x" * 150]
    (src / "sub").mkdir(parents=True)
    for i, name in enumerate(names):
        (src / name).write_bytes(os.urandom(100 + i))
        (src / "sub" / name).write_bytes(os.urandom(50 + i))
    (src / "plain").chmod(0o750)
    (src / "sub" / "plain").chmod(0o600)
    plan = sync.make_plan("h2", [(FileSpec(str(src), "small", True), base)])
    bundles_before = len(sync.bundles(plan.files))
    assert bundles_before == 1  # one for both destination directories
    report = sync.sync_host(shell, sftp, plan)
    assert len(report.copied) == 2 * len(names)
    local = {f"{base}/small/{p.relative_to(src)}": sync.local_sha1(str(p))
             for p in src.rglob("*") if p.is_file()}
    assert sync.remote_sha1(shell, sorted(local))[0] == local
    modes = ssh(lab, "h2", f"stat -c '%a %n' {base}/small/plain {base}/small/sub/plain "
                           f"{base}/small/.hidden").stdout.split("\n")
    assert modes[:3] == [f"750 {base}/small/plain", f"600 {base}/small/sub/plain",
                         f"644 {base}/small/.hidden"]
    assert ".rr-" not in ssh(lab, "h2", f"find {base}").stdout
    again = sync.sync_host(shell, sftp, plan)
    assert again.copied == [] and len(again.skipped) == 2 * len(names)


def test_several_bundles_are_written_at_once_and_recorded_once_reading_no_file_again(
        lab, host, tmp_path, monkeypatch):
    """Bundles of one copy each answer their files' receipts instead of each rewriting the
    host's manifest under its lock; the copy's one record takes every hash from them."""
    from tests.test_manifest import audit
    shell, sftp, base = host
    src = tmp_path / "many"
    for i in range(2500):  # two bundles
        (src / f"d{i // 500}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i // 500}" / f"f{i:04d}").write_text(f"file {i}\n")
    plan = sync.make_plan("h2", [(FileSpec(str(src), "many", True), base)])
    assert len(sync.bundles(list(plan.files))) == 2
    records = []
    real_record = sync.record
    monkeypatch.setattr(sync, "record", lambda *a, **k: records.append(real_record(*a, **k)) or records[-1])
    report = sync.sync_host(shell, sftp, plan)
    assert len(report.copied) == 2500
    [answer] = records
    assert (len(answer.files), answer.received, answer.hashed) == (2500, 2500, 0)
    assert ssh(lab, "h2", f"cat {base}/many/d4/f2499").stdout == "file 2499\n"
    book = audit(lab, "h2", base)
    assert book["bad"] == [] and len(book["entries"]) == 2500
    warm = sync.sync_host(shell, sftp, plan)
    assert (warm.copied, warm.trusted) == ([], 2500)


def test_bundles_span_directories_within_their_bounds():
    def up(dest, size=10):
        return sync.Upload("/l" + dest, dest, 0o644, size)
    three = [up(f"/d/{d}/f{i}") for d in "abc" for i in range(5)]
    assert sync.bundles(three) == [sorted(three, key=lambda u: u.dest)]
    many = [up(f"/d/a/f{i:03d}") for i in range(sync.BUNDLE_FILES + 1)]
    assert [len(b) for b in sync.bundles(many)] == [sync.BUNDLE_FILES, 1]
    heavy = [up(f"/d/a/f{i}", sync.BUNDLE_BYTES // 2) for i in range(3)]
    assert [len(b) for b in sync.bundles(heavy)] == [2, 1]
    deep = "/d/" + "x" * 3000
    wide = [up(f"{deep}/{i:03d}/f") for i in range(100)]  # one file each in 100 long directories
    chunks = sync.bundles(wide)
    assert len(chunks) > 1 and sum(len(c) for c in chunks) == 100
    for chunk in chunks:  # within the script's bound: each file's path ~3 times, each directory's ~4
        dirs = {posixpath.dirname(u.dest) for u in chunk}
        assert (sum(3 * (len(u.dest) + 25) for u in chunk)
                + sum(4 * (len(d) + 30) for d in dirs)) <= sync.BUNDLE_SCRIPT


def test_a_bundled_source_is_read_whole_checked_against_the_plan_and_its_hash_kept(tmp_path,
                                                                                  monkeypatch):
    """A source read for a bundle is exactly the size the plan saw (one that grew or shrank
    since is refused), and its SHA-1 goes to the local hash cache unless the run already
    knew it from there (no lookup per file on a cold copy's critical path)."""
    from remote_runner import hashcache
    monkeypatch.setattr(hashcache, "LOCAL", hashcache.LocalHashes())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    new, known, empty = tmp_path / "new", tmp_path / "known", tmp_path / "empty"
    new.write_bytes(b"x" * 70000)
    known.write_bytes(b"known")
    empty.write_bytes(b"")
    assert bundle._read_source(sync.Upload(str(new), "/d/new", 0o644, 70000)) == b"x" * 70000
    assert hashcache.LOCAL.known(str(new)) == hashlib.sha1(b"x" * 70000).hexdigest()
    assert bundle._read_source(sync.Upload(str(known), "/d/k", 0o644, 5), {str(known)}) == b"known"
    assert hashcache.LOCAL.known(str(known)) is None  # (the run said the cache had it)
    assert bundle._read_source(sync.Upload(str(empty), "/d/e", 0o644, 0)) == b""
    for planned in (69999, 70001):  # grew, shrank since the plan
        with pytest.raises(CopyError, match="changed while copying") as caught:
            bundle._read_source(sync.Upload(str(new), "/d/new", 0o644, planned))
        assert caught.value.path == str(new)


def test_a_bundles_tar_is_built_once_for_all_hosts_and_again_when_a_source_changed(tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"one")
    items = [sync.Upload(str(src), "/d/f", 0o644, 3)]
    shared, builds = sync.SharedTars(), []

    def build():
        builds.append(1)
        return sync.bundle_tar(items)
    token = shared.token(items)
    first = [shared.get(token, build) for _host in range(4)]
    assert len(builds) == 1 and all(t == first[0] for t in first)
    assert shared.token(items) == token  # the same on every host
    assert shared.token(items) != sync.SharedTars().token(items)  # another process: another stage name
    src.write_bytes(b"two")  # same size, new bytes
    assert shared.token(items) != token
    assert b"two" in shared.get(shared.token(items), build) and len(builds) == 2
    tight = sync.SharedTars(budget=10)  # kept only within its budget
    tight.get(token, build)
    tight.get(token, build)
    assert len(builds) == 4


def test_within_one_copy_the_hosts_share_a_bundles_token_without_stating_again(tmp_path, monkeypatch):
    """Four hosts given the same files: one round of stats, one token, so one tar; after the
    copy a source changed behind the same size makes a new token again."""
    src = tmp_path / "f"
    src.write_bytes(b"one")
    items = [sync.Upload(str(src), "/d/f", 0o644, 3)]
    shared, stats = sync.SharedTars(), []
    real = bundle._stat_of
    monkeypatch.setattr(bundle, "_stat_of", lambda path: stats.append(path) or real(path))
    with shared.one_copy():
        tokens = {shared.token(list(items)) for _host in range(4)}
        src.write_bytes(b"two")  # (during the copy: every host still gets what the first read)
        assert {shared.token(items)} == tokens and len(stats) == 1
    assert shared.token(items) not in tokens and len(stats) == 2
    with shared.one_copy():
        assert shared.token(items) == shared.token(items) and len(stats) == 3


def test_hosts_asking_for_a_bundles_token_at_once_wait_for_the_first_ones_stats(tmp_path, monkeypatch):
    """The hosts of a copy start together: the first to ask stats the sources, the others
    wait for its token (each stat'ed every source before); a failed first leaves it to the next."""
    src = tmp_path / "f"
    src.write_bytes(b"one")
    items = [sync.Upload(str(src), "/d/f", 0o644, 3)]
    shared, stats, fail = sync.SharedTars(), [], [True]
    real = bundle._stat_of

    def slow_stat(path):
        stats.append(path)
        time.sleep(0.2)  # (long enough for every host to be waiting)
        if fail and fail.pop():
            raise OSError("first host's stat failed")
        return real(path)

    monkeypatch.setattr(bundle, "_stat_of", slow_stat)
    with shared.one_copy(), ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(shared.token, list(items)) for _host in range(4)]
        outcomes = [f.exception() or f.result() for f in futures]
    failed = [o for o in outcomes if isinstance(o, OSError)]
    tokens = {o for o in outcomes if isinstance(o, str)}
    assert len(failed) == 1 and len(tokens) == 1 and len(stats) == 2


@pytest.mark.parametrize("long_name", [False, True])  # ustar headers written here / tarfile's
def test_a_bundles_tar_unpacks_with_tar_to_the_same_names_bytes_and_modes(tmp_path, long_name):
    names = ["f", "sub/dir/.rr-stage-ab12cd34/g.py", "p" * 120 + "/" + "n" * 90, "d/é-\udcff.bin",
             "q" * 160 + "/" + "r" * 101 if long_name else "q/r"]
    items = []
    for index, name in enumerate(names):
        src = tmp_path / f"src{index}"
        src.write_bytes(bytes([index]) * (index * 700 + 1))
        items.append(sync.Upload(str(src), "/d/" + name, [0o644, 0o755, 0o600, 0o4711, 0o640][index],
                                 index * 700 + 1))
    data = sync.bundle_tar(items, names)
    assert len(data) % 10240 == 0  # whole records, as tar writes them
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == names
        assert all(m.isreg() and m.uid == 0 and m.gid == 0 for m in members)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", "-", "-C", str(out)], input=data, check=True)  # as on a host (root)
    for name, item in zip(names, items):
        got = out / name
        assert got.read_bytes() == open(item.src, "rb").read()
        assert os.lstat(got).st_mode & 0o7777 == item.mode


def test_ustar_names_are_split_at_a_slash_or_refused():
    assert bundle.ustar_split(b"a" * 100) == (b"", b"a" * 100)
    assert bundle.ustar_split(b"p/" + b"n" * 100) == (b"p", b"n" * 100)
    assert bundle.ustar_split(b"p" * 155 + b"/n") == (b"p" * 155, b"n")
    assert bundle.ustar_split(b"p" * 156 + b"/n") is None  # the prefix holds 155 bytes
    assert bundle.ustar_split(b"p/" + b"n" * 101) is None  # the name 100
    assert bundle.ustar_split(b"n" * 101) is None  # nowhere to split


def copy_bundle(how: str, shell, items, tree: str):
    """Copy one bundle of *items* to h2 the way *how* says: "shell" (tar, stat, chmod, mv) or
    "python" (the manifest's program writes, places and records them: a single-bundle copy)."""
    if how == "shell":
        return sync.upload_bundle(shell, "h2", items)
    return sync.write_bundle(shell, "h2", items, lambda what: manifest.request(
        items, [tree], [0] * len(items), hash_all=True, write=what))


@pytest.mark.parametrize("how", ["shell", "python"])
@pytest.mark.parametrize("count", [3, 6])  # renamed by a mv per directory / by one python3
def test_a_bundle_across_directories_that_fails_leaves_no_stage_and_no_partial_file(lab, host, tmp_path,
                                                                                      count, how):
    """One bundle for several directories; the last one's file cannot be renamed into place (a
    directory has its name): every stage directory goes, and every destination holds either its
    old content or the whole new one."""
    shell, _sftp, base = host
    dirs = "abcdef"[:count]
    items = []
    for d in dirs:
        (tmp_path / d).write_bytes(d.encode() * 1000)
        items.append(sync.Upload(str(tmp_path / d), f"{base}/{d}/f", 0o644, 1000))
    ssh(lab, "h2", " && ".join(f"mkdir -p {base}/{d}" for d in dirs[:-1])
        + f" && mkdir -p {base}/{dirs[-1]}/f/blocker && printf old > {base}/a/f")
    assert len(sync.bundles(items)) == 1
    with pytest.raises(CopyError) as info:
        copy_bundle(how, shell, items, base)
    assert info.value.host == "h2" and "directory" in str(info.value), info.value
    listing = ssh(lab, "h2", f"cd {base} && find . | sort").stdout.split()
    assert not [p for p in listing if ".rr-" in p], listing
    for d in dirs[:-1]:
        content = ssh(lab, "h2", f"cat {base}/{d}/f 2>/dev/null || true").stdout
        assert content in ("", "old", d * 1000), (d, content[:20])
    assert ssh(lab, "h2", f"ls -A {base}/{dirs[-1]}/f").stdout == "blocker\n"


@pytest.mark.parametrize("how", ["shell", "python"])
def test_a_bundle_to_many_directories_puts_every_file_in_place_with_its_mode(lab, host, tmp_path, how):
    shell, _sftp, base = host
    items = []
    for i in range(12):  # past RENAMER_FROM: one python3 renames them all
        for name, mode in (("-x", 0o755), (".h", 0o600), ("p q", 0o644)):
            src = tmp_path / f"{i}{name}"
            src.write_bytes(os.urandom(100 + i))
            src.chmod(mode)
            items.append(sync.Upload(str(src), f"{base}/d{i:02d}/{name}", mode, 100 + i))
    ssh(lab, "h2", "mkdir -p " + " ".join(f"{base}/d{i:02d}" for i in range(12)))
    assert len(sync.bundles(items)) == 1
    out = copy_bundle(how, shell, items, base)
    for item in items:
        got = ssh(lab, "h2", f"sha1sum {shlex.quote(item.dest)}; stat -c %a {shlex.quote(item.dest)}").stdout.split()
        assert (got[0], got[-1]) == (sync.local_sha1(item.src), f"{item.mode:o}"), item.dest
    assert ".rr-" not in ssh(lab, "h2", f"find {base}").stdout
    if how == "python":  # written and recorded by one program: each with the SHA-1 of what arrived
        answer = manifest.parse_answer(out.splitlines(), len(items))
        assert answer is not None and answer.received == len(items) and answer.saved, out
        assert [f.sha1 for f in answer.files] == [sync.local_sha1(item.src) for item in items]


def test_a_host_without_python3_gets_its_single_bundle_as_a_tar(lab, host, tmp_path):
    """The writer needs the manifest's python3: where there is none after all, nothing was
    written, and the copy unpacks a tar (stat, chmod, mv) instead: same files, same modes."""
    from tests.test_manifest import NoPython
    shell, _sftp, base = host
    tools = " ".join(f'"$(command -v {t})"' for t in ("sh", "mkdir", "tar", "stat", "chmod", "mv", "rm",
                                                       "rmdir", "cat", "head", "mktemp"))
    ssh(lab, "h2", f"mkdir -p {base}-bin {base}/d && ln -sf {tools} {base}-bin/")
    items = []
    for name, mode in (("a", 0o644), ("b", 0o755)):
        (tmp_path / name).write_bytes(name.encode() * 100)
        items.append(sync.Upload(str(tmp_path / name), f"{base}/d/{name}", mode, 100))
    bare = NoPython(shell, f"{base}-bin")
    assert copy_bundle("python", bare, items, base) is None
    assert ssh(lab, "h2", f"ls -A {base}/d").stdout == ""
    writer = sync._write_request(sync.Plan("h2", (), tuple(items)))
    assert sync.upload_bundles(bare, "h2", [items], request=writer) == [(items, None)]  # (not recorded)
    assert ssh(lab, "h2", f"cd {base}/d && cat a b && echo && stat -c %a a b && ls -A").stdout.split() == [
        "a" * 100 + "b" * 100, "644", "755", "a", "b"]


def test_a_bundle_cut_short_places_nothing_and_records_nothing(lab, host, tmp_path):
    """The link drops in the middle of a bundle's bytes (its writer sees the end of its input
    early): every destination keeps its old file, no stage is left, and the host's manifest
    still vouches only for what is really there."""
    from tests.test_manifest import audit

    class Cut:
        """h2's shell, whose next bundle loses its last half."""

        def __init__(self, inner):
            self.inner, self.host = inner, inner.host

        def script(self, text, timeout):
            return self.inner.script(text, timeout)

        def feed(self, script, data, timeout):
            if b'"write": {' not in data:  # (the check: not a bundle)
                return self.inner.feed(script, data, timeout)
            return self.inner.feed(script, data[:len(data) // 2], timeout)

    shell, sftp, base = host
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i:02d}").write_bytes(os.urandom(4096))
    plan = sync.make_plan("h2", [(FileSpec(str(src), "t", True), base)])
    sync.sync_host(shell, sftp, plan)
    old = ssh(lab, "h2", f"cd {base}/t && sha1sum f00 f19").stdout
    for i in range(20):
        (src / f"f{i:02d}").write_bytes(os.urandom(4096))
    with pytest.raises(CopyError) as info:
        sync.sync_host(Cut(shell), sftp, plan)
    assert info.value.host == "h2" and "received fewer bytes" in str(info.value), info.value
    assert ssh(lab, "h2", f"cd {base}/t && sha1sum f00 f19").stdout == old
    assert ".rr-" not in ssh(lab, "h2", f"find {base}").stdout
    book = audit(lab, "h2", base)
    assert book["bad"] == [] and len(book["entries"]) == 20  # the old files, as they are
    again = sync.sync_host(shell, sftp, plan)
    assert len(again.copied) == 20
    assert ssh(lab, "h2", f"cd {base}/t && sha1sum f00").stdout.split()[0] == sync.local_sha1(str(src / "f00"))


@pytest.mark.parametrize("how", ["shell", "python"])
def test_failed_bundle_leaves_no_stage_directory(lab, host, tmp_path, how):
    shell, _sftp, base = host
    item = tmp_path / "f"
    item.write_bytes(b"x" * 10)
    upload = sync.Upload(str(item), f"{base}/f", 0o644, 10)
    ssh(lab, "h2", f"mkdir -p {base}/f/blocker")  # a directory where the file should go
    with pytest.raises(CopyError) as info:
        copy_bundle(how, shell, [upload], base)
    assert info.value.host == "h2"
    assert ssh(lab, "h2", f"ls -A {base}").stdout == "f\n"


def test_remote_stat_lists_size_and_mode_in_one_command_or_says_it_cannot(lab, host):
    shell, _, base = host
    ssh(lab, "h2", f"mkdir -p '{base}/a b' && printf 12345 > '{base}/a b/f 1' && chmod 640 '{base}/a b/f 1'"
                   f" && mkdir '{base}/d'")
    found = sync.remote_stat(shell, [f"{base}/a b/f 1", f"{base}/d", f"{base}/missing"])
    assert found[f"{base}/a b/f 1"][0] == 5 and found[f"{base}/a b/f 1"][1] & 0o7777 == 0o640
    assert found[f"{base}/d"][1] & 0o170000 == 0o040000 and f"{base}/missing" not in found
    assert sync.remote_stat(PathShell(shell, f"{base}/no-tools"), [f"{base}/d"]) is None


@pytest.fixture
def full_disk(lab, host):
    """A 64 KiB tmpfs on h2 holding an old 'data' file (and a 'small' dir for bundles)."""
    _shell, _sftp, base = host
    mnt = f"{base}-full"
    ssh(lab, "h2", f"mkdir -p {mnt} && mount -t tmpfs -o size=64k tmpfs {mnt} && "
                   f"printf old > {mnt}/data && mkdir {mnt}/small && printf old > {mnt}/small/a")
    yield mnt
    ssh(lab, "h2", f"umount {mnt}; rmdir {mnt}", check=False)


def _no_temporary_files(lab, mnt):
    return ssh(lab, "h2", f"find {mnt} -name '.*'").stdout == ""


def test_full_disk_fails_the_sftp_copy_and_keeps_the_old_file(lab, host, full_disk, tmp_path):
    shell, sftp, _base = host
    big = tmp_path / "data"
    big.write_bytes(os.urandom(1 << 20))  # over SMALL_FILE: goes over SFTP
    plan = sync.make_plan("h2", [(FileSpec(str(big), "data", False), full_disk)])
    with pytest.raises(CopyError) as info:
        sync.sync_host(shell, sftp, plan)
    assert info.value.host == "h2" and info.value.path == f"{full_disk}/data"
    assert "No space left on device" in str(info.value)
    assert ssh(lab, "h2", f"cat {full_disk}/data").stdout == "old"
    assert _no_temporary_files(lab, full_disk)


def test_full_disk_fails_a_bundled_copy_and_keeps_the_old_files(lab, host, full_disk, tmp_path):
    shell, sftp, _base = host
    src = tmp_path / "small"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / name).write_bytes(os.urandom(40 << 10))  # small files, 120 KiB in all
    plan = sync.make_plan("h2", [(FileSpec(str(src), "small", True), full_disk)])
    with pytest.raises(CopyError) as info:
        sync.sync_host(shell, sftp, plan)
    assert info.value.host == "h2" and "No space left on device" in str(info.value)
    assert ssh(lab, "h2", f"cat {full_disk}/small/a").stdout == "old"
    assert ssh(lab, "h2", f"ls -A {full_disk}/small").stdout == "a\n"


def test_a_short_sftp_write_is_caught_by_size_and_explained(lab, host, full_disk, tmp_path):
    """Past the free-space check (another writer filled the disk meanwhile), the size check holds."""
    shell, sftp, _base = host
    big = tmp_path / "data"
    big.write_bytes(os.urandom(1 << 20))
    item = sync.Upload(str(big), f"{full_disk}/data", 0o644, 1 << 20)
    with pytest.raises(sync.ShortWrite) as info:
        sync.upload_all(sftp, "h2", [item])
    assert info.value.written < item.size
    explained = sync.explain(shell, "h2", info.value)
    assert explained.host == "h2" and explained.path == item.dest
    assert "No space left on device" in str(explained)
    assert ssh(lab, "h2", f"cat {full_disk}/data").stdout == "old"
    assert _no_temporary_files(lab, full_disk)


@pytest.mark.parametrize("how", ["shell", "python"])
def test_a_bundle_that_does_not_fit_renames_nothing(lab, host, full_disk, tmp_path, how):
    shell, _sftp, _base = host
    items = []
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(os.urandom(40 << 10))
        items.append(sync.Upload(str(tmp_path / name), f"{full_disk}/small/{name}", 0o644, 40 << 10))
    with pytest.raises(CopyError) as info:
        copy_bundle(how, shell, items, f"{full_disk}/small")
    assert "No space left on device" in str(info.value)
    assert ssh(lab, "h2", f"ls -A {full_disk}/small").stdout == "a\n"
    assert ssh(lab, "h2", f"cat {full_disk}/small/a").stdout == "old"


def test_free_space_report_parsing():
    up = [sync.Upload("/l/a", "/m/d/a", 0o644, 3000), sync.Upload("/l/b", "/m/d/b", 0o644, 2000)]
    report = ["RR-FREE 77 1 9 4096 /m/d", "RR-FREE uid 1000"]
    with pytest.raises(CopyError) as info:
        sync.check_free_space("h", up, report)
    assert info.value.path == "/m/d/a" and "5000 bytes" in str(info.value)
    sync.check_free_space("h", up, ["RR-FREE 77 1 9 4096 /m/d", "RR-FREE uid 0"])  # root: 9 blocks
    sync.check_free_space("h", up, ["garbage", "RR-FREE uid 1000"])  # unknown: not refused here


def test_copying_a_directory_into_an_existing_one_keeps_its_mode(lab, host, tmp_path):
    shell, sftp, base = host
    src = tree(tmp_path)  # src is 0755 locally, src/sub 0750
    ssh(lab, "h2", f"mkdir -p {base}/shared && chmod 1777 {base}/shared")
    plan = sync.make_plan("h2", [(FileSpec(str(src), f"{base}/shared", True), base)])
    sync.sync_host(shell, sftp, plan)
    modes = ssh(lab, "h2", f"stat -c '%a %n' {base}/shared {base}/shared/sub").stdout.splitlines()
    assert modes == [f"1777 {base}/shared", f"750 {base}/shared/sub"]  # only the new one gets 0750


def test_a_host_without_any_hash_tool_says_so_and_copies_again(lab, host, tmp_path, caplog):
    shell, sftp, base = host
    src = tree(tmp_path)
    sync.sync_host(shell, sftp, plan_for(src, base))
    ssh(lab, "h2", f"mkdir -p {base}-bin && ln -sf \"$(command -v mkdir)\" {base}-bin/mkdir "
                   f"&& ln -sf \"$(command -v chmod)\" {base}-bin/chmod")
    try:
        limited = PathShell(shell, f"{base}-bin")
        with caplog.at_level(logging.WARNING, logger="remote_runner.sync"):
            report = sync.sync_host(limited, sftp, plan_for(src, base))
        assert report.hash_tool == "none" and len(report.copied) == 3
        assert any("neither openssl, sha1sum nor python3" in r.getMessage()
                   for r in caplog.records)
        assert not any("comparing files with" in r.getMessage() for r in caplog.records)
    finally:
        ssh(lab, "h2", f"rm -rf {base}-bin", check=False)


def test_temporary_files_left_by_killed_copies_are_swept_when_old(lab, host, tmp_path):
    shell, sftp, base = host
    src = tree(tmp_path)
    old = [f"{base}/.data.txt.rr-0badc0de.tmp", f"{base}/.rr-stage-0badc0de/x"]
    young = f"{base}/.data.txt.rr-12345678.tmp"  # another run's upload, still being written
    ssh(lab, "h2", f"mkdir -p {base}/.rr-stage-0badc0de && touch {' '.join(old)} {young} "
                   f"{base}/.mine.tmp && touch -d '1 hour ago' {old[0]} {base}/.rr-stage-0badc0de "
                   f"{base}/.mine.tmp")
    sync.sync_host(shell, sftp, plan_for(src, base))
    left = ssh(lab, "h2", f"ls -A {base}").stdout.split()
    assert ".data.txt.rr-0badc0de.tmp" not in left and ".rr-stage-0badc0de" not in left
    assert ".data.txt.rr-12345678.tmp" in left and ".mine.tmp" in left  # young / not ours
