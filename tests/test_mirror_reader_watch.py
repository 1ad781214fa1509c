"""The link's reader reports local changes while it waits for the agent (no watcher thread).

Unit tests over a pipe standing for the agent's channel; the lab runs of the
coherence tests (``test_mirror_coherence_lab.py``) cover the real SSH channel.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from remote_runner.mirror import protocol as P
from remote_runner.mirror.locallink import LocalLink, MirrorOptions
from remote_runner.mirror.service import LocalFileService


class PipeChannel:
    """A stream whose input is a pipe this test writes to, and whose output is kept."""

    def __init__(self, pollable: bool = True) -> None:
        self.rfd, self.wfd = os.pipe()
        self.pollable = pollable
        self.out = bytearray()
        self.wrote = threading.Condition()

    def read(self, size: int) -> bytes:
        try:
            return os.read(self.rfd, size)
        except OSError:
            return b""

    def write_all(self, data: bytes) -> None:
        with self.wrote:
            self.out += data
            self.wrote.notify_all()

    def wait_fd(self):
        return self.rfd if self.pollable else None

    def read_ready(self) -> bool:
        return True

    def close(self) -> None:
        for fd in (self.wfd, self.rfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def exit_status(self, timeout: float = 2.0):
        return 0

    def headers(self):
        out, data = [], bytes(self.out)
        while data:
            hlen, plen = P.PREFIX.unpack_from(data)
            out.append(P.parse_header(data[P.PREFIX.size:P.PREFIX.size + hlen]))
            data = data[P.PREFIX.size + hlen + plen:]
        return out

    def wait_for(self, kind: str, timeout: float = 10.0):
        end = time.monotonic() + timeout
        with self.wrote:
            while True:
                found = [h for h in self.headers() if h.get("t") == kind]
                if found or time.monotonic() > end:
                    return found
                self.wrote.wait(0.05)


@pytest.fixture
def started(tmp_path):
    links = []

    def start(pollable: bool = True):
        stream = PipeChannel(pollable)
        link = LocalLink(stream, LocalFileService(), MirrorOptions())
        if link.watcher is None:
            pytest.skip("no inotify here")
        assert link.watcher.watch(os.fsencode(str(tmp_path)))
        link.booted.set()  # (as after the boot frame: reports go to the host from now on)
        link.start()
        links.append((link, stream))
        return link, stream

    yield start
    for link, stream in links:
        link.mark_lost("test over")
        os.close(stream.wfd)  # the reader's next read finds the end: it stops
        link._reader_thread.join(10)
        assert not link._reader_thread.is_alive()
        os.close(stream.rfd)  # (only now: a number reused while it still read would be read)
        link.watcher.close()
        link.pool.shutdown(wait=False)


def test_a_change_made_here_while_nothing_is_served_reaches_the_host_from_the_reader(started, tmp_path):
    link, stream = started(pollable=True)
    assert link.watcher._thread is None  # no thread of the watcher's own
    assert link.reader.before_read is not None
    time.sleep(0.2)  # the reader is waiting for the agent now
    (tmp_path / "new.txt").write_text("made here")
    invals = stream.wait_for(P.INVAL)
    assert invals, "no invalidation sent while the reader waited"
    assert any(os.fsencode(str(tmp_path / "new.txt")) in [P.name_from_wire(t) for t in h.get("tree", [])]
               for h in invals)


def test_the_reader_still_reads_frames_after_reporting_changes(started, tmp_path):
    link, stream = started(pollable=True)
    (tmp_path / "a").write_text("x")
    assert stream.wait_for(P.INVAL)
    request = {"t": P.REQ, "id": 7, "op": "getattr", "a": {"path": str(tmp_path / "a")}}
    os.write(stream.wfd, P.encode(request))
    deadline = time.monotonic() + 10
    replies = []
    while not replies and time.monotonic() < deadline:
        replies = [h for h in stream.wait_for(P.REP, 0.5) if h.get("id") == 7]
    assert replies and not replies[0].get("e")
    assert P.expand_reply(replies[0])["st"]["st_size"] == 1


def test_input_that_is_not_the_agents_output_yet_does_not_stop_the_reports(started, tmp_path):
    """paramiko's pipe is readable for stderr too: the reader waits (and reports) until output is there."""
    link, stream = started(pollable=True)
    ready = threading.Event()
    stream.read_ready = ready.is_set  # (as if only the agent's stderr had come)
    request = {"t": P.REQ, "id": 9, "op": "getattr", "a": {"path": str(tmp_path)}}
    os.write(stream.wfd, P.encode(request))
    time.sleep(0.1)
    (tmp_path / "meanwhile").write_text("x")
    assert stream.wait_for(P.INVAL)  # reported while the input was not the agent's yet
    assert not [h for h in stream.headers() if h.get("t") == P.REP]
    ready.set()
    deadline = time.monotonic() + 10
    while not [h for h in stream.headers() if h.get("t") == P.REP] and time.monotonic() < deadline:
        stream.wait_for(P.REP, 0.5)
    assert [h.get("id") for h in stream.headers() if h.get("t") == P.REP] == [9]


def test_a_stream_that_cannot_be_polled_keeps_the_watchers_own_thread(started, tmp_path):
    link, stream = started(pollable=False)
    assert link.watcher._thread is not None and link.reader.before_read is None
    (tmp_path / "other.txt").write_text("made here")
    assert stream.wait_for(P.INVAL)


class StuckChannel:
    """A stream whose host stopped reading: a write blocks until the stream is closed; reads
    wait for nothing (the agent says nothing either)."""

    def __init__(self):
        self.closed = threading.Event()

    def read(self, size):
        self.closed.wait()
        return b""

    def read_stderr(self, size):
        self.closed.wait()
        return b""

    def write_all(self, data):
        self.closed.wait()
        raise OSError("channel closed")

    def exit_status(self, timeout):
        return None

    def close(self):
        self.closed.set()


def test_a_write_stuck_on_a_host_that_stopped_reading_ends_at_the_deadline():
    """The heartbeat never queues behind the stuck write: past the deadline it marks the link
    lost and closes the stream, which frees the writer, and close() returns."""
    stream = StuckChannel()
    link = LocalLink(stream, LocalFileService(), MirrorOptions(heartbeat=0.1, deadline=0.5),
                     host="h1")
    link.start()
    writer = threading.Thread(target=link.send, args=({"t": P.PING},), daemon=True)
    writer.start()  # blocked in the stream's write, holding the frame writer
    assert link.lost.wait(30), "the link was never given up"
    assert "no answer from the agent" in link.lost_reason and stream.closed.is_set()
    writer.join(30)
    assert not writer.is_alive()
    closing = threading.Thread(target=link.close, daemon=True)
    closing.start()
    closing.join(30)
    assert not closing.is_alive()
