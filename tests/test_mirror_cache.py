"""The host's file cache: read-only files fetched whole, kept, and checked at every open.

Unit tests drive :class:`LocalFileService` and :class:`FileCache` directly;
the lab tests run ``remote-runner exec`` and look at the copies on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remote_runner.mirror import protocol as P
from remote_runner.mirror.agent import FileCache, Profile
from remote_runner.mirror.profile import CommandProfile
from remote_runner.mirror.service import LocalFileService
from tests.conftest import ssh
from tests.test_mirror_lab import local_only, rr_exec, workdir  # noqa: F401 (fixtures)

HOST = "h3"


def settle(path: Path) -> None:
    """Date *path* a minute back, as a file nobody is writing, and make it world-readable."""
    path.chmod(path.stat().st_mode | 0o444)
    past = time.time() - 60
    os.utime(path, (past, past))


def whole_open(service: LocalFileService, path: Path, have=None, **more):
    reply = service.handle("open", {"path": str(path), "flags": os.O_RDONLY, "whole": True,
                                    "have": have, **more}, b"")
    return reply.fields, reply.payload


# ----------------------------------------------------------------------------- the local side

def test_settled_file_is_sent_whole_then_reported_current(public_tmp):
    path = public_tmp / "lib.so"
    path.write_bytes(b"x" * 1000)
    settle(path)
    service = LocalFileService()
    fields, data = whole_open(service, path)
    st = path.stat()
    assert fields["whole"] == [1000, st.st_mtime_ns, st.st_ino, st.st_ctime_ns] and data == b"x" * 1000
    assert "fh" not in fields and len(service.handles) == 0  # nothing left open here
    fields, data = whole_open(service, path, have=fields["whole"])
    assert fields["whole"] and data == b"" and "fh" not in fields
    assert fields["st"]["st_size"] == 1000


def test_a_file_the_host_has_the_same_is_answered_same_with_no_data(public_tmp):
    from remote_runner.mirror.host.basis import BASIS_MIN
    path = public_tmp / "lib.so"
    body = os.urandom(BASIS_MIN + 10)
    path.write_bytes(body)
    settle(path)
    service = LocalFileService()
    fields, data = whole_open(service, path, basis=hashlib.sha1(body).hexdigest())
    assert fields["basis"] == 1 and fields["whole"][0] == len(body) and data == b""
    assert "fh" not in fields and len(service.handles) == 0
    # another file of that path on the host: the data comes as before
    fields, data = whole_open(service, path, basis=hashlib.sha1(b"other").hexdigest())
    assert "basis" not in fields and data == body
    # a small file is always sent (a round trip costs more than its bytes)
    small = public_tmp / "small"
    small.write_bytes(b"s" * 100)
    settle(small)
    fields, data = whole_open(service, small, basis=hashlib.sha1(b"s" * 100).hexdigest())
    assert "basis" not in fields and data == b"s" * 100


class _BasisLink:
    """Answers whole opens as the local side does: "same" for the SHA-1 of its file, else the data."""

    def __init__(self, files) -> None:
        self.files, self.offered, self.answered = files, {}, []

    def call_each(self, op, many, timeout=None):
        for args in many:
            data = self.files[args["path"]]
            self.offered[args["path"]] = args.get("basis")
            if args.get("basis") == hashlib.sha1(data).hexdigest():
                yield {"whole": [len(data), 1, 2, 3], "basis": 1}, b""
            else:
                yield {"whole": [len(data), 1, 2, 3]}, data

    def call_many(self, op, many, timeout=None):
        return list(self.call_each(op, many, timeout))

    def answer_here(self, op):
        self.answered.append(op)

    def post(self, op, args):
        raise AssertionError("no handle was given, none may be released")


def test_the_hosts_own_file_of_the_same_content_is_kept_and_no_other(tmp_path):
    """What the host holds at a file's path is offered by SHA-1; only a confirmed copy is kept."""
    from remote_runner.mirror.host import caches
    from remote_runner.mirror.host.basis import BASIS_MIN
    size = BASIS_MIN + 1000
    local = {name: os.urandom(size) for name in ("same", "differ", "absent")}
    local["small"] = b"x" * 100
    own = tmp_path / "host"   # the host's own files, at the paths the local side names
    own.mkdir()
    names = {key: str(own / f"{key}.so") for key in local}
    (own / "same.so").write_bytes(local["same"])
    (own / "differ.so").write_bytes(os.urandom(size))
    (own / "small.so").write_bytes(local["small"])
    link = _BasisLink({names[key]: data for key, data in local.items()})
    cache = FileCache(str(tmp_path / "c"), limit=1 << 30)
    wanted = [(names[key], [len(data), 1, 2, 3]) for key, data in local.items()]
    assert caches.prefetch(link, cache, wanted) == 4
    for key, data in local.items():
        fd = cache.open_copy(names[key], [len(data), 1, 2, 3])
        with os.fdopen(fd, "rb") as handle:
            assert handle.read() == data, key    # always this machine's content
    assert link.offered[names["same"]] == hashlib.sha1(local["same"]).hexdigest()
    assert link.offered[names["differ"]] is not None   # offered, refused, sent
    assert link.offered[names["absent"]] is None and link.offered[names["small"]] is None
    assert link.answered == ["basis"]
    assert not [n for n in os.listdir(tmp_path / "c") if n.startswith(".tmp-")]  # no copy left behind


def test_big_file_sends_a_first_chunk_and_a_handle_for_the_rest(public_tmp):
    path = public_tmp / "big"
    path.write_bytes(os.urandom(P.WHOLE_CHUNK + 5))
    settle(path)
    service = LocalFileService()
    fields, data = whole_open(service, path)
    assert len(data) == P.WHOLE_CHUNK and fields["fh"]
    rest = service.handle("read", {"fh": fields["fh"], "size": P.WHOLE_CHUNK, "off": len(data)}, b"")
    assert data + rest.payload == path.read_bytes()
    service.handle("release", {"fh": fields["fh"]}, b"")
    assert len(service.handles) == 0


@pytest.mark.parametrize("case", ["fresh", "empty", "directory", "writable", "private"])
def test_files_that_do_not_qualify_get_a_plain_handle(tmp_path, case):
    path = tmp_path / "f"
    flags = os.O_RDONLY
    if case == "directory":
        path.mkdir()
        settle(path)
    else:
        path.write_bytes(b"" if case == "empty" else b"data")
        if case != "fresh":
            settle(path)
        if case == "private":
            path.chmod(0o600)  # (the mtime stays settled)
    if case == "writable":
        flags = os.O_RDWR
    service = LocalFileService()
    reply = service.handle("open", {"path": str(path), "flags": flags, "whole": True}, b"")
    assert "whole" not in reply.fields and reply.fields["fh"] and reply.payload == b""


def test_readlink_pushes_the_targets_attributes(tmp_path):
    (tmp_path / "libz.so.1.2").write_bytes(b"elf")
    os.symlink("libz.so.1.2", tmp_path / "libz.so.1")
    reply = LocalFileService().handle("readlink", {"path": str(tmp_path / "libz.so.1")}, b"")
    assert reply.payload == b"libz.so.1.2"
    [(path, attrs, watched)] = reply.fields["push"]
    assert path == str(tmp_path / "libz.so.1.2") and attrs["st_size"] == 3 and watched == 0  # no watcher here
    # a dangling link pushes nothing, and an export limit is respected
    os.symlink("missing", tmp_path / "dangling")
    assert "push" not in LocalFileService().handle(
        "readlink", {"path": str(tmp_path / "dangling")}, b"").fields
    os.symlink("/etc/hostname", tmp_path / "outside")
    limited = LocalFileService(roots=[str(tmp_path).encode()])
    assert "push" not in limited.handle("readlink", {"path": str(tmp_path / "outside")}, b"").fields


def test_symlink_lookup_carries_its_target_and_the_targets_attributes(tmp_path):
    (tmp_path / "libz.so.1.2").write_bytes(b"elf")
    os.symlink("libz.so.1.2", tmp_path / "libz.so.1")
    service = LocalFileService()
    fields = service.handle("getattr", {"path": str(tmp_path / "libz.so.1")}, b"").fields
    assert fields["link"] == "libz.so.1.2" and fields["st"]["st_size"] == len("libz.so.1.2")
    assert fields["push"][0][0] == str(tmp_path / "libz.so.1.2")
    plain = service.handle("getattr", {"path": str(tmp_path / "libz.so.1.2")}, b"").fields
    assert "link" not in plain and "push" not in plain


def test_validate_answers_many_lookups_at_once(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    os.symlink("f", tmp_path / "l")
    names = [tmp_path / "f", tmp_path / "l", tmp_path / "missing", tmp_path / "f" / "under-a-file"]
    service = LocalFileService(roots=[str(tmp_path).encode()])
    reply = service.handle("validate", {}, b"\0".join(os.fsencode(str(n)) for n in names) + b"\0/etc")
    body = json.loads(reply.payload)
    assert body["names"] == [str(n) for n in names] + ["/etc"] and body["whole"] == []
    answers = body["answers"]
    assert answers[0][0]["st_size"] == 3 and answers[0][1] is None
    assert answers[1][1] == "f"
    assert answers[2] is None and answers[3] is None  # ENOENT and ENOTDIR: "missing"
    assert answers[4] == 0  # not exported: no answer at all


def test_validate_is_seeded_once_with_the_commands_local_profile(public_tmp):
    lib = public_tmp / "libx.so"
    lib.write_bytes(b"elf" * 100)
    settle(lib)
    fresh = public_tmp / "being-written"
    fresh.write_bytes(b"data")
    service = LocalFileService()
    service.seed = ([str(public_tmp / "gone"), str(lib)], [str(lib), str(fresh), str(public_tmp / "gone")])
    body = json.loads(service.handle("validate", {}, os.fsencode(str(lib))).payload)
    assert body["names"] == [str(lib), str(public_tmp / "gone")]  # asked first, no repeats
    assert body["answers"][1] is None
    st = lib.stat()
    # only files that would be sent whole now are offered for prefetch
    assert body["whole"] == [[str(lib), [300, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]]]
    again = json.loads(service.handle("validate", {}, b"").payload)
    assert again == {"names": [], "answers": [], "whole": [], "w": [], "dirs": [], "dw": [], "wr": []}  # the seed: once
    assert str(lib) in service.looked_up and str(lib) in service.sent_whole


def test_a_host_with_its_own_profile_is_seeded_with_the_commands_profile_alone(public_tmp):
    mine, shared = public_tmp / "mine", public_tmp / "used-by-another-command"
    mine.write_text("m")
    shared.write_text("s")
    service = LocalFileService()
    service.seed = ([str(mine), str(shared)], [])
    service.own_seed = ([str(mine)], [])
    body = json.loads(service.handle("validate", {"own": 1}, b"").payload)
    assert body["names"] == [str(mine)]
    assert json.loads(service.handle("validate", {}, b"").payload)["names"] == []  # used once, either way
    service.seed = ([str(mine), str(shared)], [])
    assert json.loads(service.handle("validate", {}, b"").payload)["names"] == [str(mine), str(shared)]


def test_local_profile_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    argv = [P.name_to_wire(b"/usr/bin/caf\xe9"), "-v", "ignored"]
    profile = CommandProfile.for_command(argv, files_only=False)
    assert profile.path.startswith(str(tmp_path / "remote-runner" / "profiles"))
    assert profile.load() == ([], [])
    profile.save([argv[0], "/lib"], ["/lib/x.so"])
    assert CommandProfile.for_command(argv[:2], False).load() == ([argv[0], "/lib"], ["/lib/x.so"])
    assert CommandProfile.for_command(argv, True).load() == ([], [])  # the mode is part of the key
    profile.save([], ["/other"])  # an empty session keeps the last profile
    assert CommandProfile.for_command(argv, False).load()[1] == ["/lib/x.so"]


def test_profiles_forget_names_whose_directory_is_gone(tmp_path, monkeypatch):
    """A test suite's temporary trees leave the profiles once removed, however often it runs."""
    import shutil

    from remote_runner.mirror.profile import ProfileSet
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    profiles = ProfileSet.for_command(["/bin/sh", "-c", "x"], False, str(work))
    kept = [str(work / "setup.cfg"), str(work / "missing.py")]  # a miss in a live directory stays
    for run in range(3):
        scratch = tmp_path / f"pytest-{run}" / "test_a0"
        scratch.mkdir(parents=True)
        names = kept + [str(scratch), str(scratch / "exp.py"), str(scratch.parent / "gone" / "x")]
        (scratch / "exp.py").write_text("x = 1\n")
        profiles.save(names, [str(scratch / "exp.py")])
        shutil.rmtree(scratch.parent)  # the suite's cleanup, after the session
    last = [str(scratch), str(scratch / "exp.py")]  # what existed when the last session ended
    for profile in profiles.shared:  # the earlier runs' trees are gone from the merged profiles
        assert profile.load() == (kept + last, [str(scratch / "exp.py")]), profile.path
    profiles.save(kept, [])
    assert all(p.load() == (kept, []) for p in [profiles.own] + profiles.shared)


def test_a_commands_own_profile_keeps_its_last_three_sessions(tmp_path, monkeypatch):
    """``sh -c true`` between two ``sh -c 'python3 ...'`` runs does not make the second start cold."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    argv = ["/bin/sh", "-c", "x"]
    for names, files in ((["/usr/lib/python3"], ["/usr/lib/python3/x.py"]), (["/bin/true"], ["/bin/true"]),
                         (["/etc/hosts"], [])):
        CommandProfile.for_command(argv, False).save(names, files)
    names, files = CommandProfile.for_command(argv, False).load()
    assert names == ["/etc/hosts", "/bin/true", "/usr/lib/python3"]  # the newest first
    assert files == ["/bin/true", "/usr/lib/python3/x.py"]
    CommandProfile.for_command(argv, False).save(["/usr"], [])  # a fourth: the oldest goes
    assert CommandProfile.for_command(argv, False).load() == (["/usr", "/etc/hosts", "/bin/true"], ["/bin/true"])


def test_the_hosts_profile_keeps_a_commands_last_three_sessions(tmp_path):
    files = FileCache(str(tmp_path / "files" / "origin"), limit=1 << 20)
    boot = {"argv": ["sh", "-c", "x"], "files_only": False}
    for names in (["/usr/lib/python3/os.py"], ["/bin/true"], ["/etc/hosts"], ["/usr/bin/env"]):
        profile = Profile.for_command(files, boot)
        for name in names:
            profile.record(name)
        profile.save()
    kept = Profile.for_command(files, boot)
    assert kept.load() == ["/usr/bin/env", "/etc/hosts", "/bin/true"]
    assert kept.load_dirs() == ["/usr/bin", "/etc", "/bin"]


def test_profile_keeps_names_per_command_including_non_utf8(tmp_path):
    files = FileCache(str(tmp_path / "files" / "origin"), limit=1 << 20)
    boot = {"argv": ["ffmpeg", "-version", "ignored"], "files_only": False}
    profile = Profile.for_command(files, boot)
    odd = P.name_to_wire(b"/data/caf\xe9")
    for path in ("/usr/lib", odd, "/usr/lib"):
        profile.record(path)
    profile.save()
    assert Profile.for_command(files, boot).load() == ["/usr/lib", odd]
    other = Profile.for_command(files, {"argv": ["ffmpeg", "-i"], "files_only": False})
    assert other.load() == [] and Profile.for_command(None, boot) is None


# ----------------------------------------------------------------------------- the host side

def test_file_cache_stores_replaces_finds_and_trims(tmp_path):
    cache = FileCache(str(tmp_path / "c"), limit=10)
    assert cache.lookup("/a") is None
    fd = cache.store("/a", [3, 1, 7, 5], [b"ab", b"c"])
    assert os.pread(fd, 10, 0) == b"abc"
    os.close(fd)
    fd = cache.store("/a", [2, 2, 7, 6], [b"xy"])  # a newer version replaces the old copy
    os.close(fd)
    assert FileCache(str(tmp_path / "c"), limit=10).lookup("/a") == [2, 2, 7, 6]  # found again
    assert len(os.listdir(tmp_path / "c")) == 1
    assert cache.open_copy("/a", [3, 1, 7, 5]) is None  # stale metadata is never served
    fd = cache.open_copy("/a", [2, 2, 7, 6])
    fh = cache.add_handle(fd, {"st_size": 2})
    assert cache.handles[fh][1] == {"st_size": 2}
    cache.release(fh)
    for name, size in (("/b", 6), ("/c", 6)):
        os.close(cache.store(name, [size, 0, 0, 0], [b"z" * size]))
        time.sleep(0.01)
    cache.trim()  # 14 bytes > 10: the least recently used go first, down to 80 %
    assert sorted(os.listdir(tmp_path / "c")) == [f"{FileCache.key('/c')}-6-0-0-0"]
    assert cache.open_copy("/a", [2, 2, 7, 6]) is None  # trimmed: the caller fetches again


# ----------------------------------------------------------------------------- on a lab host

def host_copies(lab, path: Path) -> list:
    """Return the names of the host's cached copies of local *path*."""
    key = hashlib.sha1(os.fsencode(str(path))).hexdigest()
    out = ssh(lab, HOST, f"ls ~/.cache/remote-runner/files/*/ 2>/dev/null | grep '^{key}-' || true")
    return out.stdout.split()


def test_a_small_file_comes_with_the_files_of_its_kind_beside_it(public_tmp, monkeypatch):
    from remote_runner.mirror import sendahead
    cache = public_tmp / "__pycache__"
    cache.mkdir()
    cache.chmod(0o755)
    for name in ("a", "b", "c", "d"):
        (cache / f"{name}.cpython-311.pyc").write_bytes(name.encode() * 100)
    (cache / "big.cpython-311.pyc").write_bytes(b"x" * (sendahead.SIBLING_FILE_LIMIT + 1))
    (cache / "notes.txt").write_bytes(b"another kind")
    (cache / "secret.cpython-311.pyc").write_bytes(b"s" * 10)
    (cache / "link.cpython-311.pyc").symlink_to(cache / "d.cpython-311.pyc")
    for path in cache.iterdir():
        if not path.is_symlink():
            settle(path)
    (cache / "secret.cpython-311.pyc").chmod(0o600)                # private: never copied to a host
    (cache / "fresh.cpython-311.pyc").write_bytes(b"being written")  # not settled yet
    service = LocalFileService()
    fields, data = whole_open(service, cache / "a.cpython-311.pyc")
    assert data == b"a" * 100
    listed = fields["libs"]
    expected = [str(cache / f"{n}.cpython-311.pyc") for n in ("b", "c", "d")]
    assert listed["names"] == expected
    assert [name for name, _ in listed["whole"]] == expected
    st = (cache / "b.cpython-311.pyc").stat()
    assert listed["whole"][0][1] == [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    assert all(answer[0]["st_size"] == 100 for answer in listed["answers"])
    # once per directory and session; a fetch an earlier reply asked for lists nothing more
    assert "libs" not in whole_open(service, cache / "b.cpython-311.pyc")[0]
    other = LocalFileService()
    ahead = other.handle("open", {"path": str(cache / "c.cpython-311.pyc"), "flags": os.O_RDONLY,
                                  "whole": True, "have": None, "ahead": 1}, b"")
    assert ahead.payload == b"c" * 100 and "libs" not in ahead.fields
    # a sibling fetched ahead is not put in the profile: only what the program opened is
    assert list(service.sent_whole) == [str(cache / f"{n}.cpython-311.pyc") for n in ("a", "b")]
    assert not other.sent_whole
    # the byte budget bounds what an unneeded push costs
    monkeypatch.setattr(sendahead, "SIBLING_DIR_BYTES", 250)
    fields, _ = whole_open(other, cache / "a.cpython-311.pyc")
    assert [name for name, _ in fields["libs"]["whole"]] == expected[:2]
    # a file without a kind, or a big one, brings nothing
    plain = public_tmp / "README"
    plain.write_bytes(b"plain")
    settle(plain)
    assert "libs" not in whole_open(LocalFileService(), plain)[0]
    assert "libs" not in whole_open(LocalFileService(), cache / "big.cpython-311.pyc")[0]


def test_a_profile_keeps_the_siblings_the_host_says_were_opened_and_nothing_else(public_tmp, tmp_path,
                                                                                   monkeypatch):
    from remote_runner.mirror.profile import ProfileSet
    from remote_runner.mirror.session import _save_profile
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("a", "b", "c"):
        (public_tmp / f"{name}.txt").write_text(name)
        settle(public_tmp / f"{name}.txt")
    service = LocalFileService()
    service.handle("getattr", {"path": str(public_tmp / "a.txt")}, b"")  # (a session with no lookup keeps none)
    whole_open(service, public_tmp / "a.txt")                      # lists b and c as its siblings
    assert service.listed_siblings == {str(public_tmp / "b.txt"), str(public_tmp / "c.txt")}
    profile = ProfileSet.for_command(["/bin/cat"], False, str(public_tmp))
    _save_profile(profile, service, [str(public_tmp / "c.txt"), "/etc/shadow", 7])
    _, files = profile.load()
    assert str(public_tmp / "a.txt") in files and str(public_tmp / "c.txt") in files
    assert str(public_tmp / "b.txt") not in files and "/etc/shadow" not in files


def test_neither_end_keeps_in_a_profile_what_the_command_made(tmp_path, monkeypatch):
    """A directory the command created (a test's tmp_path) and all below it stay out of profiles."""
    from remote_runner.mirror.profile import ProfileSet
    from remote_runner.mirror.session import _save_profile
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    (work / "conf.py").write_text("x = 1\n")
    (work / "pytest-70").mkdir()  # a name that merely starts like one made: kept
    # the local side: what the service made for the host
    service = LocalFileService()
    made = work / "pytest-7"
    service.handle("mkdir", {"path": str(made), "mode": 0o755}, b"")
    (made / "exp.py").write_text("y = 2\n")
    for name in (work / "conf.py", made, made / "exp.py", work / "pytest-70"):
        service.handle("getattr", {"path": str(name)}, b"")
    profile = ProfileSet.for_command(["/bin/sh"], False, str(work))
    _save_profile(profile, service)
    assert profile.load()[0] == [str(work / "conf.py"), str(work / "pytest-70")]
    # the host's own profile
    files = FileCache(str(tmp_path / "files" / "origin"), limit=1 << 20)
    boot = {"argv": ["python3", "-m", "pytest"], "files_only": False}
    host = Profile.for_command(files, boot)
    for path in ("/usr/lib/x.so", "/tmp/run/out", "/tmp/run/out/a.txt", "/tmp/run/outer"):
        host.record(path)
    host.made("/tmp/run/out")
    host.save()
    again = Profile.for_command(files, boot)
    assert again.load() == ["/usr/lib/x.so", "/tmp/run/outer"]
    assert again.load_dirs() == ["/usr/lib", "/tmp/run"]
    assert P.made_in_session("/a/b", {"/"}) and not P.made_in_session("/ab", {"/a"})


def test_neither_end_keeps_in_a_profile_what_the_command_removed_or_renamed_away(tmp_path, monkeypatch):
    """An earlier run's temporary tree, renamed and removed by this one (pytest's cleanup), is
    not offered back at the next start; what a swap leaves in place is kept."""
    from remote_runner.mirror.profile import ProfileSet
    from remote_runner.mirror.session import _save_profile
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    work = tmp_path / "work"
    for d in ("run-1/sub", "run-2", "kept", "swap-a", "swap-b"):
        (work / d).mkdir(parents=True)
    service = LocalFileService()
    service.handle("getattr", {"path": str(work / "run-1" / "sub")}, b"")
    service.handle("getattr", {"path": str(work / "kept")}, b"")
    service.handle("rename", {"old": str(work / "run-1"), "new": str(work / "garbage-x")}, b"")
    service.handle("rmdir", {"path": str(work / "run-2")}, b"")
    service.handle("getattr", {"path": str(work / "swap-a")}, b"")
    service.handle("rename", {"old": str(work / "swap-a"), "new": str(work / "swap-b"), "flags": 2}, b"")
    profile = ProfileSet.for_command(["/bin/sh"], False, str(work))
    _save_profile(profile, service)
    names = profile.load()[0]
    assert str(work / "kept") in names and str(work / "swap-a") in names
    assert not [n for n in names if "run-1" in n]
    # the host's own profile
    files = FileCache(str(tmp_path / "files" / "origin"), limit=1 << 20)
    host = Profile.for_command(files, {"argv": ["python3", "-m", "pytest"], "files_only": False})
    for path in ("/tmp/p/pytest-1/sub", "/tmp/p/garbage-x/sub", "/tmp/p/pytest-2", "/tmp/p/kept"):
        host.record(path)
    host.record_dir("/tmp/p/garbage-x/sub")
    host.gone("/tmp/p/pytest-1")
    host.gone("/tmp/p/garbage-x")
    host.gone("/tmp/p/pytest-2")
    host.save()
    again = Profile.for_command(files, {"argv": ["python3", "-m", "pytest"], "files_only": False})
    assert again.load() == ["/tmp/p/kept"] and again.load_dirs() == ["/tmp/p"]


def rpc_lines(stderr: bytes, op: str) -> list:
    return [line for line in stderr.decode(errors="replace").splitlines()
            if re.search(rf"\brpc {op} ", line)]


def test_warm_run_sends_no_file_data_and_sees_changes(lab, local_only, workdir):
    data = local_only / "data.bin"
    content = os.urandom(3 * P.WHOLE_CHUNK + 12345)  # several chunks
    data.write_bytes(content)
    settle(data)
    argv = ["/usr/bin/sha1sum", str(data)]
    first = rr_exec(lab, HOST, argv, workdir)
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout.split()[0].decode() == hashlib.sha1(content).hexdigest()
    st = data.stat()
    [copy] = host_copies(lab, data)
    assert copy.endswith(f"-{st.st_size}-{st.st_mtime_ns}-{st.st_ino}-{st.st_ctime_ns}")
    remote_sum = ssh(lab, HOST, f"sha1sum ~/.cache/remote-runner/files/*/{copy}").stdout.split()[0]
    assert remote_sum == hashlib.sha1(content).hexdigest()

    warm = rr_exec(lab, HOST, argv, workdir, "--debug-rpc", "-l", "INFO")
    assert warm.returncode == 0 and warm.stdout == first.stdout
    # every file comes from the host's copies: looked up (all at once, by the warm start's
    # validate), never opened or read through the link
    assert rpc_lines(warm.stderr, "validate") and not rpc_lines(warm.stderr, "read")
    # the validation comes before the mount: the mount's own lookups are answered by it too
    assert not [line for line in rpc_lines(warm.stderr, "getattr")
                if re.search(r"'path': '/(dev|proc|sys|run)?'", line)]
    assert not rpc_lines(warm.stderr, "open")

    changed = bytes([content[0] ^ 1]) + content[1:]  # same size, new content and mtime
    data.write_bytes(changed)
    settle(data)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = rr_exec(lab, HOST, argv, workdir)
    assert third.stdout.split()[0].decode() == hashlib.sha1(changed).hexdigest()
    [new_copy] = host_copies(lab, data)
    assert new_copy != copy


_READS = """
import hashlib, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
parts = [os.pread(fd, n, at) for at, n in ((0, 1), (4095, 2), (131071, 262145), (size - 10, 100),
                                           (size, 10), (size + 5000, 10))]
view = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
parts.append(view[size // 3:size // 3 + 70000])
print(" ".join(hashlib.sha1(part).hexdigest()[:12] for part in parts))
"""


def test_reads_of_the_hosts_copy_at_any_offset_and_through_mmap_are_the_files_bytes(lab, local_only, workdir):
    """A warm read is answered from the host's copy without its bytes passing through Python
    (libfuse reads the copy itself, ``read_buf``): the bytes at every offset, across and past
    the end, and through a mapping, are the local file's."""
    data = local_only / "offsets.bin"
    data.write_bytes(os.urandom(2 * P.WHOLE_CHUNK + 4321))
    settle(data)
    argv = ["/usr/bin/python3", "-c", _READS, str(data)]
    local = subprocess.run(argv, capture_output=True, check=True, timeout=60).stdout
    assert rr_exec(lab, HOST, argv, workdir).stdout == local  # fetched: the host keeps a copy
    stats = workdir / "stats.json"
    warm = rr_exec(lab, HOST, argv, workdir, "--stats", str(stats))
    assert warm.returncode == 0, warm.stderr.decode()
    assert warm.stdout == local
    host = json.loads(stats.read_text())["host"]
    assert host["answered_on_host"].get("read", 0) >= 2 and "read" not in host["asked"]


def test_a_file_the_host_already_has_is_copied_there_and_one_that_differs_is_sent(lab, local_only, workdir):
    """Same path, same size on the host: its own copy is used only when the content is this machine's."""
    same, differ = local_only / "same.bin", local_only / "differ.bin"
    same.write_bytes(os.urandom(200_000))
    differ.write_bytes(os.urandom(200_000))
    settle(same)
    settle(differ)
    theirs = local_only / "theirs.bin"  # the host's differ.bin: same size, other bytes
    theirs.write_bytes(os.urandom(200_000))
    ssh(lab, HOST, f"mkdir -p {local_only}")
    try:
        for source, target in ((same, same), (theirs, differ)):
            subprocess.run(["scp", "-q", "-F", lab.ssh_config, str(source), f"{HOST}:{target}"], check=True,
                           timeout=120)
        stats = workdir / "stats.json"
        # sha1sum and its libraries first (a fresh host would take those from its own disk too)
        assert rr_exec(lab, HOST, ["/usr/bin/sha1sum", "/dev/null"], workdir).returncode == 0
        proc = rr_exec(lab, HOST, ["/usr/bin/sha1sum", str(same), str(differ)], workdir, "--stats", str(stats))
        assert proc.returncode == 0, proc.stderr
        want = [hashlib.sha1(p.read_bytes()).hexdigest() for p in (same, differ)]
        assert [line.split()[0] for line in proc.stdout.decode().splitlines()] == want
        counters = json.loads(stats.read_text())
        assert counters["host"]["answered_on_host"].get("basis") == 1
        assert 200_000 < counters["bytes_sent"] < 380_000  # differ.bin went through the link, same.bin did not
        assert len(host_copies(lab, same)) == 1 and len(host_copies(lab, differ)) == 1
    finally:  # the local-only tree must stay absent on every host (test_lab checks it)
        ssh(lab, HOST, f"rm -rf {local_only}; rmdir {local_only.parent} 2>/dev/null", check=False)


def test_a_copy_is_stale_when_only_ctime_tells(lab, local_only, workdir):
    """Rewritten in place, same size, mtime put back (``touch -d``): never served from the old copy."""
    data = local_only / "same-size.txt"
    data.write_bytes(b"version one\n")
    settle(data)
    argv = ["/bin/cat", str(data)]
    assert rr_exec(lab, HOST, argv, workdir).stdout == b"version one\n"
    assert rr_exec(lab, HOST, argv, workdir).stdout == b"version one\n"  # from the host's copy
    [copy] = host_copies(lab, data)
    before = data.stat()
    time.sleep(0.05)  # a new ctime
    with open(data, "r+b") as handle:  # same inode, same size
        handle.write(b"version two\n")
    subprocess.run(["touch", "-d", "@%d.%09d" % divmod(before.st_mtime_ns, 10**9), str(data)], check=True)
    after = data.stat()
    assert [after.st_size, after.st_mtime_ns, after.st_ino] == [before.st_size, before.st_mtime_ns, before.st_ino]
    assert after.st_ctime_ns != before.st_ctime_ns
    assert rr_exec(lab, HOST, argv, workdir).stdout == b"version two\n"
    assert host_copies(lab, data) != [copy]


def test_file_being_written_is_read_through_the_link(lab, workdir):
    log = workdir / "growing.log"
    log.write_text("line 1\n")  # modified just now: it may still grow
    proc = rr_exec(lab, HOST, ["/bin/cat", str(log)], workdir, "--debug-rpc", "-l", "INFO")
    assert proc.returncode == 0 and proc.stdout == b"line 1\n"
    assert rpc_lines(proc.stderr, "read")
    assert host_copies(lab, log) == []


def test_no_cache_keeps_no_copy(lab, local_only, workdir):
    data = local_only / "private.txt"
    data.write_text("not to be kept\n")
    settle(data)
    proc = rr_exec(lab, HOST, ["/bin/cat", str(data)], workdir, "--no-cache")
    assert proc.returncode == 0 and proc.stdout == b"not to be kept\n"
    assert host_copies(lab, data) == []


def test_warm_start_validates_in_one_request_and_sees_new_files(lab, local_only, workdir):
    maybe = local_only / "maybe.txt"
    argv = ["/bin/sh", "-c", f"cat {maybe} 2>/dev/null || echo none"]
    assert rr_exec(lab, HOST, argv, workdir).stdout == b"none\n"  # records the lookups
    warm = rr_exec(lab, HOST, argv, workdir, "--debug-rpc", "-l", "INFO")
    assert warm.stdout == b"none\n"
    assert len(rpc_lines(warm.stderr, "validate")) == 1
    assert len(rpc_lines(warm.stderr, "getattr")) < 10  # the rest came with the validation
    maybe.write_text("here now\n")  # was "missing" in the profile: the answer is fresh
    assert rr_exec(lab, HOST, argv, workdir).stdout == b"here now\n"


def test_files_read_one_after_another_come_with_the_first(lab, local_only, workdir, tmp_path, monkeypatch):
    """A first run reading a directory's modules one by one waits for the first only."""
    from remote_runner.mirror.profile import ProfileSet
    local_only.chmod(0o755)
    parts = []
    for n in range(30):
        part = local_only / f"part-{n:02d}.txt"
        part.write_text(f"part {n}\n")
        settle(part)
        parts.append(part)
    ssh(lab, HOST, "rm -rf ~/.cache/remote-runner/files")
    script = "for f in " + " ".join(str(p) for p in parts) + "; do cat $f; done"
    cache_home = {"XDG_CACHE_HOME": str(tmp_path / "profiles")}
    proc = rr_exec(lab, HOST, ["/bin/sh", "-c", script], workdir, "--debug-rpc", "-l", "INFO", env=cache_home)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == "".join(f"part {n}\n" for n in range(30))
    # the host said which of the files fetched ahead were opened: the profile keeps them all
    monkeypatch.setenv("XDG_CACHE_HOME", cache_home["XDG_CACHE_HOME"])
    _, files = ProfileSet.for_command(["/bin/sh", "-c", script], False, str(workdir)).own.load()
    assert set(map(str, parts)) <= set(files)
    opens = [line for line in rpc_lines(proc.stderr, "open") if "part-" in line]
    asked = [line for line in opens if "'ahead'" not in line]
    # the first file came with its lookup (small, in a read-only tree): its open was
    # answered on the host; the second's was the one waited for, and it brought the rest
    assert not [line for line in opens if "part-00.txt" in line]
    assert len(asked) == 1 and "part-01.txt" in asked[0]
    assert len(opens) == 29                                  # the rest came ahead, each once
    assert len(host_copies(lab, parts[-1])) == 1


def test_a_first_import_of_a_package_asks_for_its_directory_only(lab, local_only, workdir, tmp_path):
    """Its ``__pycache__`` and its compiled modules, ``__init__`` first, come with the answer to
    Python's first probe in the package's directory: no lookup in ``__pycache__``, and at most the
    first open of a module waits (when a lookup above the package brought its directory, that
    answer lists directories but sends no file: the first open then brings the rest)."""
    local_only.chmod(0o755)
    package = local_only / "pkg"
    package.mkdir(mode=0o755)
    modules = ["__init__"] + [f"m{n}" for n in range(6)]
    for name in modules:
        (package / f"{name}.py").write_text(f"NAME = {name!r}\n")
        settle(package / f"{name}.py")
    subprocess.run(["/usr/bin/python3", "-m", "compileall", "-q", str(package)], check=True)
    (package / "__pycache__").chmod(0o755)
    for pyc in (package / "__pycache__").iterdir():
        settle(pyc)
    ssh(lab, HOST, "rm -rf ~/.cache/remote-runner/files ~/.cache/remote-runner/files.listings")
    code = (f"import sys; sys.path.insert(0, {str(local_only)!r}); sys.dont_write_bytecode = True; "
            "import pkg, " + ", ".join(f"pkg.m{n}" for n in range(6)) + "; "
            "print(' '.join(sys.modules[f'pkg.m{n}'].NAME for n in range(6)))")
    cache_home = {"XDG_CACHE_HOME": str(tmp_path / "profiles")}  # no earlier run's profile
    proc = rr_exec(lab, HOST, ["/usr/bin/python3", "-c", code], workdir, "--debug-rpc", "-l", "INFO",
                   env=cache_home)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == [f"m{n}" for n in range(6)]
    cached = str(package / "__pycache__")
    # (which lookup brought the package depends on what the host knew of /opt already: the
    # package's own, or one above it, whose answer holds the directories below it)
    assert not [line for line in rpc_lines(proc.stderr, "getattr") if cached in line]
    opens = [line for line in rpc_lines(proc.stderr, "open") if cached in line]
    asked = [line for line in opens if "'ahead'" not in line]
    assert len(asked) <= 1 and len(opens) == len(modules), asked
    assert any("__init__.cpython" in line for line in opens)


def test_a_file_opened_again_in_a_session_is_read_from_the_kernels_pages(lab, local_only, workdir):
    """Each open of a host copy used to drop the kernel's pages and read them through the agent again."""
    from tests.test_mirror_traffic import exec_stats
    data = local_only / "data.bin"
    content = os.urandom(4 << 20)
    data.write_bytes(content)
    settle(data)
    digest = hashlib.md5(content).hexdigest()
    once = ["/bin/sh", "-c", f"md5sum < {data}"]
    thrice = ["/bin/sh", "-c", f"md5sum < {data}; md5sum < {data}; md5sum < {data}"]
    assert rr_exec(lab, HOST, once, workdir).returncode == 0  # the host now has its copy
    proc, one = exec_stats(lab, HOST, once, workdir)
    assert proc.stdout.split()[0].decode() == digest
    proc, three = exec_stats(lab, HOST, thrice, workdir)
    assert proc.stdout.decode().split() == [digest, "-"] * 3
    reads_once = one["host"]["answered_on_host"]["read"]
    reads_thrice = three["host"]["answered_on_host"]["read"]
    assert reads_once >= 32 and not one["served"].get("read") and not three["served"].get("read")
    assert reads_thrice < reads_once * 1.5, (reads_once, reads_thrice)
    # a new version of the file is never read from the old one's pages
    changed = os.urandom(4 << 20)
    data.write_bytes(changed)
    settle(data)
    script = (f"md5sum < {data}; touch first; "       # in the cwd, which the host may write
              "while [ ! -e go ]; do sleep 0.05; done; " f"md5sum < {data}")
    runner = subprocess.Popen([sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config, HOST,
                               "/bin/sh", "-c", script], cwd=str(workdir),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (workdir / "first").exists():   # written through the mirror
            assert time.monotonic() < deadline and runner.poll() is None
            time.sleep(0.1)
        newest = os.urandom(4 << 20)
        fresh = local_only / "fresh.bin"
        fresh.write_bytes(newest)
        settle(fresh)
        os.rename(fresh, data)          # a new version under the same name, as package managers do
        (workdir / "go").write_text("")
        out, err = runner.communicate(timeout=120)
    finally:
        runner.kill()
    assert runner.returncode == 0, err.decode()
    assert out.decode().split() == [hashlib.md5(changed).hexdigest(), "-", hashlib.md5(newest).hexdigest(), "-"]


def test_a_new_host_is_seeded_by_this_machines_profile(lab, local_only, workdir, tmp_path):
    """A command run before on one host starts on another with its files fetched ahead."""
    lib = local_only / "data.bin"
    lib.write_bytes(os.urandom(2 * P.WHOLE_CHUNK + 7))
    settle(lib)
    argv = ["/usr/bin/sha1sum", str(lib)]
    env_home = {"XDG_CACHE_HOME": str(tmp_path / "local-cache")}  # this machine's profiles
    ssh(lab, "h2", "rm -rf ~/.cache/remote-runner/files ~/.cache/remote-runner/files.profiles")
    assert rr_exec(lab, "h2", argv, workdir, env=env_home).returncode == 0
    ssh(lab, HOST, "rm -rf ~/.cache/remote-runner/files ~/.cache/remote-runner/files.profiles")
    seeded = rr_exec(lab, HOST, argv, workdir, "--debug-rpc", "-l", "INFO", env=env_home)
    assert seeded.returncode == 0, seeded.stderr.decode()
    assert seeded.stdout.split()[0].decode() == hashlib.sha1(lib.read_bytes()).hexdigest()
    # the lookups came with one validation, and the file was fetched before the command ran:
    # by the agent's prefetch (O_RDONLY|O_NONBLOCK), not by the program's own open (O_LARGEFILE)
    assert len(rpc_lines(seeded.stderr, "getattr")) < 10
    opens = [line for line in rpc_lines(seeded.stderr, "open") if str(lib) in line]
    assert opens and all(f"'flags': {os.O_RDONLY | os.O_NONBLOCK}," in line for line in opens)
    assert len(host_copies(lab, lib)) == 1


class _SlowLink:
    """Answers a prefetch's opens and reads from *files* (name -> bytes) after a delay, counting batches at once."""

    def __init__(self, files, delay: float) -> None:
        import threading
        self.files, self.delay = files, delay
        self.lock = threading.Lock()
        self.batches_now = self.most_at_once = 0

    def call_many(self, op, many, timeout=None):
        if op == "open":
            with self.lock:
                self.batches_now += 1
                self.most_at_once = max(self.most_at_once, self.batches_now)
        time.sleep(self.delay)
        out = []
        for args in many:
            if op == "open":
                data = self.files[args["path"]]
                out.append(({"whole": [len(data), 1, 2, 3], "fh": 100 + len(out)}, data[:P.WHOLE_CHUNK]))
            else:
                out.append(({}, b""))
        return out

    def call_each(self, op, many, timeout=None):
        yield from self.call_many(op, many, timeout)

    def post(self, op, args):
        if op == "release":  # a batch's handle (one file per batch here): the batch is done
            with self.lock:
                self.batches_now -= 1


def test_prefetch_runs_two_batches_at_once_and_wakes_each_file_when_stored(tmp_path, monkeypatch):
    import threading
    from remote_runner.mirror.host import caches
    monkeypatch.setattr(caches, "PREFETCH_BATCH", 1000)
    files = {f"/lib/l{i}": bytes([i]) * 900 for i in range(6)}   # one file per batch
    link = _SlowLink(files, delay=0.05)
    cache = FileCache(str(tmp_path / "c"), limit=1 << 20)
    wanted = [(name, [len(data), 1, 2, 3]) for name, data in files.items()]
    woke = {}
    waiter = threading.Thread(target=lambda: (cache.wait_for("/lib/l0", 30), woke.setdefault("at", time.monotonic())))
    cache.expect(["/lib/l0"])
    waiter.start()
    assert caches.prefetch(link, cache, wanted) == 6
    done = time.monotonic()
    waiter.join(5)
    assert link.most_at_once == 2
    assert all(cache.lookup(name) == [900, 1, 2, 3] for name in files)
    assert woke["at"] < done - 0.05  # the first file was there well before the last batch


class _TrickleLink:
    """Answers a prefetch's opens one by one, *gap* seconds apart (small files: no handle)."""

    def __init__(self, files, gap: float, claimed=None) -> None:
        self.files, self.gap = files, gap
        self.claimed = claimed or {}  # path -> the size its answer claims
        self.last_answer = 0.0

    def call_each(self, op, many, timeout=None):
        for args in many:
            time.sleep(self.gap)
            data = self.files[args["path"]]
            self.last_answer = time.monotonic()
            yield {"whole": [self.claimed.get(args["path"], len(data)), 1, 2, 3]}, data

    def call_many(self, op, many, timeout=None):
        return list(self.call_each(op, many, timeout))

    def post(self, op, args):
        raise AssertionError("no handle was given, none may be released")


def test_a_file_of_a_batch_is_kept_as_soon_as_its_answer_came(tmp_path):
    """A batch lists the files in the order the program will want them: the first one must
    not wait for the batch's last answer."""
    import threading
    from remote_runner.mirror.host import caches
    files = {f"/lib/m{i}": bytes([i]) * 100 for i in range(5)}   # one batch
    link = _TrickleLink(files, gap=0.1)
    cache = FileCache(str(tmp_path / "c"), limit=1 << 20)
    woke = {}
    waiter = threading.Thread(target=lambda: (cache.wait_for("/lib/m0", 30), woke.setdefault("at", time.monotonic())))
    cache.expect(["/lib/m0"])
    waiter.start()
    assert caches.prefetch(link, cache, [(name, [100, 1, 2, 3]) for name in files]) == 5
    waiter.join(5)
    assert all(cache.lookup(name) == [100, 1, 2, 3] for name in files)
    assert woke["at"] < link.last_answer - 0.2  # stored while four answers were still to come
    # an answer whose bytes are not the size it claims (the file changed as it was read) is not kept
    cache2 = FileCache(str(tmp_path / "c2"), limit=1 << 20)
    short = _TrickleLink({"/lib/x": b"short"}, 0, claimed={"/lib/x": 100})
    assert caches.prefetch(short, cache2, [("/lib/x", [100, 1, 2, 3])]) == 0
    assert cache2.lookup("/lib/x") is None


def test_a_lookup_in_a_package_brings_its_compiled_init_and_modules(public_tmp):
    """Python's first probe in a package (``__init__`` as an extension) lists the package's
    bytecode for that interpreter, ``__init__`` first, so its open waits for nothing."""
    package = public_tmp / "pkg"
    cache = package / "__pycache__"
    cache.mkdir(parents=True)
    package.chmod(0o755)
    cache.chmod(0o755)
    (package / "__init__.py").write_text("")
    for name in ("__init__", "mod"):
        (cache / f"{name}.cpython-311.pyc").write_bytes(name.encode() * 10)
    (cache / "mod.cpython-312.pyc").write_bytes(b"another interpreter")
    for path in list(cache.iterdir()) + [package / "__init__.py"]:
        settle(path)
    service = LocalFileService()
    probe = str(package / "__init__.cpython-311-x86_64-linux-gnu.so")
    fields = service.handle("getattr", {"path": probe, "dir": 1}, b"").fields
    assert fields.get("missing") == 1
    assert [name for name, _ in fields["libs"]["whole"]] == [str(cache / "__init__.cpython-311.pyc"),
                                                             str(cache / "mod.cpython-311.pyc")]
    # any other missing name, or a package without bytecode, brings none
    assert "libs" not in service.handle("getattr", {"path": str(package / "nothing.so"), "dir": 1}, b"").fields
    bare = public_tmp / "bare"
    bare.mkdir()
    bare.chmod(0o755)
    assert "libs" not in LocalFileService().handle(
        "getattr", {"path": str(bare / "__init__.cpython-311-x86_64-linux-gnu.so"), "dir": 1}, b"").fields
