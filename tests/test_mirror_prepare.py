"""The local side works out a ``validate`` ahead, and keeps answers while nothing changed.

While the connection and the agent start, :meth:`SendAhead.prepare` lists the
profile's directories and finds its files' copy keys; the ``validate`` that
follows reuses them only while the change watcher has seen no change since
they were made (:meth:`ChangeWatcher.unchanged_since`). These tests drive the
real service on real directories with real inotify: what is reused must be
what a fresh service would answer, changes included.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from remote_runner.mirror import listing
from remote_runner.mirror.service import LocalFileService
from remote_runner.mirror.watcher import ChangeWatcher


def _settled(path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o644)
    past = time.time() - 60
    os.utime(path, (past, past))


def _tree(root):
    """A small library tree: two directories of settled files and a symlink."""
    lib = root / "lib"
    (lib / "pkg").mkdir(parents=True)
    for i in range(5):
        _settled(lib / f"mod{i}.py", b"x = %d\n" % i)
        _settled(lib / "pkg" / f"part{i}.so", b"\x7fELF" + bytes(100 * i))
    os.symlink("mod0.py", lib / "alias.py")
    return lib


def _service():
    service = LocalFileService()
    service.watcher = ChangeWatcher(None)
    return service


def _validate(service, dirs, names, files):
    """The service's ``validate`` body, access times left out.

    Listing a directory or reading a link moves its atime with no inotify
    event; like the host's own cache, a kept answer is current in all but that.
    """
    service.seed = (list(names), list(files))
    reply = service.handle("validate", {"dirs": [[str(d), ""] for d in dirs]}, b"")
    body = json.loads(reply.payload)
    for answer in body["dirs"]:
        if isinstance(answer, dict):
            answer["a"] = [row[:7] + row[8:] for row in answer["a"]]
    for answer in body["answers"]:
        if isinstance(answer, list):
            answer[0].pop("st_atime", None)
    return body


@pytest.fixture
def services():
    made = []

    def make():
        made.append(_service())
        return made[-1]
    yield make
    for service in made:
        service.request_fds.release()  # (a test that lists outside a request holds its descriptors)
        service.close()
        if service.watcher is not None:
            service.watcher.close()


def test_a_stamp_holds_until_something_changes_in_the_directory(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "f").write_text("one")
    reports = []
    watcher = ChangeWatcher(lambda p, t, e: reports.append((p, t, e)))
    try:
        for d in (tmp_path, sub):
            assert watcher.watch(os.fsencode(d))
        top = os.fsencode(tmp_path)
        stamp = watcher.stamp()
        assert watcher.unchanged_since(top, stamp)
        (tmp_path / "f").write_text("two")                        # a name's contents
        assert not watcher.unchanged_since(top, stamp)
        stamp = watcher.stamp()
        os.chmod(tmp_path / "f", 0o600)                           # a name's attributes
        assert not watcher.unchanged_since(top, stamp)
        stamp = watcher.stamp()
        (sub / "new").write_text("x")                             # a subdirectory's mtime
        assert not watcher.unchanged_since(top, stamp)
        stamp = watcher.stamp()
        with watcher.own([os.fsencode(tmp_path / "g")]):          # the host's own change counts too
            (tmp_path / "g").write_text("mine")
        assert not watcher.unchanged_since(top, stamp)
        assert not watcher.unchanged_since(os.fsencode(tmp_path / "elsewhere"), watcher.stamp())
        assert reports  # (reported as before)
    finally:
        watcher.close()


def test_a_directory_moved_away_and_made_again_is_not_taken_for_the_old_one(tmp_path):
    deep = tmp_path / "sub" / "deep"
    deep.mkdir(parents=True)
    (deep / "old").write_text("x")
    watcher = ChangeWatcher(None)
    try:
        for d in (tmp_path, tmp_path / "sub", deep):
            assert watcher.watch(os.fsencode(d))
        stamp = watcher.stamp()
        os.rename(tmp_path / "sub", tmp_path / "moved")
        (tmp_path / "sub" / "deep").mkdir(parents=True)
        watcher.flush()
        assert watcher.watch(os.fsencode(deep))                   # the new one, watched afresh
        assert not watcher.unchanged_since(os.fsencode(deep), stamp)
    finally:
        watcher.close()


def test_a_watcher_made_before_the_link_drops_reports_until_told_where_they_go(tmp_path):
    watcher = ChangeWatcher(None)
    try:
        assert watcher.watch(os.fsencode(tmp_path))
        stamp = watcher.stamp()
        (tmp_path / "early").write_text("x")
        watcher.flush()                                           # nowhere to go: dropped
        assert not watcher.unchanged_since(os.fsencode(tmp_path), stamp)
        reports = []
        watcher.report_to(lambda p, t, e: reports.append(p + t))
        watcher.flush()
        assert reports == []                                      # the early change is not held back
        (tmp_path / "late").write_text("y")
        watcher.flush()
        assert reports and os.fsencode(tmp_path / "late") in reports[-1]
    finally:
        watcher.close()


def test_a_directory_is_listed_once_while_unchanged_then_again(tmp_path, monkeypatch, services):
    service = services()
    (tmp_path / "a").write_text("a")
    calls = []
    real = listing.directory_answer
    monkeypatch.setattr(listing, "directory_answer", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    directory = os.fsencode(tmp_path)
    assert service._watch(directory)
    first, payload = service._listing(directory)
    again, same = service._listing(directory)
    assert len(calls) == 1 and again is first and same == payload
    (tmp_path / "b").write_text("b")
    changed, _ = service._listing(directory)
    assert len(calls) == 2 and sorted(changed["n"]) == ["a", "b"]
    unwatched = services()
    unwatched.watcher.close()
    unwatched.watcher = None  # no watcher: nothing kept, every answer listed afresh
    unwatched._listing(directory)
    unwatched._listing(directory)
    assert len(calls) == 4


def test_validate_after_prepare_answers_what_a_fresh_service_does(public_tmp, services):
    lib = _tree(public_tmp)
    names = [str(lib / n) for n in ("mod0.py", "alias.py", "missing.py", "pkg/part1.so", "pkg/nothing")]
    files = [str(lib / "mod1.py"), str(lib / "pkg" / "part2.so")]
    prepared = services()
    prepared.prepare(files, [], names)
    assert prepared.request_fds.open_count() == 0  # every descriptor it opened is closed
    body = _validate(prepared, [lib, lib / "pkg"], names, files)
    fresh = _validate(services(), [lib, lib / "pkg"], names, files)
    assert body == fresh
    assert body["whole"] and all(d not in (0, 1) for d in body["dirs"])  # (nothing offered: sent)


def test_changes_after_prepare_are_in_the_validate_answer(public_tmp, services):
    lib = _tree(public_tmp)
    names = [str(lib / "mod0.py"), str(lib / "pkg" / "part1.so")]
    files = [str(lib / "mod1.py"), str(lib / "pkg" / "part2.so")]
    prepared = services()
    prepared.prepare(files, [], names)
    before = _validate(services(), [lib, lib / "pkg"], names, files)
    # Between the handshake and the host's validate: a new module, a rewritten library
    # (same size, mtime put back), a removed file.
    _settled(lib / "mod5.py", b"x = 5\n")
    part2 = lib / "pkg" / "part2.so"
    st = part2.stat()
    part2.write_bytes(b"\x7fELF" + b"\x01" * 200)
    os.utime(part2, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.unlink(lib / "mod4.py")
    body = _validate(prepared, [lib, lib / "pkg"], names, files)
    again = _validate(services(), [lib, lib / "pkg"], names, files)
    # The rewritten library is fresh for the session that began before it (its open says so,
    # and the host reads it past its kernel's cache): not offered whole, so fetched again at its
    # open. A session begun after the rewrite takes it for settled, with its new ctime.
    keys = dict((name, meta) for name, meta in body["whole"])
    later = dict((name, meta) for name, meta in again["whole"])
    assert str(part2) not in keys and keys == {k: v for k, v in later.items() if k != str(part2)}
    assert later[str(part2)][3] != dict(before["whole"])[str(part2)][3]
    assert {k: v for k, v in body.items() if k != "whole"} == {k: v for k, v in again.items() if k != "whole"}
    assert body != before
    listed = body["dirs"][0]
    assert "mod5.py" in listed["n"] and "mod4.py" not in listed["n"]


def test_a_directory_with_a_hard_linked_file_is_listed_again_every_time(tmp_path, monkeypatch, services):
    service = services()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("one")
    os.link(tmp_path / "d" / "f", tmp_path / "other-name")
    calls = []
    real = listing.directory_answer
    monkeypatch.setattr(listing, "directory_answer", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    directory = os.fsencode(tmp_path / "d")
    assert service._watch(directory)
    service._listing(directory)
    (tmp_path / "other-name").write_text("changed through the other name")  # no event in d
    answer, _ = service._listing(directory)
    assert len(calls) == 2 and answer["a"][0][6] == len("changed through the other name")


def test_the_directories_a_host_offered_are_kept_for_the_next_prepare(public_tmp, services, tmp_path):
    from remote_runner.mirror.profile import CommandProfile, OfferedDirs
    lib = _tree(public_tmp)
    offered = [str(lib), str(lib / "pkg")]
    service = services()
    _validate(service, [lib, lib / "pkg"], [], [])
    assert service.offered_dirs == offered
    kept = OfferedDirs.for_profile(CommandProfile(str(tmp_path / "profiles" / "key.json")))
    kept.save(service.offered_dirs)
    assert kept.load() == offered and kept.path.endswith("key.dirs.json")
    (tmp_path / "profiles" / "key.dirs.json").write_text('{"not": "a list"}')
    assert kept.load() == []  # a damaged file is no guess at all
    kept.save(offered)
    calls = []
    real = listing.directory_answer
    listing.directory_answer = lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    try:
        ahead = services()
        ahead.prepare([], kept.load())
        assert len(calls) == 2
        _validate(ahead, [lib, lib / "pkg"], [], [])
        assert len(calls) == 2  # the validate listed nothing again
    finally:
        listing.directory_answer = real


def test_guesses_stop_when_the_validate_arrives_but_what_it_needs_is_done(public_tmp, services):
    lib = _tree(public_tmp)
    service = services()
    service.prepare_stop.set()  # (the validate came at once)
    service.prepare([str(lib / "mod1.py")], [str(lib)], [str(lib / "mod2.py")])
    assert service.prepared.is_set()
    assert str(lib / "mod1.py") in service._metas          # needed: done
    assert any(k[0] == os.fsencode(lib) for k in service._answers)
    assert str(lib / "mod2.py") not in service._lookups     # a guess: given up


def test_the_programs_libraries_are_worked_out_ahead_and_listed_as_a_fresh_service_would(monkeypatch, services):
    """A program's open lists its libraries; made during the handshake, the list is the same."""
    from remote_runner.mirror import elf
    from remote_runner.mirror import protocol as P
    from remote_runner.mirror.replies import Reply
    program = P.name_to_wire(os.fsencode(os.path.realpath("/bin/ls")))
    if not elf.closure(os.path.realpath("/bin/ls")):
        pytest.skip("/bin/ls is not a dynamically linked program here")
    fresh, ahead = services(), services()
    expected = Reply({})
    fresh._add_libraries(expected, program)
    fresh.request_fds.release()  # (what handle() does after each request)
    ahead.prepare([], program=program)
    calls = []
    real = elf.closure
    monkeypatch.setattr(elf, "closure", lambda path: calls.append(path) or real(path))
    got = Reply({})
    ahead._add_libraries(got, program)
    ahead.request_fds.release()
    assert calls == []  # the loader list made ahead was used
    assert got.fields["libs"]["whole"] == expected.fields["libs"]["whole"]
    assert got.fields["libs"]["names"] == expected.fields["libs"]["names"]
    for body in (got.fields["libs"], expected.fields["libs"]):
        for answer in body["answers"]:
            if isinstance(answer, list):
                answer[0].pop("st_atime", None)
    assert got.fields["libs"]["answers"] == expected.fields["libs"]["answers"]
    assert ahead._closures == {}  # taken by that open, kept for no other


def test_the_command_start_is_named_for_the_first_validate(tmp_path):
    """The cwd and each PATH candidate up to the one that runs: what the host looks up to start it."""
    from remote_runner.mirror import protocol as P
    from remote_runner.mirror.profile import command_names
    empty, found, later = tmp_path / "empty", tmp_path / "found", tmp_path / "later"
    for d in (empty, found, later):
        d.mkdir()
    for d in (found, later):
        (d / "tool").write_text("#!/bin/sh\n")
        (d / "tool").chmod(0o755)
    (empty / "tool").write_text("not executable")
    names = [os.fsdecode(P.name_from_wire(n)) for n in
             command_names("tool", os.pathsep.join(map(str, (empty, found, later))), str(tmp_path / "found"))]
    assert str(empty / "tool") in names and str(found / "tool") in names
    assert str(later / "tool") not in names  # the search stops where it runs
    assert str(tmp_path) in names and "/" + str(tmp_path).split("/")[1] in names  # the cwd's directories
    assert names.index(str(empty / "tool")) < names.index(str(found / "tool"))
    # A path is not searched: the program it names is, and where its link leads.
    (tmp_path / "alias").symlink_to(later / "tool")
    by_path = [os.fsdecode(P.name_from_wire(x)) for x in command_names("../alias", str(found), str(later))]
    assert str(tmp_path / "alias") in by_path and str(later / "tool") in by_path
    assert str(found / "tool") not in by_path


def test_whether_a_directory_is_public_is_worked_out_once_for_its_files(public_tmp):
    from remote_runner.mirror.sharing import PublicDirs
    top = public_tmp / "top"
    (top / "lib").mkdir(parents=True)
    files = [os.fsencode(str(top / "lib" / f"m{i}.py")) for i in range(3)]
    os.symlink(top / "lib", public_tmp / "alias")
    through_link = os.fsencode(str(public_tmp / "alias" / "m0.py"))
    top.chmod(0o700)
    now = PublicDirs(ttl=0.0)  # nothing kept: every answer is worked out again
    assert not any(now.reachable(f) for f in files) and not now.reachable(through_link)
    kept = PublicDirs()
    assert not kept.reachable(files[0])
    top.chmod(0o755)
    assert all(now.reachable(f) for f in files) and now.reachable(through_link)
    assert not kept.reachable(files[1])  # the directory's answer holds for SETTLED_SECONDS
    top.chmod(0o711)  # searchable, not readable, by others: enough to reach the files
    assert now.reachable(files[2])


def test_names_of_one_request_in_one_directory_share_its_descriptor(tmp_path):
    from remote_runner.mirror.exports import resolve_parent
    for name in ("a", "b"):
        (tmp_path / name).write_text(name)
    held, parents = [], {}
    paths = [resolve_parent(os.fsencode(str(tmp_path / n)), held, parents) for n in ("a", "b")]
    try:
        assert len(held) == 1 and list(parents) == [os.fsencode(str(tmp_path))]
        assert [open(p, "rb").read() for p in paths] == [b"a", b"b"]
    finally:
        for fd in held:
            os.close(fd)
