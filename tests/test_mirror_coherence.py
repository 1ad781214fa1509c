"""Unit tests of the mirror's coherent cache: the local watcher, directory answers, the host's name cache."""

from __future__ import annotations

import os
import threading
import time

import pytest

from remote_runner.mirror import listing, protocol as P
from remote_runner.mirror.host.answers import listing_entries
from remote_runner.mirror.host.names import MISSING, NameCache
from remote_runner.mirror.watcher import ChangeWatcher, FsTypes


class Reports:
    def __init__(self):
        self.items = []
        self.lock = threading.Lock()

    def __call__(self, paths, trees, everything):
        with self.lock:
            self.items.append((sorted(paths), sorted(trees), everything))

    def paths(self):
        return {p for ps, _, _ in self.items for p in ps}

    def trees(self):
        return {t for _, ts, _ in self.items for t in ts}


@pytest.fixture
def watcher():
    reports = Reports()
    w = ChangeWatcher(reports)
    w.reports_seen = reports
    yield w
    w.close()


def test_flush_reports_changes_to_names_in_a_watched_directory(tmp_path, watcher):
    d = os.fsencode(tmp_path)
    (tmp_path / "f").write_text("one")
    assert watcher.watch(d)
    (tmp_path / "f").write_text("two")
    os.chmod(tmp_path / "f", 0o600)
    watcher.flush()
    assert d + b"/f" in watcher.reports_seen.paths()
    (tmp_path / "new").write_text("x")
    os.rename(tmp_path / "new", tmp_path / "moved")
    os.unlink(tmp_path / "f")
    watcher.flush()
    trees = watcher.reports_seen.trees()
    assert {d + b"/new", d + b"/moved", d + b"/f"} <= trees
    assert d in watcher.reports_seen.paths()  # the directory's own mtime changed


def test_nothing_is_reported_for_unwatched_directories(tmp_path, watcher):
    (tmp_path / "a").mkdir()
    assert watcher.watch(os.fsencode(tmp_path / "a"))
    (tmp_path / "b").write_text("x")
    watcher.flush()
    assert watcher.reports_seen.items == []


def test_a_moved_directory_is_forgotten_and_watched_again_under_its_new_name(tmp_path, watcher):
    d = os.fsencode(tmp_path)
    (tmp_path / "sub").mkdir()
    assert watcher.watch(d) and watcher.watch(d + b"/sub")
    os.rename(tmp_path / "sub", tmp_path / "other")
    watcher.flush()
    assert d + b"/sub" in watcher.reports_seen.trees()
    assert not watcher.watched(d + b"/sub")
    (tmp_path / "sub").mkdir()  # a new directory under the old name: watched afresh
    assert watcher.watch(d + b"/sub")
    (tmp_path / "sub" / "x").write_text("1")
    watcher.flush()
    assert d + b"/sub/x" in watcher.reports_seen.trees()


def test_a_removed_directory_reports_its_tree(tmp_path, watcher):
    sub = tmp_path / "gone"
    sub.mkdir()
    assert watcher.watch(os.fsencode(sub))
    sub.rmdir()
    watcher.flush()
    assert os.fsencode(sub) in watcher.reports_seen.trees()
    assert len(watcher) == 0


def test_watch_limit_falls_back_to_unwatched(tmp_path):
    reports = Reports()
    w = ChangeWatcher(reports, limit=2)
    try:
        dirs = []
        for i in range(3):
            (tmp_path / str(i)).mkdir()
            dirs.append(os.fsencode(tmp_path / str(i)))
        assert w.watch(dirs[0]) and w.watch(dirs[1])
        assert not w.watch(dirs[2]) and w.full
        assert w.watch(dirs[0])  # already watched: still true
    finally:
        w.close()


def test_pseudo_file_systems_are_not_watched(watcher):
    assert not watcher.watch(b"/proc")
    assert FsTypes().of(os.stat("/proc").st_dev) == "proc"


def test_background_thread_reports_without_flush(tmp_path, watcher):
    d = os.fsencode(tmp_path)
    assert watcher.watch(d)
    watcher.start()
    (tmp_path / "late").write_text("x")
    deadline = time.monotonic() + 30
    while d + b"/late" not in watcher.reports_seen.trees():
        assert time.monotonic() < deadline, "no report"
        time.sleep(0.05)


# -- directory answers ------------------------------------------------------------
def test_directory_answer_round_trips_names_attributes_and_links(tmp_path):
    (tmp_path / "a.py").write_text("x")
    os.symlink("a.py", tmp_path / "ln")
    (tmp_path / "secret").write_text("s")
    answer = listing.directory_answer(os.fsencode(tmp_path), listable=lambda n: n != b"secret")
    entries = {name: (attrs, link) for name, attrs, link in listing_entries(listing.encode_answer(answer))}
    assert set(entries) == {"a.py", "ln"}
    assert entries["a.py"][0]["st_size"] == 1 and entries["a.py"][0]["st_ino"] == os.lstat(tmp_path / "a.py").st_ino
    assert entries["ln"][1] == "a.py"


def test_big_directories_are_not_answered_whole(tmp_path):
    for i in range(20):
        (tmp_path / str(i)).write_text("")
    assert listing.directory_answer(os.fsencode(tmp_path), max_entries=10) is None
    assert listing.directory_answer(os.fsencode(tmp_path), max_bytes=500) is None
    assert len(listing.directory_answer(os.fsencode(tmp_path))["n"]) == 20


def test_malformed_answers_are_refused():
    assert listing_entries(b"not json") is None
    assert listing_entries(b'{"n":["../x"],"a":[null],"l":[null]}') is None
    assert listing_entries(b'{"n":["x"],"a":[],"l":[null]}') is None
    assert listing_entries(b'{"n":["x"],"a":[[1,2]],"l":[null]}') == [("x", None, None)]
    row = list(range(13))
    good = listing_entries(b'{"n":["x","y"],"a":[%s,%s],"l":[null,"t"]}' % (str(row).encode(), str(row).encode()))
    assert good == [("x", dict(zip(P.STAT_FIELDS, row)), None), ("y", dict(zip(P.STAT_FIELDS, row)), "t")]
    # one odd row is an entry of unknown attributes; the others keep theirs
    odd = listing_entries(b'{"n":["x","y"],"a":[%s,[true,1]],"l":[null,null]}' % str(row).encode())
    assert odd == [("x", dict(zip(P.STAT_FIELDS, row)), None), ("y", None, None)]
    for bad in (b'{"n":["a/b"],"a":[null],"l":[null]}', b'{"n":["."],"a":[null],"l":[null]}',
                b'{"n":[""],"a":[null],"l":[null]}', b'{"n":[7],"a":[null],"l":[null]}',
                b'{"n":["x"],"a":[null],"l":[7]}'):
        assert listing_entries(bad) is None, bad


# -- the host's name cache ----------------------------------------------------------
def attrs(size=1, nlink=1, mode=0o100644):
    return {"st_mode": mode, "st_size": size, "st_nlink": nlink, "st_ino": 5}


def test_a_listing_answers_present_and_absent_names():
    cache = NameCache()
    assert cache.put_listing("/usr/lib/py", [("a.py", attrs(), None), ("ln", attrs(mode=0o120777), "a.py")],
                             watched=True)
    assert cache.get("/usr/lib/py/a.py")["st_size"] == 1
    assert cache.get("/usr/lib/py/nope.so") is MISSING
    assert cache.link("/usr/lib/py/ln") == "a.py"
    assert cache.get("/usr/lib/other/x") is None
    assert cache.negative_hits == 1


def test_watched_answers_stand_until_invalidated_unwatched_for_a_lease():
    cache = NameCache(lease=1.0)
    cache.put("/w/f", attrs(), watched=True, now=0.0)
    cache.put("/u/f", attrs(), watched=False, now=0.0)
    assert cache.get("/w/f", now=1e6) is not None
    assert cache.get("/u/f", now=0.5) is not None and cache.get("/u/f", now=2.0) is None
    cache.invalidate(paths=["/w/f"])
    assert cache.get("/w/f", now=1e6) is None


def test_files_with_several_names_get_only_a_lease():
    cache = NameCache(lease=1.0)
    cache.put("/w/f", attrs(nlink=2), watched=True, now=0.0)
    assert cache.get("/w/f", now=2.0) is None


def test_a_name_event_makes_the_name_unknown_not_missing():
    cache = NameCache()
    cache.put_listing("/d", [("a", attrs(), None)], watched=True)
    cache.invalidate(paths=["/d"], trees=["/d/new"])
    assert cache.get("/d/new") is None  # created locally: ask
    assert cache.get("/d/other") is MISSING
    assert cache.get("/d/a") is not None


def test_tree_invalidation_drops_everything_below():
    cache = NameCache()
    cache.put_listing("/d", [("sub", attrs(mode=0o040755), None)], watched=True)
    cache.put_listing("/d/sub", [("x", attrs(), None)], watched=True)
    dropped = cache.invalidate(trees=["/d/sub"])
    assert set(dropped) == {"/d/sub", "/d/sub/x"}
    assert cache.get("/d/sub/x") is None and cache.get("/d/sub/y") is None
    assert cache.get("/d/sub") is None


def test_an_answer_older_than_an_invalidation_is_not_kept():
    cache = NameCache()
    token = cache.begin()
    cache.invalidate(paths=["/d/f"])  # the change arrived while the answer was on its way
    assert not cache.put("/d/f", attrs(), watched=True, since=token)
    assert cache.get("/d/f") is None
    token = cache.begin()
    cache.invalidate(trees=["/d"])
    assert not cache.put("/d/sub/f", attrs(), watched=True, since=token)
    assert not cache.put_listing("/d/sub", [], watched=True, since=token)
    token = cache.begin()
    cache.invalidate(trees=["/e/x"])
    assert cache.put_listing("/e", [("x", attrs(), None), ("y", attrs(), None)], watched=True, since=token)
    assert cache.get("/e/x") is None and cache.get("/e/y") is not None
    assert cache.put("/d/f", attrs(), watched=True, since=cache.begin())


def test_writes_through_the_mirror_drop_only_what_they_changed():
    cache = NameCache()
    cache.put_listing("/d", [("a", attrs(), None), ("b", attrs(), None)], watched=True)
    cache.changed("/d/a")
    assert cache.get("/d/a") is None and cache.get("/d/b") is not None
    cache.renamed("/d/b", "/d/c")
    assert cache.get("/d/b") is None and cache.get("/d/c") is None and cache.get("/d/zzz") is MISSING


def test_a_name_replaced_here_by_another_type_makes_the_kernel_look_it_up_again():
    cache = NameCache()
    FILE, DIR, LINK = 0o100644, 0o040755, 0o120777
    assert not cache.kernel_must_look_up("/d/x", FILE)  # first seen
    cache.invalidate(paths=["/d/x"])  # attributes changed: same type, nothing to do
    assert not cache.kernel_must_look_up("/d/x", FILE)
    cache.invalidate(trees=["/d/x"])  # replaced here, by a file again
    assert not cache.kernel_must_look_up("/d/x", FILE)
    cache.invalidate(trees=["/d/x"])  # replaced by a directory: once ESTALE, then the new type
    assert cache.kernel_must_look_up("/d/x", DIR)
    assert not cache.kernel_must_look_up("/d/x", DIR)
    cache.invalidate(everything=True)
    assert cache.kernel_must_look_up("/d/x", LINK)
    cache.put("/d/x", {"st_mode": LINK}, watched=True)
    cache.invalidate(trees=["/d"])  # its directory removed and made again here
    assert cache.kernel_must_look_up("/d/x", FILE)
    cache.renamed("/d/x")  # the mirror itself replaced it: the kernel knows
    cache.invalidate(trees=["/d/x"])
    assert not cache.kernel_must_look_up("/d/x", FILE)


def test_everything_goes_on_overflow():
    cache = NameCache()
    token = cache.begin()
    cache.put("/a", attrs(), watched=True)
    cache.invalidate(everything=True)
    assert cache.get("/a") is None
    assert not cache.put("/b", attrs(), watched=True, since=token)


def test_stat_rows_round_trip(tmp_path):
    st = os.lstat(tmp_path)
    assert P.row_attrs(P.stat_row(st)) == P.stat_to_wire(st)
    assert P.row_attrs([1, 2]) is None and P.row_attrs([True] * 13) is None


def test_a_lookup_reply_with_its_directory_answers_the_neighbours(tmp_path):
    from remote_runner.mirror.host.answers import absorb_invalidation, absorb_lookup
    (tmp_path / "here").write_text("x")
    answer = listing.directory_answer(os.fsencode(tmp_path))
    cache = NameCache()
    d = str(tmp_path)
    token = cache.begin()
    got = absorb_lookup(cache, d + "/absent", {"missing": 1, "w": 1, "ls": 1},
                        listing.encode_answer(answer), token)
    assert got is MISSING
    assert cache.get(d + "/here")["st_size"] == 1
    assert cache.get(d + "/other") is MISSING
    assert absorb_invalidation(cache, None, {"t": P.INVAL, "p": [d], "tree": [d + "/here"]}) == 1
    assert cache.get(d + "/here") is None


def test_kernel_drops_reach_the_mount_owning_the_path():
    from remote_runner.mirror.host.kernel import KernelDrops
    drops = KernelDrops()
    seen = []
    drops.add_target("/home/u/proj", seen.append)
    drops.drop(["/home/u/proj/a", "/usr/bin/x", "/home/u/proj"])
    assert seen == ["/a", "/"]


def test_attributes_wait_for_the_kernel_drops_asked_for_before_them():
    from remote_runner.mirror.host.answers import forget_in_kernel, forget_names
    from remote_runner.mirror.host.kernel import KernelDrops
    drops = KernelDrops()
    release = threading.Event()
    seen = []

    def slow(path):
        release.wait(5)
        seen.append(path)

    drops.add_target("", slow)
    drops.settle()  # nothing pending: returns at once

    def settles_after(unblock) -> None:
        settled = threading.Event()
        waiter = threading.Thread(target=lambda: (drops.settle(), settled.set()))
        waiter.start()
        assert not settled.wait(0.2), "settled before the kernel dropped the path"
        unblock()
        waiter.join(5)
        assert settled.is_set()

    drops.drop(["/f"], wait=False)
    settles_after(release.set)
    assert seen == ["/f"]
    # an inval frame whose names already left the name cache: its drop is announced first
    cache = NameCache()
    forget_names(cache, header := {"t": P.INVAL, "p": ["/g"]}, drops)
    settles_after(lambda: forget_in_kernel(drops, header))
    assert seen == ["/f", "/g"]
    drops.settle()


def test_a_directory_too_big_is_not_asked_for_whole_again_soon():
    cache = NameCache()
    assert cache.wants_listing("/usr/lib", now=0.0)
    cache.too_big("/usr/lib", now=0.0)
    assert not cache.wants_listing("/usr/lib", now=1.0)
    assert cache.wants_listing("/usr/lib", now=1e6)
    cache.put_listing("/d", [], watched=True)
    assert not cache.wants_listing("/d")


# -- the local service's side -------------------------------------------------------
@pytest.fixture
def watched_service():
    """A local file service whose directories are watched; yields (service, reports)."""
    from remote_runner.mirror.service import LocalFileService
    reports = Reports()
    service = LocalFileService()
    service.watcher = ChangeWatcher(reports)
    yield service, reports
    service.watcher.close()


def test_a_lookup_with_dir_answers_missing_with_the_whole_watched_directory(tmp_path, watched_service):
    service, reports = watched_service
    (tmp_path / "here").write_text("x")
    reply = service.handle("getattr", {"path": str(tmp_path / "absent"), "dir": 1}, b"")
    assert reply.fields["missing"] == 1 and reply.fields["w"] == 1 and reply.fields["ls"] == 1
    entries = listing_entries(reply.payload)
    assert [name for name, _, _ in entries] == ["here"]
    reply = service.handle("getattr", {"path": str(tmp_path / "here"), "dir": 0}, b"")
    assert reply.fields["st"]["st_size"] == 1 and "ls" not in reply.fields
    (tmp_path / "here").write_text("changed")
    service.watcher.flush()
    assert os.fsencode(tmp_path / "here") in reports.paths()


def test_a_directory_answer_brings_its_few_subdirectories_answers(tmp_path, watched_service):
    from remote_runner.mirror.host.answers import absorb_lookup
    service, reports = watched_service
    package = tmp_path / "pkg"
    (package / "__pycache__").mkdir(parents=True)
    (package / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"code")
    (package / "data").mkdir()
    (package / "mod.py").write_text("x = 1\n")
    reply = service.handle("getattr", {"path": str(package / "__init__.so"), "dir": 1}, b"")
    subs = reply.fields["sub"]
    assert sorted(s[0] for s in subs) == [str(package / "__pycache__"), str(package / "data")]
    assert all(s[2] == 1 for s in subs)                 # watched before they were listed
    cache = NameCache()
    got = absorb_lookup(cache, str(package / "__init__.so"), reply.fields, reply.payload, cache.begin())
    assert got is MISSING and cache.get(str(package / "mod.py"))["st_size"] == 6
    # the subdirectory's names, present and absent, are answered without asking
    assert cache.get(str(package / "__pycache__" / "mod.cpython-311.pyc"))["st_size"] == 4
    assert cache.get(str(package / "__pycache__" / "other.cpython-311.pyc")) is MISSING
    assert cache.get(str(package / "data" / "anything")) is MISSING
    # a change in a subdirectory is reported like one in the directory asked about
    (package / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"new code")
    service.watcher.flush()
    assert os.fsencode(package / "__pycache__" / "mod.cpython-311.pyc") in reports.paths()
    # a malformed ``sub`` costs the subdirectories, never the directory's own answer
    for bad in ([[str(package / "data"), 10 ** 9, 1]], [["relative", 5, 1]], "x"):
        cache = NameCache()
        absorb_lookup(cache, str(package / "__init__.so"), dict(reply.fields, sub=bad),
                      reply.payload[:len(reply.payload) - sum(s[1] for s in subs)], cache.begin())
        assert cache.get(str(package / "mod.py"))["st_size"] == 6
        assert cache.get(str(package / "data" / "anything")) is None


def test_a_directory_with_many_subdirectories_brings_none_of_theirs(tmp_path):
    from remote_runner.mirror.service import LocalFileService
    for n in range(listing.SUB_DIRS + 1):
        (tmp_path / f"d{n}").mkdir()
    reply = LocalFileService().handle("getattr", {"path": str(tmp_path / "absent"), "dir": 1}, b"")
    assert reply.fields["ls"] == 1 and "sub" not in reply.fields
    assert len(listing_entries(reply.payload)) == listing.SUB_DIRS + 1


def test_a_looked_up_directory_brings_its_own_listing_among_many(tmp_path):
    """A path d levels deep: each directory's lookup answers the next name too."""
    from remote_runner.mirror.host.answers import absorb_lookup
    from remote_runner.mirror.service import LocalFileService
    for n in range(listing.SUB_DIRS + 1):
        (tmp_path / f"d{n}").mkdir()
    (tmp_path / "d3" / "locale.alias").write_text("alias\n")
    (tmp_path / "d3" / "inner").mkdir()
    (tmp_path / "plain").write_text("x")
    service = LocalFileService()
    reply = service.handle("getattr", {"path": str(tmp_path / "d3"), "dir": 1}, b"")
    assert [s[0] for s in reply.fields["sub"]] == [str(tmp_path / "d3")]  # itself, none of the others
    cache = NameCache()
    absorb_lookup(cache, str(tmp_path / "d3"), reply.fields, reply.payload, cache.begin())
    assert cache.get(str(tmp_path / "d3" / "locale.alias"))["st_size"] == 6
    assert cache.get(str(tmp_path / "d3" / "absent")) is MISSING
    assert cache.get(str(tmp_path / "d4" / "anything")) is None  # not listed: asked when needed
    # a file looked up brings no listing of its own, nor does a directory too big to send so
    assert "sub" not in service.handle("getattr", {"path": str(tmp_path / "plain"), "dir": 1}, b"").fields
    for n in range(listing.SUB_ENTRIES + 1):
        (tmp_path / "d5" / f"f{n}").write_text("")
    assert "sub" not in service.handle("getattr", {"path": str(tmp_path / "d5"), "dir": 1}, b"").fields


def test_a_first_lookup_of_a_small_system_file_brings_the_file(public_tmp):
    """In a read-only tree, to a host that keeps whole copies; never a private, big or writable one."""
    from remote_runner.mirror import sendahead
    from remote_runner.mirror.exports import Export, Exports
    from remote_runner.mirror.host.answers import split_file
    from remote_runner.mirror.service import LocalFileService
    (public_tmp / "etc").mkdir()
    (public_tmp / "work").mkdir()
    for tree in ("etc", "work"):
        (public_tmp / tree).chmod(0o755)
    alias = public_tmp / "etc" / "locale.alias"
    alias.write_bytes(b"C.UTF-8 C.UTF-8\n")
    (public_tmp / "etc" / "big.cnf").write_bytes(b"x" * (sendahead.LOOKUP_FILE_LIMIT + 1))
    (public_tmp / "etc" / "secret").write_bytes(b"key")
    (public_tmp / "etc" / "secret").chmod(0o600)
    (public_tmp / "work" / "notes.txt").write_bytes(b"mine")
    old = time.time() - 60  # settled
    for f in (alias, public_tmp / "etc" / "big.cnf", public_tmp / "etc" / "secret", public_tmp / "work" / "notes.txt"):
        os.utime(f, (old, old))
    exports = Exports([Export(os.fsencode(public_tmp / "etc"), False), Export(os.fsencode(public_tmp / "work"), True)])

    def lookup(path, **extra):
        service = LocalFileService(exports=exports)
        return service.handle("getattr", dict({"path": str(path), "dir": 1}, **extra), b"")

    reply = lookup(alias, f=1)
    rest, brought = split_file(reply.fields, reply.payload)
    assert brought is not None and brought[1] == alias.read_bytes()
    st = alias.stat()
    assert brought[0] == [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    assert sorted(name for name, _, _ in listing_entries(rest)) == ["big.cnf", "locale.alias", "secret"]
    assert "file" not in lookup(alias).fields                          # a host without a file cache
    for other in (public_tmp / "etc" / "big.cnf", public_tmp / "etc" / "secret", public_tmp / "work" / "notes.txt"):
        assert "file" not in lookup(other, f=1).fields, other
    # a file put in place while the command runs, with an old mtime (rsync -a): its open says
    # it is fresh, so that the host reads it past its kernel's cache; sent ahead it would not be
    service = LocalFileService(exports=exports)
    replacement = public_tmp / "etc" / "locale.alias.new"
    replacement.write_bytes(b"C.UTF-8 C.UTF-8\nPOSIX C\n")
    os.utime(replacement, (old, old))
    os.rename(replacement, alias)
    assert "file" not in service.handle("getattr", {"path": str(alias), "dir": 1, "f": 1}, b"").fields
    assert service.handle("getattr", {"path": str(public_tmp / "etc" / "big.cnf")}, b"").fields["st"]
    # a malformed ``file`` brings nothing, and the payload stays the listing's
    assert split_file({"file": [10 ** 9, 1, 2, 3]}, b"abc") == (b"abc", None)
    assert split_file({"file": ["3", 1, 2, 3]}, b"abc") == (b"abc", None)


def test_the_service_applies_a_handles_numbered_writes_in_order(tmp_path):
    from remote_runner.mirror.service import LocalFileService
    service = LocalFileService()
    fh = service.handle("create", {"path": str(tmp_path / "f"), "mode": 0o644, "flags": os.O_WRONLY}, b"").fields["fh"]
    later = threading.Thread(target=service.handle, args=("write", {"fh": fh, "off": 0, "seq": 2}, b"second"))
    later.start()
    time.sleep(0.1)
    service.handle("write", {"fh": fh, "off": 0, "seq": 1}, b"first!")
    later.join(30)
    service.handle("release", {"fh": fh, "seq": 3}, b"")
    assert (tmp_path / "f").read_bytes() == b"second"


def test_a_tree_that_goes_away_is_forgotten_whole_and_nothing_beside_it(tmp_path, watcher):
    """Watched directories under a removed one (some with unwatched directories between)
    are no longer watched; a sibling whose name starts the same still is."""
    for rel in ("a/b/c", "a/x/y/z", "ab/c"):
        (tmp_path / rel).mkdir(parents=True)
    d = os.fsencode(tmp_path)
    for rel in (b"", b"/a", b"/a/b/c", b"/a/x/y/z", b"/ab", b"/ab/c"):
        assert watcher.watch(d + rel)
    import shutil
    shutil.rmtree(tmp_path / "a")
    watcher.flush()
    assert [watcher.watched(d + rel) for rel in (b"/a", b"/a/b/c", b"/a/x/y/z")] == [False] * 3
    assert [watcher.watched(d + rel) for rel in (b"", b"/ab", b"/ab/c")] == [True] * 3
    (tmp_path / "a" / "b").mkdir(parents=True)   # made again: watched anew when asked
    assert watcher.watch(d + b"/a/b") and watcher.watched(d + b"/a/b")


def test_a_file_written_while_the_command_runs_is_fresh_one_written_just_before_is_recent(tmp_path):
    """Only a regular file written (or put in place) in the last seconds is read past the host
    kernel's cache: always when since the session began, where the host can still map it
    shared when just before (see host/fresh.py)."""
    from remote_runner.mirror.sharing import SETTLED_SECONDS, freshness
    path = tmp_path / "f"
    path.write_bytes(b"x")
    now = time.time()
    assert freshness(os.stat(path), now - 10) == {"fresh": 1}
    assert freshness(os.stat(path), now + 10) == {"recent": 1}
    os.utime(path, (now - 3600, now - 3600))  # an old mtime, as rsync -a or cp -p give it
    assert freshness(os.stat(path), now - 10) == {"fresh": 1}  # put in place while the command runs
    assert freshness(os.stat(path), time.time() + 1) == {}     # settled before the session began
    assert freshness(os.stat(tmp_path), now - 10) == {}  # a directory: never
    path.write_bytes(b"written by the host")  # (this process stands for the local side)
    assert freshness(os.stat(path), now - 10, host_changed=time.time()) == {}  # the host's own change
    assert freshness(os.stat(path), now - 10, host_changed=now - 5) == {"fresh": 1}  # changed here since


def test_a_fresh_handles_kept_bytes_serve_only_reads_inside_them_while_the_name_is_unchanged():
    from remote_runner.mirror.host.fresh import FreshFiles
    fresh = FreshFiles()
    assert fresh.opened(7, {"fresh": 1}) == 7 and 7 in fresh
    assert fresh.opened(8, {"recent": 1}) == 8 and 8 not in fresh  # (mapped shared: page cache)
    fresh.shared_maps = True
    assert fresh.opened(9, {"recent": 1}) == 9 and 9 in fresh
    assert fresh.opened(10, {}) == 10 and 10 not in fresh
    changed = set()
    fresh.keep(7, 4096, b"a" * 100 + b"b" * 100, since=1)

    def since(name, stamp):
        return name in changed

    assert fresh.kept(7, 4096, 100, "/f", since) == b"a" * 100
    assert fresh.kept(7, 4196, 100, "/f", since) == b"b" * 100
    assert fresh.kept(7, 4196, 101, "/f", since) is None   # past what was kept (the end, perhaps)
    assert fresh.kept(7, 4095, 10, "/f", since) is None    # before it
    assert fresh.kept(9, 4096, 10, "/f", since) is None    # another handle
    changed.add("/f")
    assert fresh.kept(7, 4096, 10, "/f", since) is None    # the name changed since the read
    changed.clear()
    fresh.released(7)
    assert 7 not in fresh and fresh.kept(7, 4096, 10, "/f", since) is None


def test_a_fresh_version_kept_on_the_host_is_fresh_again_when_reopened_from_the_copy(monkeypatch):
    """A file put in place with an old mtime is sent whole; the next opens of that version are
    answered from the host's copy without asking, and are read past the page cache too, for
    as long as the local side would still call it fresh."""
    from remote_runner.mirror.host import fresh as F
    clock = [100.0]
    monkeypatch.setattr(F.time, "monotonic", lambda: clock[0])
    files = F.FreshFiles()
    assert files.opened(1, {"fresh": 1}, "/d/f", [4097, 1, 2, 3]) == 1 and 1 in files
    assert files.reopened(2, "/d/f", [4097, 1, 2, 3]) == 2 and 2 in files
    assert files.reopened(3, "/d/f", [3, 1, 5, 3]) == 3 and 3 not in files   # another version
    assert files.reopened(4, "/d/g", [4097, 1, 2, 3]) == 4 and 4 not in files  # another name
    clock[0] += F.FRESH_FOR
    assert files.reopened(5, "/d/f", [4097, 1, 2, 3]) == 5 and 5 not in files  # settled by now
    assert files.opened(6, {}, "/d/h", [1, 1, 1, 1]) == 6
    assert files.reopened(7, "/d/h", [1, 1, 1, 1]) == 7 and 7 not in files    # never fresh
