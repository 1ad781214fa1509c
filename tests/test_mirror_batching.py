"""Frames that go together: requests nobody waits for yet, and the replies to requests that came together.

Unit tests of the three pieces (the frame writer's held frames, the agent's
link holding its requests until someone waits or a moment passes, the local
side answering a burst in one write) and of the readers taking a burst in
one read. The lab runs of the mirror tests cover the whole path.
"""

from __future__ import annotations

import os
import threading
import time

from remote_runner.mirror import protocol as P
from remote_runner.mirror.host import link as host_link
from remote_runner.mirror.host.link import Link
from remote_runner.mirror.streams import PeekReader


def _headers(data: bytes):
    """Every frame header in *data* (frames back to back)."""
    out = []
    while data:
        hlen, plen = P.PREFIX.unpack_from(data)
        start = P.PREFIX.size
        out.append(P.parse_header(data[start:start + hlen]))
        data = data[start + hlen + plen:]
    return out


def test_held_frames_go_out_in_order_in_one_write_with_the_next_frame_not_held():
    writes = []
    writer = P.FrameWriter(writes.append)
    writer.send({"t": P.REQ, "id": 1}, defer=True)
    writer.send({"t": P.REQ, "id": 2}, b"data", defer=True)
    assert writes == [] and writer.held() > 0
    assert writer.counters()["bytes_sent"] > 0  # counted when taken, whenever written
    writer.send({"t": P.PING})
    assert len(writes) == 1 and [h.get("id") for h in _headers(writes[0])] == [1, 2, None]
    assert writer.held() == 0.0
    counted = writer.counters()
    assert counted["bytes_sent"] == len(writes[0]) and writer.frames == 3  # each frame counted once
    writer.flush()                               # nothing held: nothing written
    assert len(writes) == 1


def test_flush_writes_what_is_held_and_a_full_buffer_goes_at_once():
    writes = []
    writer = P.FrameWriter(writes.append)
    writer.send({"t": P.REQ, "id": 1}, defer=True)
    writer.flush()
    assert [h["id"] for h in _headers(writes[0])] == [1]
    big = b"x" * (P.FrameWriter.HOLD_LIMIT // 2 + 1)
    writer.send({"t": P.REQ, "id": 2}, big, defer=True)
    assert len(writes) == 1
    writer.send({"t": P.REQ, "id": 3}, big, defer=True)   # past the limit: out now, after id 2
    assert len(writes) == 2 and [h["id"] for h in _headers(writes[1])] == [2, 3]


def test_the_fd_reader_takes_frames_that_came_together_in_one_read(monkeypatch):
    r, w = os.pipe()
    try:
        os.write(w, b"".join(P.encode({"t": P.REP, "id": i}, b"p" * i) for i in range(1, 6)))
        reads = []
        real = os.read
        monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real(fd, n))
        reader = P.FdReader(r)
        got = [P.read_frame(reader) for _ in range(5)]
        assert [(h["id"], p) for h, p in got] == [(i, b"p" * i) for i in range(1, 6)]
        assert len(reads) == 1
        big = P.encode({"t": P.REP, "id": 9}, b"q" * 200000)   # larger than one read ahead
        writer = threading.Thread(target=lambda: os.write(w, big) and None, daemon=True)
        writer.start()
        header, payload = P.read_frame(reader)
        writer.join(5)
        assert header["id"] == 9 and payload == b"q" * 200000
    finally:
        os.close(r)
        os.close(w)


class _Chunks:
    """A stream handing out the given chunks, then the end."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.calls = 0

    def read(self, size: int) -> bytes:
        self.calls += 1
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if len(chunk) > size:
            chunk, rest = chunk[:size], chunk[size:]
            self.chunks.insert(0, rest)
        return chunk


def test_the_peek_reader_reads_ahead_and_says_what_it_holds():
    frames = b"".join(P.encode({"t": P.REQ, "id": i}) for i in range(3))
    stream = _Chunks(b"NEED" + frames)
    reader = PeekReader(stream)
    assert reader.peek(4) == b"NEED" and reader.read(4) == b"NEED"
    ids = []
    ids.append(P.read_frame(reader)[0]["id"])
    assert reader.buffered() > 0
    ids += [P.read_frame(reader)[0]["id"] for _ in range(2)]
    assert ids == [0, 1, 2] and reader.buffered() == 0 and stream.calls <= 2


# --------------------------------------------------------------------------- the agent's link
def _read_available(fd: int, timeout: float = 5.0) -> bytes:
    import select
    if not select.select([fd], [], [], timeout)[0]:
        return b""
    return os.read(fd, 1 << 20)


def test_the_agent_holds_requests_until_someone_waits_for_one():
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    link = Link(down_r, up_w)
    try:
        posted = [link.submit("unlink", {"path": "/t/%d" % i}) for i in range(3)]
        import select
        assert not select.select([up_r], [], [], 0)[0]       # held: nothing written yet
        waited = link.submit("getattr", {"path": "/t"})
        threading.Timer(0.2, lambda: link.deliver({"t": P.REP, "id": waited[3]}, b"")).start()
        link.wait(waited, 5)
        sent = _headers(_read_available(up_r))
        assert [h["op"] for h in sent] == ["unlink"] * 3 + ["getattr"]  # one write, in order
        assert all(not s[0].is_set() for s in posted)
    finally:
        for fd in (up_r, up_w, down_r, down_w):
            os.close(fd)


def test_held_requests_go_out_after_a_moment_when_nobody_waits(monkeypatch):
    monkeypatch.setattr(host_link, "HOLD", 0.05)
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    link = Link(down_r, up_w, heartbeat=30.0)
    try:
        threading.Thread(target=link.flush_loop, daemon=True).start()
        began = time.monotonic()
        link.post("release", {"fh": 7})
        link.post("release", {"fh": 8})
        data = _read_available(up_r)
        waited = time.monotonic() - began
        data += _read_available(up_r, 0.2) if len(_headers(data)) < 2 else b""
        assert [h["a"]["fh"] for h in _headers(data)] == [7, 8]
        assert 0.04 <= waited < 5.0
    finally:
        link.mark_lost("test over")
        for fd in (up_r, up_w, down_r, down_w):
            os.close(fd)


def test_settle_sends_what_is_held_before_it_waits():
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    link = Link(down_r, up_w)
    try:
        slot = link.submit("rmdir", {"path": "/t/d"})
        threading.Timer(0.2, lambda: link.deliver({"t": P.REP, "id": slot[3]}, b"")).start()
        link.settle(5)
        assert slot[0].is_set()
        assert [h["op"] for h in _headers(_read_available(up_r))] == ["rmdir"]
    finally:
        for fd in (up_r, up_w, down_r, down_w):
            os.close(fd)


# --------------------------------------------------------------------------- the local side
def _local_link(chunks):
    from remote_runner.mirror.locallink import LocalLink, MirrorOptions
    from remote_runner.mirror.service import LocalFileService

    class Stream(_Chunks):
        def __init__(self):
            super().__init__(*chunks)
            self.writes = []

        def write_all(self, data):
            self.writes.append(data)

    class Service(LocalFileService):
        def runs_now(self, header, size=0):
            return header.get("op") != "slow"

        def serve(self, header, payload):
            return {"t": P.REP, "id": header["id"]}, b"", False

    stream = Stream()
    link = LocalLink(stream, Service(), MirrorOptions())
    return link, stream


def _run_reader(link):
    try:
        link._read_loop()
    finally:
        link.pool.shutdown(wait=True)
        if link.watcher is not None:
            link.watcher.close()


def test_requests_that_came_together_are_answered_in_one_write():
    burst = b"".join(P.encode({"t": P.REQ, "id": i, "op": "unlink", "a": {}}) for i in range(1, 5))
    alone = P.encode({"t": P.REQ, "id": 9, "op": "getattr", "a": {}})
    link, stream = _local_link([burst, alone])
    _run_reader(link)
    assert [[h["id"] for h in _headers(w)] for w in stream.writes] == [[1, 2, 3, 4], [9]]


def test_a_request_handed_to_the_pool_first_sends_the_replies_held_before_it():
    burst = b"".join(P.encode({"t": P.REQ, "id": i, "op": op, "a": {}})
                     for i, op in ((1, "unlink"), (2, "unlink"), (3, "slow"), (4, "unlink")))
    link, stream = _local_link([burst])
    _run_reader(link)
    writes = [[h["id"] for h in _headers(w)] for w in stream.writes]
    assert writes[0] == [1, 2]                       # out before the pool's request runs
    assert sorted(i for w in writes for i in w) == [1, 2, 3, 4]
