"""Unit tests of the mirror's POSIX semantics, case by case (local file service and agent helpers).

Each test drives :class:`LocalFileService` as the agent would, with the
arguments the host's FUSE library sends, and checks the local disk. The same
cases run end to end through real FUSE mounts in ``test_mirror_conformance.py``.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from remote_runner.mirror import agent, hardlinks
from remote_runner.mirror import protocol as P
from remote_runner.mirror.localnames import is_hidden_name
from remote_runner.mirror.service import LocalFileService, OpError

HIDDEN = ".fuse_hidden0000001200000003"


def w(path) -> str:
    return P.name_to_wire(os.fsencode(str(path)))


def call(svc: LocalFileService, op: str, payload: bytes = b"", **args):
    """One request as the agent sends it; the reply header (raises OSError with the errno)."""
    header, data, _ = svc.serve({"t": P.REQ, "id": 1, "op": op, "a": args}, payload)
    P.expand_reply(header)  # (as the agent reads it)
    if header.get("e"):
        raise OSError(header["e"], os.strerror(header["e"]))
    return header, data


def errno_of(fn) -> int:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno


# -- files unlinked or renamed over while open ------------------------------------------
def test_unlinked_open_file_leaves_nothing_behind_and_stays_usable(tmp_path):
    svc = LocalFileService()
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "f").write_bytes(b"kept")
    fh = call(svc, "open", path=w(sub / "f"), flags=os.O_RDWR)[0]["fh"]
    hidden = sub / HIDDEN
    # libfuse hides the open file: the service removes it for real instead.
    call(svc, "rename", old=w(sub / "f"), new=w(hidden), flags=0, hide=True)
    assert os.listdir(sub) == []
    st = call(svc, "getattr", path=w(hidden))[0]["st"]
    assert st["st_nlink"] == 0 and st["st_size"] == 4
    call(svc, "chmod", path=w(hidden), mode=0o600)
    call(svc, "truncate", path=w(hidden), size=2)
    call(svc, "utimens", path=w(hidden), ns=[1000000123, 2000000456])
    st = os.fstat(svc.handles.get(fh))
    assert (stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns) == (0o600, 2, 2000000456)
    assert call(svc, "read", fh=fh, size=10, off=0)[1] == b"ke"
    os.rmdir(sub)  # the directory is empty: rmdir works while the file is still open
    # After the last release libfuse unlinks the hidden name: only the hold goes.
    call(svc, "release", fh=fh)
    call(svc, "unlink", path=w(hidden))
    assert len(svc.hidden) == 0


def test_rename_over_an_open_file_keeps_the_old_data_for_its_reader(tmp_path):
    svc = LocalFileService()
    (tmp_path / "target").write_bytes(b"old")
    (tmp_path / "new").write_bytes(b"new")
    fh = call(svc, "open", path=w(tmp_path / "target"), flags=os.O_RDONLY)[0]["fh"]
    call(svc, "rename", old=w(tmp_path / "target"), new=w(tmp_path / HIDDEN), flags=0, hide=True)
    call(svc, "rename", old=w(tmp_path / "new"), new=w(tmp_path / "target"), flags=0)
    assert call(svc, "read", fh=fh, size=10, off=0)[1] == b"old"
    assert (tmp_path / "target").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["target"]
    svc.close()
    assert len(svc.hidden) == 0


def test_a_rename_not_marked_as_hiding_is_an_ordinary_rename(tmp_path):
    svc = LocalFileService()
    (tmp_path / "f").write_bytes(b"x")
    call(svc, "rename", old=w(tmp_path / "f"), new=w(tmp_path / HIDDEN), flags=0)
    assert os.listdir(tmp_path) == [HIDDEN] and len(svc.hidden) == 0
    (tmp_path / "g").write_bytes(b"x")
    call(svc, "rename", old=w(tmp_path / "g"), new=w(tmp_path / ".fuse_hiddenXYZ"), flags=0, hide=True)
    assert ".fuse_hiddenXYZ" in os.listdir(tmp_path) and len(svc.hidden) == 0


def test_hidden_name_shape():
    assert agent.hidden_name("/a/b/" + HIDDEN)
    assert not agent.hidden_name("/a/.fuse_hidden0000")
    assert not agent.hidden_name("/a/.fuse_hidden000000120000000g")
    assert is_hidden_name(b"/x/" + HIDDEN.encode())


# -- ownership and modes ---------------------------------------------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")


@needs_root
def test_new_files_belong_to_the_host_process_that_made_them(tmp_path):
    svc = LocalFileService()
    ctx = [2000, 2001]
    fh = call(svc, "create", path=w(tmp_path / "f"), mode=0o2642, flags=os.O_WRONLY, ctx=ctx)[0]["fh"]
    call(svc, "release", fh=fh)
    call(svc, "mkdir", path=w(tmp_path / "d"), mode=0o751, ctx=ctx)
    call(svc, "mknod", path=w(tmp_path / "p"), mode=stat.S_IFIFO | 0o640, dev=0, ctx=ctx)
    call(svc, "symlink", path=w(tmp_path / "l"), target="f", ctx=ctx)
    for name, mode in (("f", 0o2642), ("d", 0o751), ("p", 0o640)):
        st = os.lstat(tmp_path / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (2000, 2001, mode), name
    assert os.lstat(tmp_path / "l").st_uid == 2000


@needs_root
def test_a_set_group_id_directory_gives_its_group(tmp_path):
    svc = LocalFileService()
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chown(parent, 0, 3000)
    os.chmod(parent, 0o2775)
    call(svc, "release", fh=call(svc, "create", path=w(parent / "f"), mode=0o644, flags=os.O_WRONLY,
                                 ctx=[2000, 2001])[0]["fh"])
    call(svc, "mkdir", path=w(parent / "d"), mode=0o755, ctx=[2000, 2001])
    assert (os.stat(parent / "f").st_uid, os.stat(parent / "f").st_gid) == (2000, 3000)
    st = os.stat(parent / "d")
    assert (st.st_uid, st.st_gid) == (2000, 3000) and st.st_mode & stat.S_ISGID


def test_created_mode_is_the_hosts_not_our_umask(tmp_path):
    svc = LocalFileService()
    old = os.umask(0o077)
    try:
        fh = call(svc, "create", path=w(tmp_path / "f"), mode=0o642, flags=os.O_WRONLY)[0]["fh"]
        call(svc, "mkdir", path=w(tmp_path / "d"), mode=0o755)
    finally:
        os.umask(old)
    call(svc, "release", fh=fh)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o642
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755


# -- paths longer than PATH_MAX once made absolute ------------------------------------------
def test_long_absolute_paths_work_where_the_programs_relative_path_did(tmp_path):
    svc = LocalFileService()
    deep = os.fsencode(str(tmp_path))
    parts = []
    while len(deep) < 4500:  # built with relative steps, as a program in its cwd would
        parts.append(b"p" * 200)
        deep += b"/" + b"p" * 200
    fd = os.open(os.fsencode(str(tmp_path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            os.mkdir(part, dir_fd=fd)
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    name = P.name_to_wire(deep + b"/file")
    fh = call(svc, "create", path=name, mode=0o644, flags=os.O_WRONLY)[0]["fh"]
    call(svc, "write", b"deep", fh=fh, off=0)
    call(svc, "release", fh=fh)
    assert call(svc, "getattr", path=name)[0]["st"]["st_size"] == 4
    call(svc, "rename", old=name, new=P.name_to_wire(deep + b"/moved"), flags=0)
    assert call(svc, "readdir", path=P.name_to_wire(deep))[1] == b"moved"
    call(svc, "unlink", path=P.name_to_wire(deep + b"/moved"))
    assert svc.request_fds.open_count() == 0  # the ancestors' descriptors were closed
    # A single name over NAME_MAX is still the kernel's ENAMETOOLONG.
    assert errno_of(lambda: call(svc, "mkdir", path=w(tmp_path / ("x" * 256)), mode=0o755)) == errno.ENAMETOOLONG


# -- timestamps, truncate, fallocate, fsync, xattrs -------------------------------------------
def test_nanosecond_times_by_path_and_by_handle(tmp_path):
    svc = LocalFileService()
    (tmp_path / "f").write_bytes(b"")
    call(svc, "utimens", path=w(tmp_path / "f"), ns=[1234567890123456789, 987654321987654321])
    st = os.stat(tmp_path / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1234567890123456789, 987654321987654321)
    fh = call(svc, "open", path=w(tmp_path / "f"), flags=os.O_WRONLY)[0]["fh"]
    call(svc, "utimens", path=w(tmp_path / "f"), fh=fh, ns=[7, (1 << 30) - 2])  # mtime: UTIME_OMIT
    st = os.stat(tmp_path / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (7, 987654321987654321)


def test_truncate_and_fallocate_on_an_open_file(tmp_path):
    svc = LocalFileService()
    (tmp_path / "f").write_bytes(b"x" * 100)
    fh = call(svc, "open", path=w(tmp_path / "f"), flags=os.O_WRONLY)[0]["fh"]
    os.chmod(tmp_path / "f", 0o444)  # the handle still allows it, as ftruncate(2) does
    call(svc, "truncate", path=w(tmp_path / "f"), fh=fh, size=10)
    call(svc, "fallocate", fh=fh, mode=0, off=0, len=8192)
    assert os.stat(tmp_path / "f").st_size == 8192
    call(svc, "fallocate", fh=fh, mode=1, off=0, len=65536)  # FALLOC_FL_KEEP_SIZE
    assert os.stat(tmp_path / "f").st_size == 8192
    call(svc, "fsync", fh=fh, data=True)
    call(svc, "fsync", fh=fh)
    call(svc, "release", fh=fh)


def test_fsync_reaches_the_local_disk_before_it_returns(tmp_path, monkeypatch):
    svc = LocalFileService()
    fh = call(svc, "create", path=w(tmp_path / "f"), mode=0o644, flags=os.O_WRONLY)[0]["fh"]
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(("fsync", fd)))
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(("fdatasync", fd)))
    call(svc, "fsync", fh=fh, data=True)
    call(svc, "fsync", fh=fh)
    fd = svc.handles.get(fh)
    assert synced == [("fdatasync", fd), ("fsync", fd)]


def test_extended_attributes(tmp_path):
    svc = LocalFileService()
    (tmp_path / "f").write_bytes(b"")
    try:
        os.setxattr(tmp_path / "f", "user.probe", b"1")
    except OSError:
        pytest.skip("the local file system has no user xattrs")
    call(svc, "setxattr", b"value\0bin", path=w(tmp_path / "f"), name="user.rr", flags=0)
    assert call(svc, "getxattr", path=w(tmp_path / "f"), name="user.rr")[1] == b"value\0bin"
    assert set(call(svc, "listxattr", path=w(tmp_path / "f"))[1].split(b"\0")) >= {b"user.rr", b"user.probe"}
    assert errno_of(lambda: call(svc, "setxattr", b"v", path=w(tmp_path / "f"), name="user.rr",
                                 flags=os.XATTR_CREATE)) == errno.EEXIST
    call(svc, "removexattr", path=w(tmp_path / "f"), name="user.rr")
    (tmp_path / "bare").write_bytes(b"")
    # "None" comes as an answer naming the names beside it that have no attribute at all
    # (with their ctime): "f" still has user.probe, "bare" has none.
    header = call(svc, "getxattr", path=w(tmp_path / "f"), name="user.rr")[0]
    assert header["none"] == 1
    assert header["bare"] == [[P.name_to_wire(b"bare"), os.lstat(tmp_path / "bare").st_ctime_ns]]


# -- errors keep their errno ----------------------------------------------------------------
def test_ordinary_failures_keep_their_errno_never_eio(tmp_path):
    svc = LocalFileService()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_bytes(b"")
    os.symlink("loop", tmp_path / "loop")
    cases = [
        (errno.ENOENT, "getattr", dict(path=w(tmp_path / "nope"))),
        (errno.EEXIST, "mkdir", dict(path=w(tmp_path / "full"), mode=0o755)),
        (errno.ENOTEMPTY, "rmdir", dict(path=w(tmp_path / "full"))),
        (errno.ENOTEMPTY, "rename", dict(old=w(tmp_path / "empty"), new=w(tmp_path / "full"), flags=0)),
        (errno.EISDIR, "rename", dict(old=w(tmp_path / "file"), new=w(tmp_path / "empty"), flags=0)),
        (errno.ENOTDIR, "rename", dict(old=w(tmp_path / "empty"), new=w(tmp_path / "file"), flags=0)),
        (errno.EINVAL, "rename", dict(old=w(tmp_path / "full"), new=w(tmp_path / "full" / "in"), flags=0)),
        (errno.ELOOP, "open", dict(path=w(tmp_path / "loop"), flags=os.O_RDONLY)),
        (errno.ENAMETOOLONG, "getattr", dict(path=w(tmp_path / ("n" * 256)))),
        (errno.ENOTDIR, "getattr", dict(path=w(tmp_path / "file" / "x"))),
        (errno.EBADF, "read", dict(fh=999, size=1, off=0)),
        (errno.EISDIR, "unlink", dict(path=w(tmp_path / "empty"))),
    ]
    if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
        cases.append((errno.EXDEV, "rename", dict(old=w(tmp_path / "file"), new=w("/dev/shm/rr-exdev"),
                                                  flags=0)))
    for expected, op, args in cases:
        assert errno_of(lambda: call(svc, op, **args)) == expected, (op, args)


# -- link counts under every name ------------------------------------------------------------
def test_link_names_tracks_multiply_linked_files_and_refreshes_the_others():
    names = hardlinks.LinkNames()
    refreshed = []
    names.invalidate = refreshed.append
    st = {"st_dev": 1, "st_ino": 5, "st_nlink": 2, "st_mode": stat.S_IFREG | 0o644}
    names.seen("/a", st)
    names.seen("/b", st)
    names.seen("/dir", {"st_dev": 1, "st_ino": 6, "st_nlink": 3, "st_mode": stat.S_IFDIR | 0o755})
    assert names.others("/a") == ["/b"] and names.others("/dir") == []
    names.refresh(names.others("/a"))
    assert refreshed == ["/b"]
    names.changed("/b")  # a chmod, write, ... through /b: /a's cached attributes must go
    names.changed(None)
    names.changed("/dir")
    assert refreshed == ["/b", "/a"]
    names.moved("/b", "/c")  # renamed: the new name is known, the other name refreshed
    assert names.others("/a") == ["/c"] and refreshed[-1] == "/a"
    names.moved("/c", "/b")
    names.seen("/b", dict(st, st_nlink=1))  # now single: forgotten
    assert names.others("/a") == []
    names.forget("/a")
    assert names.others("/a") == []


def test_service_errors_raise_operror_for_bad_handles():
    with pytest.raises(OpError):
        LocalFileService().handles.get(12345)


def test_the_command_runs_with_the_local_users_ids():
    assert agent.command_user("root", {"uid": 1000, "gid": 1001, "groups": [1001, 27]}) == (1000, 1001, [1001, 27])
    assert agent.command_user("root", {"uid": 1000, "gid": 1001}) == (1000, 1001, [1001])
    assert agent.command_user("root", {"uid": 0, "gid": 0}) is None  # root stays root
    assert agent.command_user("userns", {"uid": 1000, "gid": 1001}) is None  # already mapped
    assert agent.command_user("root", {"uid": "x"}) is None
