"""The bulk data path: ranges over parallel SFTP channels, compression, cipher choice.

Lab checks read results back through the system OpenSSH client (``sha1sum``
on the host), so they do not trust the code under test to say what arrived.
h1 has the ``lz4`` command, h9 (Debian 11, its own root) only ``gzip``: both
decoders are exercised.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
import uuid

import paramiko
import pytest

from remote_runner import ciphers, compression, sftpwrite, sync, upload
from remote_runner.errors import ConfigError, CopyError
from remote_runner.shell import RemoteShell
from tests.conftest import ssh


def _sparse(size: int) -> bytes:
    """Data any codec squeezes cheaply: zeros with a line of text every 4 KiB (a sparse file)."""
    block = b"".join(b"record %08d\n" % i + bytes(4096 - 16) for i in range(size // 4096 + 1))
    return block[:size]


# --------------------------------------------------------------------------- pure

def test_ranges_cover_the_file_exactly_once():
    for size, lanes, minimum in ((0, 8, 1), (10, 8, 4), (100, 3, 10), (64 << 20, 8, 16 << 20),
                                 (5, 8, 16 << 20)):
        parts = sftpwrite.ranges(size, lanes, minimum)
        assert 1 <= len(parts) <= lanes and all(p.count == len(parts) for p in parts)
        assert [p.index for p in parts] == list(range(len(parts)))
        assert parts[0].offset == 0 and sum(p.length for p in parts) == size
        assert all(a.offset + a.length == b.offset for a, b in zip(parts, parts[1:]))
    assert len(sftpwrite.ranges(64 << 20, 8, 16 << 20)) == 4


def test_a_write_fits_one_channel_packet():
    class Sock:
        out_max_packet_size = 32768

    class Client:
        sock = Sock()

    handle = b"\0\0\0\1"
    data = sftpwrite.chunk_size(Client(), handle)
    # length, type, id, handle, offset, data length + data: within paramiko's packet budget
    assert 4 + 1 + 4 + 4 + len(handle) + 8 + 4 + data <= 32768 - 64


def test_fast_ciphers_first_unless_ssh_config_says():
    offered = ("aes128-ctr", "aes256-ctr", "aes128-cbc", "aes128-gcm@openssh.com",
               "aes256-gcm@openssh.com")
    best = ciphers.ordered(offered, ciphers.PREFERRED_CIPHERS)
    assert best[:2] == ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
    assert sorted(best) == sorted(offered)
    assert ciphers.apply_config(best, offered, None, "Ciphers") == best
    assert ciphers.apply_config(best, offered, "aes256-ctr,aes128-ctr", "Ciphers") == (
        "aes256-ctr", "aes128-ctr")
    assert ciphers.apply_config(best, offered, "-aes*-gcm@openssh.com", "Ciphers")[0] == "aes128-ctr"
    assert ciphers.apply_config(best, offered, "^aes256-ctr", "Ciphers")[0] == "aes256-ctr"
    assert ciphers.apply_config(best, offered, "+3des-cbc", "Ciphers") == best  # unknown: dropped
    with pytest.raises(ConfigError) as info:
        ciphers.apply_config(best, offered, "chacha20-poly1305@openssh.com", "Ciphers", "cfg")
    assert info.value.field == "Ciphers" and info.value.file == "cfg"


def test_only_compressible_data_is_sent_compressed(tmp_path):
    noise, text = tmp_path / "noise", tmp_path / "text"
    noise.write_bytes(os.urandom(1 << 20))
    text.write_bytes(_sparse(1 << 20))
    for codec in (compression.LZ4, compression.GZIP):
        assert not compression.pays(str(noise), 1 << 20, codec)
        assert compression.pays(str(text), 1 << 20, codec)


# --------------------------------------------------------------------------- lab

@pytest.fixture
def base(lab):
    path = f"/tmp/rr-bulk-{uuid.uuid4().hex[:8]}"
    yield path
    for host in ("h1", "h2", "h9"):
        ssh(lab, host, f"umount {path}-full 2>/dev/null; rm -rf {path} {path}-full", check=False)


def _lanes(c):
    opened = []

    def open_lane():
        opened.append(paramiko.SFTPClient.from_transport(c.transport))
        return opened[-1]
    return open_lane, opened


def _count_compressed(monkeypatch):
    calls = []
    real_send = compression.send

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real_send(*args, **kwargs)
    monkeypatch.setattr(compression, "send", spy)
    return calls


def _sha1(path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _remote_sha1(lab, host, path) -> str:
    return ssh(lab, host, f"sha1sum {path}").stdout.split()[0]


@pytest.mark.parametrize("host", ["h2", "h9"])
def test_a_large_file_in_parallel_ranges_arrives_byte_identical(lab, foreign_host, conn, base,
                                                                tmp_path, monkeypatch, host):
    monkeypatch.setattr(sftpwrite, "RANGE_MIN", 1 << 20)
    c = conn(host)
    assert c.transport.remote_cipher.startswith("aes128-gcm")  # the measured fastest
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom((5 << 20) + 12345))  # random: the plain SFTP path
    sent = []
    monkeypatch.setattr(compression, "send", lambda *a, **k: sent.append(a))
    open_lane, opened = _lanes(c)
    ssh(lab, host, f"mkdir -p {base}")
    item = upload.Upload(str(big), f"{base}/big.bin", 0o640, big.stat().st_size)
    upload.upload_all(c.sftp(), host, [item], open_lane=open_lane)
    assert len(opened) >= 3 and not sent  # ranges written by several channels at once
    assert _remote_sha1(lab, host, item.dest) == _sha1(big)
    assert ssh(lab, host, f"stat -c %a {item.dest}").stdout.strip() == "640"
    assert ".rr-" not in ssh(lab, host, f"ls -A {base}").stdout


@pytest.mark.parametrize("host,codec", [("h1", "lz4"), ("h9", "gzip")])
def test_compressible_files_go_compressed_random_ones_plain(lab, foreign_host, conn, base,
                                                            tmp_path, monkeypatch, host, codec):
    c = conn(host)
    compression.forget_hosts()
    text, noise = tmp_path / "log.txt", tmp_path / "noise.bin"
    text.write_bytes(_sparse(3 << 20))
    noise.write_bytes(os.urandom(3 << 20))
    used = []
    real_send = compression.send

    def spy(transport, chosen, src, *args, **kwargs):
        used.append((chosen, os.path.basename(src)))
        return real_send(transport, chosen, src, *args, **kwargs)

    monkeypatch.setattr(compression, "send", spy)
    ssh(lab, host, f"mkdir -p {base}")
    items = [upload.Upload(str(p), f"{base}/{p.name}", 0o600, p.stat().st_size)
             for p in (text, noise)]
    execs = c.traffic.execs
    upload.upload_all(c.sftp(), host, items, open_lane=_lanes(c)[0])
    assert used == [(codec, "log.txt")]
    assert c.traffic.execs - execs == 2  # the decoder question, then the compressed stream
    for p in (text, noise):
        assert _remote_sha1(lab, host, f"{base}/{p.name}") == _sha1(p)
    assert ssh(lab, host, f"stat -c %a {base}/log.txt").stdout.strip() == "600"
    assert ".rr-" not in ssh(lab, host, f"ls -A {base}").stdout


@pytest.fixture
def full(lab, base):
    """A 64 KiB tmpfs on h2 holding an old 'data' file."""
    mnt = f"{base}-full"
    ssh(lab, "h2", f"mkdir -p {mnt} && mount -t tmpfs -o size=64k tmpfs {mnt} && "
                   f"printf old > {mnt}/data")
    return mnt


@pytest.mark.parametrize("kind", ["ranges", "compressed"])
def test_a_full_disk_fails_parallel_and_compressed_copies_cleanly(lab, conn, full, tmp_path,
                                                                  monkeypatch, kind):
    monkeypatch.setattr(sftpwrite, "RANGE_MIN", 256 << 10)
    compression.forget_hosts()
    c = conn("h2")
    src = tmp_path / "data"
    src.write_bytes(_sparse(2 << 20) if kind == "compressed" else os.urandom(2 << 20))
    item = upload.Upload(str(src), f"{full}/data", 0o644, 2 << 20)
    packed = _count_compressed(monkeypatch)
    # upload_all directly: past the free-space check that sync does before copying
    with pytest.raises(upload.ShortWrite) as info:
        upload.upload_all(c.sftp(), "h2", [item], open_lane=_lanes(c)[0])
    explained = upload.explain(RemoteShell(c, "h2"), "h2", info.value)
    assert explained.host == "h2" and explained.path == item.dest
    assert "No space left on device" in str(explained) and "old file is left" in str(explained)
    assert packed == (["lz4"] if kind == "compressed" else [])
    assert ssh(lab, "h2", f"cat {full}/data").stdout == "old"
    assert ssh(lab, "h2", f"find {full} -name '.*'").stdout == ""


@pytest.mark.parametrize("kind", ["ranges", "compressed"])
def test_ctrl_c_during_a_parallel_copy_leaves_no_temporary_file(lab, conn, base, tmp_path,
                                                                monkeypatch, kind):
    monkeypatch.setattr(sftpwrite, "RANGE_MIN", 1 << 20)
    compression.forget_hosts()
    c = conn("h2")
    src = tmp_path / "big"
    src.write_bytes(_sparse(48 << 20) if kind == "compressed" else os.urandom(24 << 20))
    plan = sync.make_plan("h2", [(sync_spec(src), base)])
    cancel = threading.Event()
    packed = _count_compressed(monkeypatch)
    done = [0]

    def progress(_host, delta):
        done[0] += delta
        if done[0] >= (2 << 20):
            cancel.set()  # what Ctrl-C does (runner.cancel)

    with pytest.raises(CopyError) as info:
        sync.sync_all([(RemoteShell(c, "h2"), c.sftp, plan)], progress=progress,
                      lane_openers={"h2": _lanes(c)[0]}, cancel=cancel)
    assert isinstance(info.value, upload.Cancelled)
    assert done[0] < src.stat().st_size
    assert packed == (["lz4"] if kind == "compressed" else [])
    deadline = time.monotonic() + 60
    while ".rr-" in ssh(lab, "h2", f"ls -A {base}").stdout and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ssh(lab, "h2", f"ls -A {base}").stdout == ""


def sync_spec(src):
    from remote_runner.config import FileSpec
    return FileSpec(str(src), "big", False)


def test_a_compressed_file_never_lands_inside_a_directory_in_its_place(tmp_path):
    """``mv`` onto a directory moves the file into it: the receiver refuses and removes its temporary."""
    import gzip
    dest = tmp_path / "out.txt"
    dest.mkdir()
    tmp = tmp_path / ".out.txt.rr-1234.tmp"
    script = compression.receive_script(compression.GZIP, str(tmp), str(dest), 6, 0o644)
    done = subprocess.run(["sh", "-c", script], input=gzip.compress(b"hello\n"), capture_output=True)
    assert done.returncode != 0 and b"is a directory" in done.stderr
    assert os.listdir(dest) == [] and not tmp.exists()


def test_an_answer_nested_past_pythons_stack_is_refused_not_raised():
    from remote_runner import manifest
    assert manifest.parse_answer([manifest.ANSWER_MARK + " " + "[" * 200000], 1) is None
