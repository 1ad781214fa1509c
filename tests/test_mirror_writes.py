"""Unit tests of pipelined writes: the agent's pending writes and the local side's per-handle order."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from remote_runner.mirror.host.writes import PendingChanges, PendingWrites, WriteOrder


class FakeLink:
    """Requests answered later, by the test: fail those whose offset is in *failing*."""

    def __init__(self, failing=()):
        self.sent = []
        self.failing = set(failing)

    def submit(self, op, args, payload):
        self.sent.append((op, dict(args), payload))
        return args

    def wait(self, slot):
        if slot["off"] in self.failing:
            raise OSError(errno.ENOSPC, "full")
        return {}, b""


def test_writes_return_at_once_and_errors_come_at_settle():
    link = FakeLink(failing={4096})
    writes = PendingWrites(link.submit, link.wait)
    assert writes.write(7, 0, b"a" * 4096) == 4096
    assert writes.write(7, 4096, b"b" * 10) == 10
    assert [a["seq"] for _, a, _ in link.sent] == [1, 2]
    assert writes.pending(7)
    with pytest.raises(OSError) as info:
        writes.settle(7)
    assert info.value.errno == errno.ENOSPC
    writes.settle(7)  # reported once
    assert not writes.pending(7)


def test_other_handles_are_not_affected():
    link = FakeLink(failing={0})
    writes = PendingWrites(link.submit, link.wait)
    writes.write(1, 0, b"x")
    writes.write(2, 1, b"y")
    writes.settle(2)
    with pytest.raises(OSError):
        writes.settle(1)


def test_too_much_in_flight_waits_for_the_oldest(monkeypatch):
    from remote_runner.mirror.host import writes as W
    monkeypatch.setattr(W, "IN_FLIGHT_BYTES", 10)
    waited = []
    link = FakeLink()
    writes = PendingWrites(link.submit, lambda slot: waited.append(slot["off"]))
    for i in range(4):
        writes.write(1, i * 6, b"x" * 6)
    assert waited and waited[0] == 0


def test_write_order_runs_a_handles_requests_in_sequence():
    order = WriteOrder(timeout=30)
    done = []

    def later(seq):
        order.run("h", seq, lambda: done.append(seq))

    threads = [threading.Thread(target=later, args=(s,)) for s in (3, 2)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    assert done == []
    order.run("h", 1, lambda: done.append(1))
    for t in threads:
        t.join(30)
    assert done == [1, 2, 3]
    assert order.run("h", None, lambda: "free") == "free"


def test_only_the_change_due_next_runs_on_the_reader_the_others_wait_in_the_pool():
    from remote_runner.mirror.service import LocalFileService
    svc = LocalFileService()

    def request(**args):
        return {"t": "req", "id": 1, "op": "unlink", "a": args}

    assert svc.runs_now(request(nseq=1))
    assert not svc.runs_now(request(nseq=2))          # its predecessor has not run
    assert not svc.runs_now(request(path="x"))        # waited for: the pool serves it
    assert not svc.runs_now(request(nseq=True))
    svc.order.run("changes", 1, lambda: None)
    assert svc.runs_now(request(nseq=2)) and not svc.runs_now(request(nseq=3))
    assert not svc.runs_now(request(nseq=2, after=2))  # sent after a change still to come
    assert svc.runs_now(request(nseq=2, after=1))
    assert svc.order.is_past("changes", 1) and not svc.order.is_past("changes", 2)


def test_a_new_files_create_write_flush_release_run_on_the_reader_when_due_and_unable_to_block(tmp_path):
    """A handle the host numbered: its next request runs on the reader if it cannot block
    (a create; a small write, a flush, a release of a regular file on a local disk), never
    one still to wait for its turn, nor one on a FIFO's handle; a create that finds a FIFO
    made meanwhile fails with EAGAIN on the reader instead of waiting there for a writer."""
    from remote_runner.mirror import protocol as P
    from remote_runner.mirror.replies import OpError
    from remote_runner.mirror.service import LocalFileService
    from remote_runner.mirror.watcher import FsTypes
    svc = LocalFileService()
    svc.reader_ident = threading.get_ident()  # this test plays the link's reader
    fh = P.POSTED_HANDLES[0] + 3
    dev = os.stat(tmp_path).st_dev

    def file_system(kind):  # what tmp_path's file system is taken for
        mountinfo = tmp_path / ("mountinfo-" + kind)
        mountinfo.write_text("36 35 %d:%d / %s rw - %s dev rw\n" % (os.major(dev), os.minor(dev), tmp_path, kind))
        svc._local_fs = FsTypes(str(mountinfo))

    file_system("ext4")

    def request(op, **args):
        return {"t": "req", "id": 1, "op": op, "a": dict(args, fh=fh)}

    create = request("create", path=str(tmp_path / "new"), mode=0o644, flags=os.O_WRONLY, seq=1)
    assert svc.runs_now(create)
    assert not svc.runs_now(request("write", off=0, seq=2))  # its create has not run
    assert not svc.runs_now(request("write", off=0, seq=1))  # no regular file behind it yet
    assert svc.handle("create", create["a"], b"").fields["fh"] == fh
    assert svc.runs_now(request("write", off=0, seq=2), 2)
    assert not svc.runs_now(request("write", off=0, seq=2), 1 << 20)  # may wait for write-back
    assert not svc.runs_now(request("write", off=0, seq=3))
    assert not svc.runs_now(request("write", off=0, seq=2, after=1))  # after a change still to come
    assert not svc.runs_now(request("read", off=0, size=1, seq=2))
    svc.handle("write", request("write", off=0, seq=2)["a"], b"hi")
    assert svc.runs_now(request("flush", seq=3))
    svc.handle("flush", request("flush", seq=3)["a"], b"")
    svc.handle("release", request("release", seq=4)["a"], b"")
    assert (tmp_path / "new").read_bytes() == b"hi"

    file_system("nfs4")  # a close there writes back to the server
    remote = request("create", path=str(tmp_path / "remote"), mode=0o644, flags=os.O_WRONLY, seq=1)
    remote["a"]["fh"] = fh + 10
    svc.handle("create", remote["a"], b"")
    assert not svc.runs_now({"t": "req", "id": 2, "op": "flush", "a": {"fh": fh + 10, "seq": 2}})
    svc.handle("release", {"fh": fh + 10, "seq": 2}, b"")

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    other = fh + 1
    with pytest.raises(OpError) as failed:
        svc.handle("create", {"path": str(fifo), "mode": 0o644, "flags": os.O_WRONLY, "fh": other, "seq": 1}, b"")
    assert failed.value.errno == errno.EAGAIN                # no writer: it would wait on the reader

    opened = []                                              # off the reader, it waits as locally
    worker = threading.Thread(target=lambda: opened.append(svc.handle(
        "create", {"path": str(fifo), "mode": 0o644, "flags": os.O_WRONLY, "fh": other + 1, "seq": 1}, b"")))
    worker.start()
    with open(fifo, "rb"):
        worker.join(30)
    assert opened and opened[0].fields["fh"] == other + 1
    assert not svc.runs_now({"t": "req", "id": 2, "op": "write", "a": {"fh": other + 1, "off": 0, "seq": 2}})
    svc.close()


def test_a_change_sent_after_a_new_files_requests_runs_after_them_without_the_host_waiting():
    """``after_fh``: a chmod/chown/utimens of a file created without waiting is ordered after the
    create and writes sent before it, on this side; a released handle the host numbered is done
    for good; a malformed or foreign entry is ignored."""
    from remote_runner.mirror import protocol as P
    from remote_runner.mirror.service import LocalFileService, _handles_before
    svc = LocalFileService()
    fh, other = P.POSTED_HANDLES[0] + 7, P.POSTED_HANDLES[0] + 8

    def request(**args):
        return {"t": "req", "id": 1, "op": "chmod", "a": args}

    chmod = request(nseq=1, after_fh=[[fh, 2]])
    assert not svc.runs_now(chmod)                     # the create (1) and write (2) still to come
    ran = []
    waiter = threading.Thread(target=lambda: (svc.order.wait_past(fh, 2), ran.append("chmod")))
    waiter.start()
    svc.order.run(fh, 1, lambda: ran.append("create"))
    assert not svc.runs_now(chmod)
    svc.order.run(fh, 2, lambda: ran.append("write"))
    waiter.join(30)
    assert ran == ["create", "write", "chmod"] and svc.runs_now(chmod)

    late = threading.Thread(target=lambda: (svc.order.wait_past(other, 3), ran.append("late")))
    late.start()                                      # waits for a request of *other* ...
    svc.order.forget(other, for_good=True)            # ... released: nothing more comes on it
    late.join(30)
    assert ran[-1] == "late" and svc.order.is_past(other, 99)
    svc.order.forget("h")                             # (a number that may come again: not done)
    assert not svc.order.is_past("h", 1)

    assert _handles_before({"after_fh": [[fh, 2]]}) == [(fh, 2)]
    for junk in ([[3, 2]], [[fh, 0]], [[fh, True]], [[fh]], "x", [[fh, 1]] * 65, [["a", 1]]):
        assert _handles_before({"after_fh": junk}) == [], junk


def test_a_failing_request_still_lets_the_next_one_run():
    order = WriteOrder(timeout=30)

    def boom():
        raise OSError(errno.EBADF, "bad")

    with pytest.raises(OSError):
        order.run("h", 1, boom)
    assert order.run("h", 2, lambda: "ran") == "ran"


def test_released_posted_handles_are_remembered_in_a_bounded_set():
    """A session's posted handles are numbered upwards; once released, all below the lowest
    still open are one watermark, not one int each."""
    from remote_runner.mirror import protocol as P
    order = WriteOrder(timeout=0.2)
    base = P.POSTED_HANDLES[0]
    handles = list(range(base, base + 3000))
    kept = handles[1500]  # still open
    for fh in handles[:1500] + handles[1501:][::-1]:  # the later ones released out of order
        order.run(fh, 1, lambda: None)
        order.forget(fh, for_good=True)
    assert all(order.is_past(fh, 1) for fh in handles if fh != kept)
    assert not order.is_past(kept, 1) and not order.is_past(base + 3000, 1)
    assert len(order._gone) == 1499  # those above the open one
    order.forget(kept, for_good=True)
    assert order._gone == set() and all(order.is_past(fh, 5) for fh in handles)
    order.wait_past(handles[7], 3)  # a released handle: nothing to wait for
    order.forget("h", for_good=True)  # (not a posted number: kept by name)
    assert order.is_past("h", 1)


def test_a_missing_predecessor_times_out_with_eio():
    order = WriteOrder(timeout=0.2)
    with pytest.raises(OSError) as info:
        order.run("h", 2, lambda: None)
    assert info.value.errno == errno.EIO


def test_a_directory_guess_moves_its_times_and_links_and_is_replaced_only_by_its_own_reply():
    import stat

    from remote_runner.mirror.host.writes import DirectoryGuesses, predicted_directory
    folder = {"st_mode": stat.S_IFDIR | 0o755, "st_ino": 7, "st_nlink": 5, "st_uid": 1, "st_gid": 2,
              "st_size": 4096, "st_mtime": 2_000, "st_ctime": 3_000}
    guess = predicted_directory(folder, "rmdir", now_ns=1_000)  # the host's clock lags: still later
    assert guess["st_mtime"] == guess["st_ctime"] == 3_001 and guess["st_nlink"] == 4
    assert {k: guess[k] for k in ("st_mode", "st_ino", "st_uid", "st_gid", "st_size")} == \
        {k: folder[k] for k in ("st_mode", "st_ino", "st_uid", "st_gid", "st_size")}
    assert predicted_directory(folder, "unlink", now_ns=9_000)["st_nlink"] == 5
    assert predicted_directory(dict(folder, st_nlink=1), "rmdir", 9_000)["st_nlink"] == 1  # (btrfs)
    assert predicted_directory({"missing": True}, "unlink", 9_000) is None
    assert predicted_directory(dict(folder, st_mode=stat.S_IFREG | 0o644), "unlink", 9_000) is None
    assert predicted_directory(None, "unlink", 9_000) is None
    guesses = DirectoryGuesses()
    first = guesses.begin("/d")
    second = guesses.begin("/d")
    assert guesses and not guesses.end("/d", first)  # a later change's guess stands
    assert guesses.end("/d", second) and not guesses


def test_the_kernels_copy_of_a_guess_is_dropped_only_when_the_kernel_was_given_it():
    from remote_runner.mirror.host.writes import DirectoryGuesses
    guesses = DirectoryGuesses()
    token = guesses.begin("/d")
    assert guesses.end("/d", token) and not guesses.given("/d")  # answered before the kernel asked
    token = guesses.begin("/d")
    guesses.handed("/d")  # the kernel asked for the directory meanwhile: it holds the guess
    guesses.handed("/other")  # (no guess there: real attributes)
    assert guesses.end("/d", token) and guesses.given("/d") and not guesses.given("/d")
    assert not guesses.given("/other")
    first = guesses.begin("/d")
    guesses.handed("/d")
    second = guesses.begin("/d")  # a later change there: the kernel dropped its copy itself
    assert not guesses.end("/d", first)
    assert guesses.end("/d", second) and not guesses.given("/d")
    token = guesses.begin("/f")
    guesses.handed("/f")
    guesses.supersede("/f")  # newer attributes stand: no reply replaces them, nothing is dropped
    assert not guesses.end("/f", token) and not guesses.given("/f")


def test_a_change_sent_on_hands_its_reply_to_whoever_learns_from_it():
    def submit(op, args, payload):
        slot = [threading.Event(), args["path"]]
        slot[0].set()  # answered at once
        return slot

    def wait(slot):
        if slot[1].endswith("bad"):
            raise OSError(errno.EIO, "failed")
        return {"dst": {"st_nlink": 2}}, b""

    learned = []
    changes = PendingChanges(submit, wait)
    changes.confirm("/d")
    changes.post("unlink", {"path": "/d/a"}, ["/d"], undo=lambda: None, done=learned.append)
    assert changes.pending
    changes.collect()
    assert learned == [{"dst": {"st_nlink": 2}}] and not changes.pending
    undone = []
    changes.post("unlink", {"path": "/d/bad"}, ["/d"], undo=lambda: undone.append(1), done=learned.append)
    with pytest.raises(OSError):
        changes.check("/d")
    assert undone == [1] and len(learned) == 1  # a failed change teaches nothing


def test_a_file_grows_by_its_own_writes_and_its_times_only_move_forward():
    import stat

    from remote_runner.mirror.host.written import grown_file
    new = {"st_mode": stat.S_IFREG | 0o644, "st_ino": 9, "st_size": 0, "st_blocks": 0,
           "st_mtime": 5_000, "st_ctime": 5_000}
    first = grown_file(new, 0, 100, now_ns=4_000)  # the host's clock lags
    assert first["st_size"] == 100 and first["st_blocks"] == 1 and first["st_mtime"] == first["st_ctime"] == 5_001
    back = grown_file(first, 10, 6, now_ns=9_000)  # a write inside the file: the size stays
    assert back["st_size"] == 100 and back["st_mtime"] == 9_000 and back["st_ino"] == 9
    assert grown_file(dict(new, st_mode=stat.S_IFDIR | 0o755), 0, 1, 1) is None
    assert grown_file({"missing": True}, 0, 1, 1) is None and grown_file(None, 0, 1, 1) is None


def test_what_a_file_was_written_with_answers_its_reads_until_anything_else_touches_it():
    from remote_runner.mirror.host.written import WrittenFiles
    stamps = {}
    changed = lambda name, since: stamps.get(name, -1) >= since  # noqa: E731 (NameCache.changed_since)
    files = WrittenFiles(limit=100)
    files.start("/a", 7, since=5)
    files.wrote("/a", 7, 0, b"hello")
    files.wrote("/a", 7, 10, b"world")  # a hole between: zeros
    assert files.read("/a", 0, 4096, changed) == b"hello\0\0\0\0\0world"  # short: the file ends there
    files.wrote("/a", 7, 1, b"E")
    assert files.read("/a", 0, 3, changed) == b"hEl" and files.read("/a", 15, 10, changed) == b""
    assert files.read("/b", 0, 1, changed) is None
    stamps["/a"] = 6  # this machine reported a change: ask again from now on
    assert files.read("/a", 0, 1, changed) is None and not files
    files.start("/a", 7, since=9)
    files.wrote("/a", 8, 0, b"x")  # another handle wrote to it
    assert files.read("/a", 0, 1, changed) is None
    files.start("/c", 1, since=9)
    files.wrote("/c", 1, 90, b"0123456789abc")  # past the limit
    assert files.read("/c", 0, 1, changed) is None
    files.start("/d", 1, since=9)
    files.drop("/d")
    assert files.read("/d", 0, 1, changed) is None


def test_what_was_written_is_kept_within_a_budget_oldest_first():
    from remote_runner.mirror.host.written import WrittenFiles
    never = lambda name, since: False  # noqa: E731
    files = WrittenFiles(limit=100, total=150)
    for name in ("/a", "/b", "/c"):
        files.start(name, 1, since=0)
        files.wrote(name, 1, 0, b"x" * 60)
    assert files.read("/a", 0, 1, never) is None  # the oldest went to make room
    assert files.read("/b", 0, 1, never) == b"x" and files.read("/c", 0, 1, never) == b"x"
    files.start("/b", 2, since=0)  # emptied again: its old bytes no longer count
    files.wrote("/b", 2, 0, b"y" * 60)
    assert files.read("/c", 0, 1, never) == b"x" and files.read("/b", 0, 1, never) == b"y"


def test_names_made_in_the_session_are_forgotten_with_their_directory():
    """A chmod is posted only for what the mount made: a renamed or removed directory takes its names along."""
    from remote_runner.mirror.host.names import NameCache
    from remote_runner.mirror.host.state import MountState

    class State:
        remember_made = MountState.remember_made
        unmade = MountState.unmade

        def __init__(self):
            self.made = set()
            self.new_files = {}
            self.cache = NameCache()

    state = State()
    for name in ("/t/d", "/t/d/f", "/t/d/sub/g", "/t/dx", "/t/e"):
        state.remember_made(name)
    state.unmade("/t/e")
    assert "/t/e" not in state.made
    state.unmade("/t/d", tree=True)
    assert state.made == {"/t/dx"}  # a sibling whose name only starts the same stays


def test_an_answer_nobody_will_take_is_forgotten_when_it_comes_or_at_once():
    """A handle opened without waiting and released unused leaves no request behind in the link."""
    from remote_runner.mirror import protocol as P
    from remote_runner.mirror.host.link import Link
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    link = Link(down_r, up_w)
    try:
        writes = PendingWrites(link.submit, link.wait, link.abandon)
        writes.opened(7, lambda seq: link.submit("open", {"fh": 7, "seq": seq}), lambda _: None)
        answered = link.submit("open", {"fh": 8})
        link.deliver({"t": P.REP, "id": answered[3]}, b"")
        writes.forget(7)                       # released before its open was answered
        link.abandon(answered)                 # and one answered already
        assert list(link._pending) == [answered[3] - 1]
        link.deliver({"t": P.REP, "id": answered[3] - 1}, b"")
        assert link._pending == {}
    finally:
        for fd in (up_r, up_w, down_r, down_w):
            os.close(fd)


def test_the_link_counts_the_time_callers_spent_waiting_for_answers():
    """``waits``/``waited_s``: a caller blocked on an answer counts one wait and its time; an answer
    already there counts nothing, whether it was asked for by a request, a batch or a close."""
    from remote_runner.mirror import protocol as P
    from remote_runner.mirror.host.link import Link
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    link = Link(down_r, up_w)
    try:
        ready = link.submit("getattr", {"path": "/a"})
        link.deliver({"t": P.REP, "id": ready[3]}, b"")
        link.wait(ready)
        assert (link.stats()["waits"], link.stats()["waited_s"]) == (0, 0)
        late = link.submit("getattr", {"path": "/b"})
        timer = threading.Timer(0.3, link.deliver, ({"t": P.REP, "id": late[3]}, b""))
        timer.start()
        link.wait(late, timeout=30)
        timer.join()
        assert link.stats()["waits"] == 1 and 0.25 <= link.stats()["waited_s"] < 30
        # Inside one of the program's operations every wait is part of that one.
        link.operation_begins()
        for _ in range(2):
            late = link.submit("getattr", {"path": "/c"})
            threading.Timer(0.05, link.deliver, ({"t": P.REP, "id": late[3]}, b"")).start()
            link.wait(late, timeout=30)
        assert link.stats()["waits"] == 1
        link.operation_ends()
        assert link.stats()["waits"] == 2 and 0.3 <= link.stats()["waited_s"] < 30
    finally:
        for fd in (up_r, up_w, down_r, down_w):
            os.close(fd)


def test_names_made_waiting_are_remembered_and_listed_directories_confirmed():
    """A mkdir the host waited for is a name the mount made (its chmod is then sent on); a
    listing (or the warm start) naming directories the host may change confirms them."""
    from remote_runner.mirror.host.names import NameCache
    from remote_runner.mirror.host.state import MountState

    directory = {"st_mode": 0o40755, "st_nlink": 2, "st_ino": 9, "st_size": 4096}

    class Link:
        local_ids = (1000, 1000)
        changeable = ["/warm"]

        def submit(self, op, args, payload=b""):
            raise AssertionError("nothing is sent on without waiting here")

        def wait(self, slot):
            return {}, b""

        def abandon(self, slot):
            pass

        def call(self, op, args, payload=b""):
            if op == "mkdir":
                return {"st": directory, "dst": directory, "w": 1}, b""
            return {"attrs": [], "w": 1, "wr": ["/t/listed", 5, "relative"]}, b""

    m = MountState(Link(), b"", None, NameCache(), None, None, OSError)
    assert m.changes.may_post("/warm") and not m.changes.may_post("/t")
    m.call("mkdir", {"path": "/t/made", "mode": 0o755, "ctx": [1000, 1000]})
    assert "/t/made" in m.made and m.changes.may_post("/t")
    m.call("readdir", {"path": "/t/listed"})
    assert m.changes.may_post("/t/listed") and not m.changes.may_post("relative")
