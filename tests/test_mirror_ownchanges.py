"""Unit tests: the host's own changes are not echoed back, and the reply says what they made."""

from __future__ import annotations

import os

import pytest

from remote_runner.mirror.host.names import MISSING, NameCache
from remote_runner.mirror import protocol as P
from remote_runner.mirror.service import LocalFileService
from remote_runner.mirror.watcher import ChangeWatcher
from tests.test_mirror_coherence import Reports


def attrs(size=0, mode=0o100644):
    return {"st_mode": mode, "st_size": size, "st_nlink": 1, "st_ino": 7}


@pytest.fixture
def service():
    reports = Reports()
    svc = LocalFileService()
    svc.watcher = ChangeWatcher(reports)
    svc.reports = reports
    yield svc
    svc.watcher.close()


def everything_reported(reports):
    return reports.paths() | reports.trees()


def test_the_hosts_own_changes_are_not_reported_back_but_others_are(tmp_path, service):
    d = tmp_path / "d"
    d.mkdir()
    service.handle("getattr", {"path": str(d / "x"), "dir": 1}, b"")  # watched now
    made = service.handle("mkdir", {"path": str(d / "sub"), "mode": 0o755}, b"")
    fh = service.handle("create", {"path": str(d / "f"), "mode": 0o644, "flags": os.O_WRONLY}, b"").fields["fh"]
    service.handle("write", {"fh": fh, "off": 0}, b"data")
    service.handle("release", {"fh": fh}, b"")
    service.handle("rename", {"old": str(d / "f"), "new": str(d / "g"), "flags": 0}, b"")
    service.handle("unlink", {"path": str(d / "g")}, b"")
    service.watcher.flush()
    assert everything_reported(service.reports) == set()
    assert service.watcher.own_events > 0
    # the reply carries the new name's and its directory's attributes, and that they are watched
    assert made.fields["w"] == 1 and made.fields["st"]["st_ino"] == os.lstat(d / "sub").st_ino
    assert made.fields["dst"]["st_nlink"] == os.lstat(d).st_nlink
    (d / "local").write_text("a local program")  # someone else's change still goes to the host
    service.watcher.flush()
    assert os.fsencode(d / "local") in everything_reported(service.reports)


def test_unlink_and_rmdir_say_whether_the_host_may_keep_the_name_missing(tmp_path, service):
    (tmp_path / "f").write_text("x")
    (tmp_path / "e").mkdir()
    for op, name in (("unlink", "f"), ("rmdir", "e")):
        reply = service.handle(op, {"path": str(tmp_path / name)}, b"")
        assert reply.fields["w"] == 1 and "st" not in reply.fields
        assert reply.fields["dst"]["st_mtime"] == os.stat(tmp_path).st_mtime_ns


def test_the_directory_a_change_was_made_in_is_stated_through_the_descriptor_the_change_used(
        tmp_path, service, monkeypatch):
    from remote_runner.mirror import exports
    opened = []
    real = exports.open_beneath.__call__
    monkeypatch.setattr(exports, "open_beneath", lambda directory: opened.append(directory) or real(directory))
    (tmp_path / "gone").write_text("x")
    service.handle("getattr", {"path": str(tmp_path / "x"), "dir": 1}, b"")  # watched now
    for op, name in (("unlink", "gone"), ("mkdir", "made")):
        del opened[:]
        reply = service.handle(op, {"path": str(tmp_path / name), "mode": 0o755}, b"")
        assert reply.fields["dst"]["st_mtime"] == os.stat(tmp_path).st_mtime_ns
        assert os.fsencode(str(tmp_path.parent)) not in opened  # (not reached again from above)


def test_an_answer_asked_after_an_invalidation_is_kept():
    cache = NameCache()
    cache.renamed("/d/f")  # the host created /d/f
    assert cache.put("/d/f", attrs(), watched=True, since=cache.begin())
    assert cache.get("/d/f")["st_ino"] == 7
    token = cache.begin()
    cache.changed("/d/f")  # ...but one asked before it is not
    assert not cache.put("/d/f", attrs(1), watched=True, since=token)


def test_a_fresh_answer_settles_the_name_in_its_directory_listing():
    cache = NameCache()
    cache.put_listing("/d", [("a", attrs(), None)], watched=True, since=cache.begin())
    cache.renamed("/d/new")  # made by the host: unknown in the listing until answered
    assert cache.names("/d") is None
    cache.put("/d/new", attrs(), watched=True, since=cache.begin())
    assert [n for n, _ in cache.names("/d")] == ["a", "new"]
    cache.renamed("/d/a")
    cache.put("/d/a", MISSING, watched=True, since=cache.begin())
    assert [n for n, _ in cache.names("/d")] == ["new"]
    assert cache.get("/d/a") is MISSING


def test_changes_sent_without_waiting_are_applied_in_order_and_later_requests_wait_for_them(tmp_path):
    import threading
    service = LocalFileService()
    (tmp_path / "a").write_text("x")
    results = {}

    def late(key, op, args):
        results[key] = P.expand_reply(service.serve({"t": "req", "id": 1, "op": op, "a": args}, b"")[0])

    # the unlink numbered 2 and a lookup sent after it arrive before the rename numbered 1
    later = [threading.Thread(target=late, args=("unlink", "unlink", {"path": str(tmp_path / "b"), "nseq": 2})),
             threading.Thread(target=late, args=("lookup", "getattr", {"path": str(tmp_path / "b"), "after": 2}))]
    for t in later:
        t.start()
    assert service.handle("rename", {"old": str(tmp_path / "a"), "new": str(tmp_path / "b"), "nseq": 1}, b"")
    for t in later:
        t.join(10)
    assert "e" not in results["unlink"] and results["lookup"]["e"] == 2  # ENOENT: after the unlink
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_failed_change_is_reported_once_by_the_next_change_in_its_directory():
    from remote_runner.mirror.host.writes import PendingChanges

    class Slot(list):
        pass

    sent = []

    def submit(op, args, payload):
        slot = Slot([__import__("threading").Event()])
        slot[0].set()
        sent.append((op, dict(args)))
        return slot

    def wait(slot):
        if sent[-1][0] == "rmdir":
            raise OSError(16, "busy")
        return {}, b""

    undone = []
    changes = PendingChanges(submit, wait)
    assert not changes.may_post("/d")
    changes.confirm("/d")
    assert changes.may_post("/d") and not changes.may_post("/d", "/e")
    changes.post("rmdir", {"path": "/d/mnt"}, ["/d"], undo=lambda: undone.append(1))
    assert sent[-1][1]["nseq"] == 1
    changes.check("/e")  # another directory: nothing to say
    with pytest.raises(OSError) as info:
        changes.check("/d")
    assert info.value.errno == 16 and undone == [1]
    changes.check("/d")  # reported once
    assert not changes.may_post("/d")  # asked again before the next change there
    assert changes.after() is None


def test_a_listing_names_the_directories_the_host_may_change_without_asking(tmp_path, service, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    (tmp_path / "mine" / "sub").mkdir(parents=True)
    shared = tmp_path / "shared"  # as /tmp: sticky, another user's
    shared.mkdir()
    os.chown(shared, 4321, 4321)
    os.chmod(shared, 0o1777)
    listed = service.handle("readdir", {"path": str(tmp_path)}, b"").fields
    subs = {sub[0] for sub in listed["sub"]}
    assert {str(tmp_path / "mine"), str(tmp_path / "mine" / "sub"), str(shared)} <= subs
    # root may remove anyone's names, even below a sticky directory
    assert set(listed["wr"]) == {str(tmp_path)} | subs
    monkeypatch.setattr(os, "geteuid", lambda: 1234)  # a user who owns neither the directory nor its files
    listed = service.handle("readdir", {"path": str(tmp_path)}, b"").fields
    assert str(shared) not in listed["wr"] and str(tmp_path / "mine" / "sub") in listed["wr"]
    monkeypatch.setattr(os, "geteuid", lambda: 4321)  # its owner may
    assert str(shared) in service.handle("readdir", {"path": str(tmp_path)}, b"").fields["wr"]


def test_a_watched_directory_the_host_removes_is_not_reported_back_by_its_own_watch(tmp_path, service):
    # Its own watch says it went away too: were that reported, the host would forget the
    # name in the parent's listing, and the parent's rmdir (listing known empty) would wait.
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "other").mkdir()
    service.handle("readdir", {"path": str(d)}, b"")  # d and its subdirectories watched, listed
    assert service.watcher.watched(os.fsencode(d / "sub")) and service.watcher.watched(os.fsencode(d / "other"))
    service.handle("rmdir", {"path": str(d / "sub")}, b"")
    service.watcher.flush()
    assert everything_reported(service.reports) == set()
    assert not service.watcher.watched(os.fsencode(d / "sub"))
    os.rmdir(d / "other")  # someone else's removal still goes to the host
    service.watcher.flush()
    assert os.fsencode(d / "other") in everything_reported(service.reports)
