"""Lanes: large replies over extra SSH channels, and what keeps them safe.

Unit tests drive both ends' pieces (the agent's listener on a real UNIX
socket, its link's re-asking, the local side's lane choice and fallbacks);
the lab tests run real commands whose files come over lanes, and one whose
lanes are killed on the host in the middle of its reads.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from remote_runner.mirror import protocol as P
from remote_runner.mirror.host.lanes import LaneListener
from remote_runner.mirror.host.link import Link
from remote_runner.mirror.host.state import READ_AGAIN, MountState
from remote_runner.mirror.lanes import LANE_MIN, Lanes, relay_command
from tests.conftest import ssh
from tests.test_mirror_lab import EXEC_TIMEOUT, local_only, rr_exec, workdir  # noqa: F401


# --------------------------------------------------------------------------- the agent's listener
class _Listener:
    def __init__(self) -> None:
        self.delivered = []
        self.accepted = []
        self.ended = threading.Event()
        self.lanes = LaneListener(lambda h, p: self.delivered.append((h, p)),
                                  accepted=self.accepted.append, ended=lambda n: self.ended.set())

    def connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.lanes.path)
        return conn


def _until(check, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.01)
    return check()


def test_the_listener_is_private_and_refuses_a_wrong_token():
    t = _Listener()
    try:
        assert os.stat(t.lanes.directory).st_mode & 0o777 == 0o700
        t.lanes.start(2)
        bad = t.connect()
        bad.sendall(P.encode({"t": P.LANE, "token": "0" * 32, "lane": 0}))
        assert _until(lambda: t.lanes.stats()["lanes_refused"] == 1)
        assert bad.recv(1) == b""  # closed by the agent
        with pytest.raises(OSError):
            for _ in range(100):  # nothing more is read from it
                bad.sendall(P.encode({"t": P.REP, "id": 1}, b"forged"))
        assert t.delivered == [] and t.accepted == [] and not t.ended.is_set()
    finally:
        t.lanes.close()
    assert not os.path.exists(t.lanes.directory)


def test_an_accepted_lane_delivers_replies_only_and_its_end_is_reported():
    t = _Listener()
    try:
        t.lanes.start(1)
        conn = t.connect()
        conn.sendall(P.encode({"t": P.LANE, "token": t.lanes.token, "lane": 5}))
        conn.sendall(P.encode({"t": P.REP, "id": 7}, b"data"))
        assert _until(lambda: len(t.delivered) == 1)
        assert t.accepted == [5]
        assert t.delivered[0] == ({"t": P.REP, "id": 7}, b"data")
        conn.sendall(P.encode({"t": P.INVAL, "all": True}))  # not a reply: the lane is closed
        assert t.ended.wait(10)
        assert len(t.delivered) == 1
        # Only as many lanes as were asked for: the listener is gone after the first.
        assert _until(lambda: not os.path.exists(t.lanes.path))
    finally:
        t.lanes.close()


def test_start_with_no_lanes_removes_the_socket():
    t = _Listener()
    t.lanes.start(0)
    assert not os.path.exists(t.lanes.directory)


# --------------------------------------------------------------------------- the agent's link
def _frames(fd: int, count: int):
    reader = P.FdReader(fd)
    return [P.read_frame(reader)[0] for _ in range(count)]


def test_unanswered_reads_are_asked_again_and_the_first_answer_wins():
    up_r, up_w = os.pipe()     # agent -> local
    down_r, down_w = os.pipe()
    link = Link(down_r, up_w)
    try:
        read = link.submit("read", {"fh": 3, "off": 0, "size": 10})
        link.submit("getattr", {"path": "/x"})
        answered = link.submit("read", {"fh": 4, "off": 0, "size": 10})
        link.deliver({"t": P.REP, "id": answered[3]}, b"early")
        link.resend_pending("read")
        sent = _frames(up_r, 4)
        assert [f["id"] for f in sent] == [read[3], read[3] + 1, answered[3], read[3]]
        assert sent[3] == sent[0]  # the same request, the same id
        link.deliver({"t": P.REP, "id": read[3]}, b"first")
        link.deliver({"t": P.REP, "id": read[3]}, b"second")
        assert link.wait(read, 5)[1] == b"first"
        assert link.wait(answered, 5)[1] == b"early"
    finally:
        for fd in (up_r, up_w, down_r, down_w):
            os.close(fd)


class _Cache:
    """Stands in for the name cache: *changes* invalidations cross the next reads."""

    def __init__(self, changes: int) -> None:
        self.changes = changes
        self.epoch = 0

    def begin(self) -> int:
        return self.epoch + 1

    def changed_since(self, name: str, since: int) -> bool:
        if self.changes:
            self.changes -= 1
            self.epoch += 1
            return True
        return False


class _State:
    wire = MountState.wire
    read_through = MountState.read_through
    prefix = b""

    def __init__(self, changes: int) -> None:
        self.cache = _Cache(changes)
        self.reads = 0

    def call(self, op, args, payload=b""):
        self.reads += 1
        return {}, b"v%d" % self.reads


@pytest.mark.parametrize("changes, reads", [(0, 1), (1, 2), (READ_AGAIN + 5, READ_AGAIN)])
def test_a_read_crossed_by_an_invalidation_is_made_again(changes, reads):
    state = _State(changes)
    assert state.read_through("/f", 9, 10, 0) == b"v%d" % reads
    assert state.reads == reads


# --------------------------------------------------------------------------- the local side
class _Stream:
    def __init__(self, command: str, fail_after: int = -1) -> None:
        self.command = command
        self.frames = []
        self.fail_after = fail_after
        self.closed = False

    def write_all(self, data: bytes) -> None:
        if self.closed or self.fail_after == len(self.frames):
            raise OSError(32, "channel closed")
        self.frames.append(data)

    def close(self) -> None:
        self.closed = True


def _lanes(fail_after: int = -1, count: int = 2):
    streams = []

    def open_stream(command: str) -> _Stream:
        streams.append(_Stream(command, fail_after))
        return streams[-1]
    lanes = Lanes(open_stream, {"socket": "/tmp/rr-lanes-x/s", "token": "t0k"}, "/usr/bin/python3",
                  P.FrameWriter(lambda data: None), count=count)
    return lanes, streams


def test_no_lane_is_used_before_the_agent_accepts_it():
    lanes, streams = _lanes()
    big = b"x" * LANE_MIN
    assert not lanes.send({"t": P.REP, "id": 1}, big)  # starts opening; the caller sends it
    assert _until(lambda: len(streams) == 2 and all(s.frames for s in streams))
    assert not lanes.send({"t": P.REP, "id": 2}, big)  # opened, not accepted yet
    assert all(len(s.frames) == 1 for s in streams)
    first = _first_frame(streams[0].frames[0])
    assert first["t"] == P.LANE and first["token"] == "t0k"
    lanes.confirmed({"t": P.LANE, "lane": first["lane"]})
    assert not lanes.send({"t": P.REP, "id": 3}, b"small")  # small replies stay on the main channel
    assert lanes.send({"t": P.REP, "id": 4}, big)
    assert len(streams[0].frames) == 2
    assert lanes.stats()["lane_frames"] == 1
    # The token travels in the lane, never on the relay's command line.
    assert "t0k" not in streams[0].command and "/tmp/rr-lanes-x/s" in streams[0].command


def _first_frame(data: bytes):
    """The header of the frame at the start of *data*."""
    r, w = os.pipe()
    try:
        os.write(w, data)
        os.close(w)
        return P.read_frame(P.FdReader(r))[0]
    finally:
        os.close(r)


def test_a_lane_whose_write_fails_is_retired_and_the_reply_goes_back_to_the_caller():
    lanes, streams = _lanes(fail_after=1, count=1)
    big = b"y" * LANE_MIN
    lanes.send({"t": P.REP, "id": 1}, big)
    assert _until(lambda: streams and streams[0].frames)
    lanes.confirmed({"t": P.LANE, "lane": 0})
    assert not lanes.send({"t": P.REP, "id": 2}, big)
    assert streams[0].closed
    assert lanes.stats()["lanes_failed"] == 1 and lanes.stats()["lanes_open"] == 0
    assert not lanes.send({"t": P.REP, "id": 3}, big)  # no lane left, and none reopened


def test_the_relay_command_quotes_every_word():
    command = relay_command("/opt/py thon/bin/python3", "/tmp/a b/s")
    assert command.startswith("exec '/opt/py thon/bin/python3' -I -S -c '")
    assert command.endswith(" '/tmp/a b/s'")


def test_the_relay_copies_stdin_to_the_socket(tmp_path):
    path = str(tmp_path / "s")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    data = os.urandom(3 << 20)
    proc = subprocess.Popen(["sh", "-c", relay_command(sys.executable, path)], stdin=subprocess.PIPE)
    conn, _ = server.accept()
    got = bytearray()
    reader = threading.Thread(target=lambda: _drain(conn, got))
    reader.start()
    proc.communicate(data, timeout=60)
    reader.join(60)
    conn.close()
    server.close()
    assert proc.returncode == 0 and bytes(got) == data


def _drain(conn: socket.socket, into: bytearray) -> None:
    while True:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return
        into += chunk


# --------------------------------------------------------------------------- real hosts
def _files(where: Path):
    made = {}
    for i in range(3):
        made[f"r{i}"] = os.urandom((5 << 20) + i * 4099)
    made["text"] = b"".join(b"line %d of a compressible file\n" % i for i in range(200000))
    for name, data in made.items():
        (where / name).write_bytes(data)
    return {name: hashlib.sha1(data).hexdigest() for name, data in made.items()}


def _sums(out: bytes):
    return {os.path.basename(line.split()[1]): line.split()[0] for line in out.decode().splitlines()}


@pytest.mark.lab
@pytest.mark.parametrize("cache", [True, False], ids=["whole-copies", "no-cache"])
def test_large_files_come_over_lanes_intact(lab, local_only, workdir, tmp_path, cache):
    sums = _files(local_only)
    stats = tmp_path / "stats.json"
    ssh(lab, "h2", "rm -rf ~/.cache/remote-runner/files", check=False)
    options = ["--stats", str(stats)] + ([] if cache else ["--no-cache"])
    before = _lane_dirs(lab)
    proc = rr_exec(lab, "h2", ["sha1sum", *(str(local_only / n) for n in sorted(sums))], workdir, *options)
    assert proc.returncode == 0, proc.stderr.decode()
    assert _sums(proc.stdout) == sums
    counters = json.loads(stats.read_text())
    assert counters["host"]["lanes"] >= 1, counters
    assert counters["lane_frames"] > 0 and counters["host"]["lane_frames"] == counters["lane_frames"], counters
    assert counters["host"]["lanes_refused"] == 0
    # Nothing of the listener is left on the host.
    assert _lane_dirs(lab) <= before


@pytest.mark.lab
def test_lanes_killed_mid_read_leave_every_byte_to_the_main_channel(lab, local_only, workdir, tmp_path):
    """The relays die between two reads: what they held is asked for again, nothing is lost."""
    big = os.urandom(24 << 20)
    (local_only / "big").write_bytes(big)
    code = ("import hashlib, sys\n"
            f"f = open({str(local_only / 'big')!r}, 'rb')\n"
            "h = hashlib.sha1(f.read(4 << 20))\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()\n"
            "while True:\n"
            "    b = f.read(1 << 20)\n"
            "    if not b: break\n"
            "    h.update(b)\n"
            "print(h.hexdigest(), flush=True)\n")
    stats = tmp_path / "stats.json"
    before = _lane_dirs(lab)
    proc = subprocess.Popen([sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config,
                             "--no-cache", "--stats", str(stats), "h2", "/usr/bin/python3", "-c", code],
                            cwd=str(workdir), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()
        # The relays this run started (their command line names the lane socket), once the
        # agent accepted all three (it then removes the socket's directory).
        assert _until(lambda: len(_relays(lab)) >= 3 and _lane_dirs(lab) <= before, 20), "the lanes were not opened"
        pids = _relays(lab)
        ssh(lab, "h2", "kill -9 " + " ".join(pids))
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=EXEC_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == hashlib.sha1(big).hexdigest()
    assert json.loads(stats.read_text())["host"]["lanes"] == 3


def _lane_dirs(lab) -> set:
    """The lane socket directories on h2 (an agent killed by SIGKILL elsewhere may leave one)."""
    return set(ssh(lab, "h2", "ls -d /tmp/rr-lanes-* 2>/dev/null || true").stdout.split())


def _relays(lab):
    out = ssh(lab, "h2", "pgrep -f 'rr-lanes-.*/s$' || true").stdout.split()
    return [pid for pid in out if pid.isdigit()]


def test_channels_sharing_a_policy_measure_their_pace_together():
    """Two lanes each writing 1 MiB in the same second carry 2 MiB/s, not 1 MiB/s each."""
    shared, alone = P.PackPolicy(), P.PackPolicy()
    shared.wrote(1 << 20, 1.0, ended=11.0)    # 10.0 .. 11.0 on one channel
    shared.wrote(1 << 20, 1.0, ended=11.0)    # the same second on another
    alone.wrote(1 << 20, 1.0, ended=11.0)
    alone.wrote(1 << 20, 1.0, ended=12.0)     # one after the other
    assert shared.link_rate() >= 1.9 * alone.link_rate()  # (recent samples weigh more)
    assert alone.link_rate() == pytest.approx(1 << 20, rel=0.01)


def test_no_invalidation_reaches_the_agent_before_its_boot_frame():
    """The watcher runs from the plan on; a local change during the handshake must not come first."""
    from remote_runner.mirror.locallink import LocalLink, MirrorOptions
    from remote_runner.mirror.service import LocalFileService

    class Sink:
        def __init__(self):
            self.frames = []

        def write_all(self, data):
            self.frames.append(_first_frame(data)["t"])

        def read(self, size):
            return b""

    sink = Sink()
    link = LocalLink(sink, LocalFileService(), MirrorOptions())
    try:
        link._report([b"/tmp/made-meanwhile"], [], False)
        assert sink.frames == []
        link.boot({"argv": []})
        link._report([b"/tmp/made-after"], [], False)
        assert sink.frames == [P.BOOT, P.INVAL]
    finally:
        link.pool.shutdown(wait=False)
        if link.watcher is not None:
            link.watcher.close()


def test_a_reply_that_cannot_be_packed_still_answers_the_host(monkeypatch):
    """A failure of ours while sending a reply answers EIO at once: the host never waits it out."""
    from remote_runner.mirror.locallink import LocalLink, MirrorOptions
    from remote_runner.mirror.service import LocalFileService

    class Sink:
        def __init__(self):
            self.frames = []

        def write_all(self, data):
            self.frames.append(_first_frame(data))

        def read(self, size):
            return b""

    class Service(LocalFileService):
        def serve(self, header, payload):   # a megabyte that packs well
            return {"t": P.REP, "id": header["id"]}, b"a" * (1 << 20), True

    def broken(data, codec="lz4"):
        raise RuntimeError("packing broke")

    sink = Sink()
    link = LocalLink(sink, Service(), MirrorOptions())
    try:
        link.writer.compress = "zlib"
        monkeypatch.setattr(P, "compress", broken)
        link._serve({"t": P.REQ, "id": 7, "op": "getattr", "a": {}}, b"")
        assert sink.frames == [{"t": P.REP, "id": 7, "e": errno.EIO}]
    finally:
        link.pool.shutdown(wait=False)
        if link.watcher is not None:
            link.watcher.close()
