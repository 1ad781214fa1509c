"""Large files streamed to a host-side receiver that hashes as it writes.

The claims, each checked on real lab hosts (sshd, the hosts' python3), with what
arrived read back through the system OpenSSH client:

* files of a MiB or more reach a python3 host byte-identical over exec
  channels, with no SFTP session, and their manifest entries come from the
  receiver's hash (the host reads none of them a second time) yet are true;
* a full disk fails the stream that hit it, names the cause, leaves the old
  file and no temporary file, and the connection keeps working;
* Ctrl-C mid-stream leaves no temporary file and a usable connection;
* in real runs the copy opens no SFTP session, and one small file changed costs
  one exec beyond the check (its bundle records it in the manifest too);
* a receipt the file's stat no longer matches is not recorded (hashed instead),
  and a malformed receipt from the host is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from remote_runner import manifest, stream, sync, upload
from remote_runner.config import FileSpec
from remote_runner.errors import CopyError
from remote_runner.loader import load_experiment
from remote_runner.runner import RunOptions, Runner
from remote_runner.shell import RemoteShell
from remote_runner.ssh import Connection, SSHOptions
from tests.conftest import quit_screen, ssh
from tests.test_manifest import CopyPhase, _component, audit


# --------------------------------------------------------------------------- no hosts needed

def test_a_malformed_receipt_is_refused():
    good = "a" * 40
    assert stream.parse_receipt(f"{good} [1, 2, 3, 4, 5]") == stream.Receipt(good, (1, 2, 3, 4, 5))
    assert stream.parse_receipt(f"{good} null") == stream.Receipt(good, None)
    for bad in ("A" * 40 + " [1, 2, 3, 4, 5]", "abc [1, 2, 3, 4, 5]", f"{good} [1, 2, 3, 4]",
                f"{good} [1, 2, 3, 4, -5]", f"{good} [1, 2, 3, 4, 5.0]", f"{good} {{}}",
                f"{good} [1, 2, 3", ""):
        assert stream.parse_receipt(bad) is None, bad


def _run_host_program(request: bytes, env: dict) -> manifest.Answer:
    proc = subprocess.run([sys.executable, "-I", "-c", manifest.HOST_PROGRAM], input=request,
                          capture_output=True, env=env, check=True)
    answer = manifest.parse_answer(proc.stdout.decode().splitlines(), 1)
    assert answer is not None
    return answer


def test_a_receipt_counts_only_while_the_files_stat_is_the_one_it_names(tmp_path):
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    path = tmp_path / "tree" / "f.bin"
    path.parent.mkdir()
    path.write_bytes(b"the bytes really there")
    st = os.lstat(path)
    key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    real = hashlib.sha1(path.read_bytes()).hexdigest()
    item = upload.Upload("unused", str(path), 0o644, st.st_size)
    lie = "0" * 40

    def record(receipt):
        return _run_host_program(manifest.request([item], [str(path.parent)], [0], hash_all=True,
                                                  receipts={item.dest: receipt}), env)

    # A stat that is not the file's: the receipt is ignored and the file hashed.
    stale = record(stream.Receipt(lie, (key[0], key[1], key[2] + 1, key[3], key[4])))
    assert (stale.received, stale.hashed, stale.files[0].sha1) == (0, 1, real)
    # The file's exact stat: the receiver's hash is taken, the file not read.
    shutil.rmtree(tmp_path / "cache")
    taken = record(stream.Receipt(real, key))
    assert (taken.received, taken.hashed, taken.files[0].sha1) == (1, 0, real)
    [kept] = (tmp_path / "cache" / "remote-runner" / "manifests").glob("*.json")
    assert json.loads(kept.read_text())["entries"][str(path)] == list(key) + [real]


# --------------------------------------------------------------------------- lab

@pytest.fixture
def base(lab):
    path = f"/tmp/rr-stream-{uuid.uuid4().hex[:8]}"
    yield path
    for host in ("h2", "h9"):
        ssh(lab, host, f"umount {path}-full 2>/dev/null; rm -rf {path} {path}-full", check=False)


def _sha1(path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("host", ["h2", "h9"])
def test_a_tree_of_many_small_directories_is_one_bundle_on_this_release_and_another(
        lab, foreign_host, conn, base, tmp_path, host):
    """Debian 12 and the foreign host (another release, none of this machine's files): a tree of
    60 small files in 12 directories is one bundle (one python3 renames them all), recorded in
    the host's manifest by the same exec; the next run finds nothing to copy."""
    c = conn(host)
    src = tmp_path / "tree"
    for d in range(12):
        for name in ("a.py", ".hidden", "-dash", "sp ace", "\u00fcn\u00ef"):
            (src / f"pkg{d // 4}" / f"mod{d:02d}").mkdir(parents=True, exist_ok=True)
            (src / f"pkg{d // 4}" / f"mod{d:02d}" / name).write_bytes(os.urandom(50 + d))
    plan = sync.make_plan(host, [(FileSpec(str(src), "tree", True), base)])
    assert len(sync.bundles(plan.files)) == 1
    report = sync.sync_host(RemoteShell(c, host), c.sftp, plan)
    assert len(report.copied) == 60
    assert c.traffic.snapshot()["execs"] == 2  # the check, then the bundle with its record
    for item in plan.files:
        assert ssh(lab, host, f"sha1sum '{item.dest}'").stdout.split()[0] == sync.local_sha1(item.src)
    assert ".rr-" not in ssh(lab, host, f"find {base}").stdout
    assert len(audit(lab, host, base)["entries"]) == 60
    with Connection(host, SSHOptions(ssh_config_file=lab.ssh_config)) as again:
        warm = sync.sync_host(RemoteShell(again.connect(), host), again.sftp, plan)
        assert (warm.copied, warm.hashed, warm.trusted) == ([], 0, 60)


@pytest.mark.parametrize("host", ["h2", "h9"])
def test_large_files_stream_byte_identical_and_the_host_reads_them_once(
        lab, foreign_host, conn, base, tmp_path, monkeypatch, host):
    c = conn(host)
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    sizes = {"a.bin": (1 << 20) + 7, "b.bin": 3 << 20, "c.bin": (2 << 20) + 4093}
    for name, size in sizes.items():
        (src / "big" / name).write_bytes(os.urandom(size))
    os.chmod(src / "big" / "b.bin", 0o750)
    for i in range(5):
        (src / f"small{i}.txt").write_text(f"small {i}\n")
    recorded = []
    real_record = sync.record

    def spy(*args, **kwargs):
        recorded.append(real_record(*args, **kwargs))
        return recorded[-1]

    monkeypatch.setattr(sync, "record", spy)
    plan = sync.make_plan(host, [(FileSpec(str(src), ".", True), base)])
    report = sync.sync_host(RemoteShell(c, host), c.sftp, plan)
    assert len(report.copied) == 8
    counts = c.traffic.snapshot()
    # check, 3 streams, 1 bundle (beside the streams), record; no SFTP at all
    assert counts == {"execs": 6, "steps": 0, "sftp_sessions": 0, "sftp_requests": 0}
    for name in sizes:
        assert ssh(lab, host, f"sha1sum {base}/big/{name}").stdout.split()[0] == \
            _sha1(src / "big" / name)
    assert ssh(lab, host, f"stat -c %a {base}/big/b.bin").stdout.strip() == "750"
    assert ".rr-" not in ssh(lab, host, f"ls -A {base} {base}/big").stdout
    [answer] = recorded
    # one record for the copy, every hash taken by a receiver as the bytes arrived (the streams'
    # and the bundle writer's receipts): the host read no file again
    assert (len(answer.files), answer.received, answer.hashed) == (8, 8, 0)
    assert audit(lab, host, base)["bad"] == [] and len(audit(lab, host, base)["entries"]) == 8
    with Connection(host, SSHOptions(ssh_config_file=lab.ssh_config)) as again:
        warm = sync.sync_host(RemoteShell(again.connect(), host), again.sftp, plan)
        assert (warm.copied, warm.hashed, warm.trusted) == ([], 0, 8)


@pytest.fixture
def full(lab, base):
    """A 64 KiB tmpfs on h2 holding an old 'data' file."""
    mnt = f"{base}-full"
    ssh(lab, "h2", f"mkdir -p {mnt} && mount -t tmpfs -o size=64k tmpfs {mnt} && "
                   f"printf old > {mnt}/data")
    return mnt


def test_a_full_disk_stops_the_stream_cleanly_and_keeps_the_connection(lab, conn, full,
                                                                       tmp_path):
    c = conn("h2")
    src = tmp_path / "data"
    src.write_bytes(os.urandom(4 << 20))
    item = upload.Upload(str(src), f"{full}/data", 0o644, 4 << 20)
    # upload_all directly: past the free-space check that sync does before copying
    with pytest.raises(upload.ShortWrite) as info:
        upload.upload_all(None, "h2", [item], link=(c.transport, c.traffic))
    explained = upload.explain(RemoteShell(c, "h2"), "h2", info.value)
    assert explained.host == "h2" and explained.path == item.dest
    assert "No space left on device" in str(explained) and "old file is left" in str(explained)
    assert c.traffic.sftp_sessions == 0
    assert ssh(lab, "h2", f"cat {full}/data").stdout == "old"
    assert ssh(lab, "h2", f"find {full} -name '.*'").stdout == ""
    assert c.run("echo still-here").stdout.strip() == b"still-here"


def test_ctrl_c_mid_stream_leaves_no_temporary_file(lab, conn, base, tmp_path):
    c = conn("h2")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("one.bin", "two.bin"):
        (src / name).write_bytes(os.urandom(16 << 20))
    plan = sync.make_plan("h2", [(FileSpec(str(src), "big", True), base)])
    cancel = threading.Event()
    done = [0]

    def progress(_host, delta):
        done[0] += delta
        if done[0] >= (2 << 20):
            cancel.set()  # what Ctrl-C does (runner.cancel)

    with pytest.raises(CopyError) as info:
        sync.sync_all([(RemoteShell(c, "h2"), c.sftp, plan)], progress=progress, cancel=cancel)
    assert isinstance(info.value, upload.Cancelled)
    assert done[0] < 32 << 20 and c.traffic.sftp_sessions == 0
    deadline = time.monotonic() + 60
    while ".rr-" in ssh(lab, "h2", f"ls -A {base}/big").stdout and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ssh(lab, "h2", f"ls -A {base}/big").stdout == ""
    assert c.run("echo still-here").stdout.strip() == b"still-here"


def test_a_run_copies_without_sftp_and_one_changed_file_costs_no_round_trip(lab, tmp_path, screen_name):
    """Counted per host over the copy phase of real runs: cold, nothing changed, one changed."""
    base, state = f"/tmp/{screen_name}-base", f"/tmp/{screen_name}-state"
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / "sub" / f"f{i:02d}.txt").write_text(f"file {i}\n")
    (src / "big.bin").write_bytes(os.urandom(2 << 20))
    config = tmp_path / "experiment.py"
    config.write_text(textwrap.dedent("".join(_component(h, src, base) for h in ("h1", "h9"))))
    experiment = load_experiment(str(config), None)
    options = RunOptions(screen=screen_name, remote_done_dir=state)
    ssh_options = SSHOptions(ssh_config_file=lab.ssh_config)

    spent = {}
    try:
        for round_ in ("cold", "warm", "one changed"):
            if round_ == "one changed":
                (src / "sub" / "f07.txt").write_text("FILE 7\n")  # same size, new content
            watch = CopyPhase()
            runner = Runner(experiment, options, ssh_options, reporter=watch)
            watch.runner = runner
            report = runner.run()
            spent[round_] = watch.spent
            if round_ == "one changed":
                assert all(r.copied == [f"{base}/data/sub/f07.txt"] for r in report.sync.values())
        for host in ("h1", "h9"):
            cold, warm, one = (spent[r][host] for r in ("cold", "warm", "one changed"))
            assert cold["sftp_sessions"] == one["sftp_sessions"] == 0
            commands = lambda counts: counts["execs"] + counts["steps"]  # noqa: E731
            # cold: the check, one stream, one bundle, the record; the stream has a channel
            # of its own, the bundle and the record ride on the session lock's shell
            assert commands(cold) == commands(warm) + 3
            assert cold["execs"] == warm["execs"] + 1
            # one changed: it rode with the check (on the lock's channel) and the start
            # renamed it into place: no command of its own
            assert commands(one) == commands(warm) and one["execs"] == warm["execs"]
            assert ssh(lab, host, f"cat {base}/data/sub/f07.txt").stdout == "FILE 7\n"
            assert audit(lab, host, base)["bad"] == []
    finally:
        for host in ("h1", "h9"):
            quit_screen(lab, host, screen_name, state, base)
