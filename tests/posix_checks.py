"""POSIX file-system checks in the spirit of pjdfstest, run in a directory; results as JSON.

Why: the mirror must make a program behave as it does on the local disk.
pjdfstest (FreeBSD's POSIX file-system suite) is not packaged for Debian and
cannot be fetched here, so this program covers the same operations — open and
create modes under a umask, link counts, rename and its errors, unlink and
rmdir, chmod/chown as root and as another user, FIFOs, sockets and device
nodes, truncate, long names near NAME_MAX and PATH_MAX, nanosecond
timestamps, symlinks and ELOOP, files unlinked while open, O_TMPFILE, locks,
fallocate and xattrs — and prints one observable outcome per check.

The test suite runs it twice, on the local disk and through the mirror, and
compares the two outputs (``tests/test_mirror_conformance.py``). Outcomes are
therefore relative (never absolute inode numbers or times): "ok", an errno
name, or a small description of what was observed.

Usage: ``python3 posix_checks.py DIR [OTHER_FS_DIR]`` (stdlib only; as root
some checks switch to uid/gid ``USER``/``GROUP`` like pjdfstest's ``-u``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import sys
from typing import Any, Callable, Dict, List

USER, GROUP = 2000, 2000
NAME_MAX = 255
PATH_MAX = 4096
CHECKS: List[Callable[[str], Any]] = []


def check(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    CHECKS.append(fn)
    return fn


def err(fn: Callable[[], Any]) -> str:
    """Run *fn*: "ok", or the errno name it failed with."""
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"


def mode(path: str) -> str:
    st = os.lstat(path)
    return "%s,%04o" % (kind(st.st_mode), stat.S_IMODE(st.st_mode))


def kind(m: int) -> str:
    for name, test in (("regular", stat.S_ISREG), ("dir", stat.S_ISDIR), ("symlink", stat.S_ISLNK),
                       ("fifo", stat.S_ISFIFO), ("socket", stat.S_ISSOCK), ("char", stat.S_ISCHR),
                       ("block", stat.S_ISBLK)):
        if test(m):
            return name
    return "?"


def owner(path: str) -> str:
    st = os.lstat(path)
    return "%d:%d" % (st.st_uid, st.st_gid)


def as_user(fn: Callable[[], Any], uid: int = USER, gid: int = GROUP) -> Any:
    """Run *fn* in a child switched to *uid*/*gid* (root only); return what it returned."""
    if os.geteuid() != 0:
        return "not-root"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
            out = fn()
        except OSError as exc:
            out = "setuid:" + errno.errorcode.get(exc.errno, str(exc.errno))
        except BaseException as exc:  # report, never hang the parent
            out = "exception:%s" % type(exc).__name__
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data.decode()) if data else "no-answer"


def create(path: str, m: int = 0o644, data: bytes = b"") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, m)
    os.write(fd, data)
    os.close(fd)


def with_umask(mask: int, fn: Callable[[], Any]) -> Any:
    old = os.umask(mask)
    try:
        return fn()
    finally:
        os.umask(old)


# -- open / create -------------------------------------------------------------
@check
def open_create_modes(d: str) -> Any:
    out = {}
    for mask in (0o022, 0o077, 0o000):
        for m in (0o642, 0o755, 0o600, 0o4755, 0o2755, 0o1644):
            p = "%s/f%o-%o" % (d, mask, m)
            with_umask(mask, lambda: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, m)))
            out["%03o/%04o" % (mask, m)] = mode(p)
    return out


@check
def open_errors(d: str) -> Any:
    create(d + "/file")
    os.mkdir(d + "/dir")
    os.symlink("file", d + "/link")
    os.symlink("loop2", d + "/loop1")
    os.symlink("loop1", d + "/loop2")
    return {
        "excl-existing": err(lambda: os.open(d + "/file", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)),
        "missing": err(lambda: os.open(d + "/nope", os.O_RDONLY)),
        "missing-dir": err(lambda: os.open(d + "/nope/x", os.O_CREAT | os.O_WRONLY, 0o644)),
        "file-as-dir": err(lambda: os.open(d + "/file/x", os.O_RDONLY)),
        "o-directory-on-file": err(lambda: os.open(d + "/file", os.O_RDONLY | os.O_DIRECTORY)),
        "dir-for-writing": err(lambda: os.open(d + "/dir", os.O_WRONLY)),
        "nofollow-symlink": err(lambda: os.open(d + "/link", os.O_RDONLY | os.O_NOFOLLOW)),
        "loop": err(lambda: os.open(d + "/loop1", os.O_RDONLY)),
        "excl-on-symlink": err(lambda: os.open(d + "/link", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)),
    }


@check
def open_trunc_append(d: str) -> Any:
    create(d + "/f", data=b"0123456789")
    fd = os.open(d + "/f", os.O_WRONLY | os.O_TRUNC)
    size_after_trunc = os.fstat(fd).st_size
    os.close(fd)
    fd = os.open(d + "/f", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"ab")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"cd")
    os.close(fd)
    with open(d + "/f", "rb") as fh:
        return [size_after_trunc, fh.read().decode()]


# -- names near NAME_MAX / PATH_MAX ---------------------------------------------
@check
def name_max(d: str) -> Any:
    ok = d + "/" + "x" * NAME_MAX
    return {"255": err(lambda: create(ok)), "256": err(lambda: create(d + "/" + "y" * (NAME_MAX + 1))),
            "stat-255": err(lambda: os.stat(ok)), "unlink-255": err(lambda: os.unlink(ok)),
            "mkdir-256": err(lambda: os.mkdir(d + "/" + "z" * (NAME_MAX + 1)))}


@check
def path_max(d: str) -> Any:
    """A relative path of PATH_MAX - 1 bytes works; one of PATH_MAX does not (as on any Linux)."""
    part = "p" * 200
    path = d
    while len(path) + 1 + len(part) < PATH_MAX - 60:
        path = path + "/" + part
        os.mkdir(path)
    tail = "f" * (PATH_MAX - 1 - len(path) - 1)
    full = path + "/" + tail
    out = {"len": len(full), "create": err(lambda: create(full)), "stat": err(lambda: os.stat(full))}
    out["rename"] = err(lambda: os.rename(full, path + "/g"))
    out["too-long"] = err(lambda: create(full + "x"))
    out["symlink-target"] = err(lambda: os.symlink("t" * (PATH_MAX - 1), d + "/longlink"))
    out["readlink-len"] = len(os.readlink(d + "/longlink")) if out["symlink-target"] == "ok" else None
    out["chdir-deep"] = err(lambda: os.stat(path + "/g"))
    return out


# -- links and inode numbers ---------------------------------------------------------
@check
def hard_links(d: str) -> Any:
    create(d + "/a", data=b"data")
    out = {"link": err(lambda: os.link(d + "/a", d + "/b"))}
    out["nlink-a"] = os.stat(d + "/a").st_nlink
    out["nlink-b"] = os.stat(d + "/b").st_nlink
    out["same-ino"] = os.stat(d + "/a").st_ino == os.stat(d + "/b").st_ino
    os.link(d + "/b", d + "/c")
    out["nlink-3"] = [os.stat(d + "/" + n).st_nlink for n in "abc"]
    os.unlink(d + "/b")
    out["after-unlink"] = [os.stat(d + "/" + n).st_nlink for n in "ac"]
    out["exists"] = err(lambda: os.link(d + "/a", d + "/c"))
    out["dir"] = err(lambda: os.link(d, d + "/dirlink"))
    out["missing"] = err(lambda: os.link(d + "/nope", d + "/x"))
    fd = os.open(d + "/a", os.O_RDONLY)
    os.unlink(d + "/c")
    out["fstat-nlink"] = os.fstat(fd).st_nlink
    os.close(fd)
    return out


@check
def hard_link_changes(d: str) -> Any:
    """A change made under one name shows under the file's other names at once (pjdfstest link/00.t)."""
    create(d + "/a", data=b"0123")
    os.link(d + "/a", d + "/b")
    os.stat(d + "/a")  # both names' attributes are now cached, if anything caches them
    os.stat(d + "/b")
    out = {}
    os.chmod(d + "/b", 0o201)
    out["chmod"] = [mode(d + "/a"), os.lstat(d + "/a").st_nlink]
    if os.geteuid() == 0:
        done = err(lambda: os.chown(d + "/b", 65534, 65533))
        out["chown"] = owner(d + "/a") if done == "ok" else done
        os.chown(d + "/b", os.geteuid(), os.getegid())
    os.chmod(d + "/a", 0o644)
    with open(d + "/b", "ab") as fh:
        fh.write(b"4567")
    out["size"] = os.stat(d + "/a").st_size
    with open(d + "/a", "rb") as fh:
        out["data"] = fh.read().decode()
    os.truncate(d + "/b", 2)
    out["truncated"] = os.stat(d + "/a").st_size
    os.utime(d + "/b", ns=(11, 22))
    out["times"] = [os.stat(d + "/a").st_atime_ns, os.stat(d + "/a").st_mtime_ns]
    return out


@check
def parent_times(d: str) -> Any:
    """Creating, renaming and removing entries updates the directory's mtime (seen at once)."""
    out = {}
    for what, fn in (("create", lambda: create(d + "/f")), ("rename", lambda: os.rename(d + "/f", d + "/g")),
                     ("unlink", lambda: os.unlink(d + "/g")), ("mkdir", lambda: os.mkdir(d + "/s")),
                     ("rmdir", lambda: os.rmdir(d + "/s"))):
        os.utime(d, ns=(1, 1))
        os.stat(d)
        fn()
        out[what] = os.stat(d).st_mtime_ns != 1
    return out


@check
def ctime_updates(d: str) -> Any:
    """Metadata changes update ctime (pjdfstest checks it after every operation)."""
    import time
    create(d + "/f", data=b"x")
    out = {}
    steps = [("chmod", lambda: os.chmod(d + "/f", 0o600)), ("link", lambda: os.link(d + "/f", d + "/g")),
             ("rename", lambda: os.rename(d + "/g", d + "/h")), ("truncate", lambda: os.truncate(d + "/f", 5)),
             ("write", lambda: os.close(os.open(d + "/f", os.O_WRONLY | os.O_APPEND)) or
              open(d + "/f", "ab").write(b"y")),
             ("utime", lambda: os.utime(d + "/f", ns=(5, 5))),
             ("chown-unchanged", lambda: os.chown(d + "/f", -1, -1)),
             ("unlink-other", lambda: os.unlink(d + "/h"))]
    if os.geteuid() == 0:
        steps.append(("chown", lambda: os.chown(d + "/f", 0, 0)))
    for what, fn in steps:
        before = os.stat(d + "/f").st_ctime_ns
        time.sleep(0.05)  # beyond the kernel's timestamp granularity (a jiffy)
        fn()
        out[what] = os.stat(d + "/f").st_ctime_ns > before
    return out


@check
def dir_link_counts(d: str) -> Any:
    os.mkdir(d + "/p")
    before = os.stat(d + "/p").st_nlink
    os.mkdir(d + "/p/c1")
    os.mkdir(d + "/p/c2")
    grown = os.stat(d + "/p").st_nlink
    os.rmdir(d + "/p/c1")
    out = [before, grown, os.stat(d + "/p").st_nlink, os.stat(d + "/p/c2").st_nlink]
    os.mkdir(d + "/q")
    os.stat(d + "/q")
    os.rename(d + "/p/c2", d + "/q/c2")  # ".." moves: both parents' counts change
    return out + [os.stat(d + "/p").st_nlink, os.stat(d + "/q").st_nlink]


@check
def renamed_file_ctime(d: str) -> Any:
    import time
    create(d + "/f")
    os.mkdir(d + "/sub")
    before = os.stat(d + "/f").st_ctime_ns
    time.sleep(0.05)
    os.rename(d + "/f", d + "/sub/g")
    return os.stat(d + "/sub/g").st_ctime_ns > before


@check
def inode_stable(d: str) -> Any:
    create(d + "/a")
    ino = os.stat(d + "/a").st_ino
    fd = os.open(d + "/a", os.O_RDONLY)
    fino = os.fstat(fd).st_ino
    os.close(fd)
    os.rename(d + "/a", d + "/b")
    listed = {e.name: e.inode() for e in os.scandir(d)}
    return {"fstat": fino == ino, "after-rename": os.stat(d + "/b").st_ino == ino,
            "readdir": listed.get("b") == ino}


# -- rename ------------------------------------------------------------------------
@check
def rename_cases(d: str, other: str = "") -> Any:
    create(d + "/f1", data=b"one")
    create(d + "/f2", data=b"two")
    for n in ("d1", "d2", "full", "full/sub"):
        os.mkdir(d + "/" + n)
    create(d + "/full/x")
    out = {
        "file-over-file": err(lambda: os.rename(d + "/f1", d + "/f2")),
        "dir-over-empty-dir": err(lambda: os.rename(d + "/d1", d + "/d2")),
        "dir-over-nonempty": err(lambda: os.rename(d + "/d2", d + "/full")),
        "dir-over-file": err(lambda: os.rename(d + "/d2", d + "/f2")),
        "file-over-dir": err(lambda: os.rename(d + "/f2", d + "/d2")),
        "dir-into-itself": err(lambda: os.rename(d + "/full", d + "/full/sub/in")),
        "missing": err(lambda: os.rename(d + "/nope", d + "/x")),
        "same": err(lambda: os.rename(d + "/f2", d + "/f2")),
        "dot": err(lambda: os.rename(d + "/full/.", d + "/dot")),
    }
    with open(d + "/f2", "rb") as fh:
        out["content"] = fh.read().decode()
    return out


@check
def rename_exdev(d: str) -> Any:
    other = sys.argv[2] if len(sys.argv) > 2 else ""
    if not other or os.stat(other).st_dev == os.stat(d).st_dev:
        return "no-other-fs"
    create(d + "/f")
    os.mkdir(d + "/sub")
    return {"file": err(lambda: os.rename(d + "/f", os.path.join(other, "rr-exdev-%d" % os.getpid()))),
            "link": err(lambda: os.link(d + "/f", os.path.join(other, "rr-exdev-l-%d" % os.getpid())))}


@check
def rename_open_files(d: str) -> Any:
    """Renaming over a file that is open, and unlinking an open file, leave nothing behind."""
    create(d + "/target", data=b"old")
    create(d + "/new", data=b"new")
    fd = os.open(d + "/target", os.O_RDONLY)
    os.rename(d + "/new", d + "/target")
    old = os.pread(fd, 10, 0)
    st = os.fstat(fd)
    os.close(fd)
    with open(d + "/target", "rb") as fh:
        now = fh.read()
    return {"old-content": old.decode(), "old-nlink": st.st_nlink, "now": now.decode(),
            "listing": sorted(os.listdir(d))}


@check
def unlink_open_file(d: str) -> Any:
    os.mkdir(d + "/sub")
    create(d + "/sub/f", data=b"kept")
    fd = os.open(d + "/sub/f", os.O_RDWR)
    os.unlink(d + "/sub/f")
    out = {"listing": os.listdir(d + "/sub"), "read": os.pread(fd, 10, 0).decode()}
    os.pwrite(fd, b"more", 4)
    st = os.fstat(fd)
    out["fstat"] = [st.st_size, st.st_nlink, stat.S_IMODE(st.st_mode)]
    out["fchmod"] = err(lambda: os.fchmod(fd, 0o600))
    out["mode-after"] = "%04o" % stat.S_IMODE(os.fstat(fd).st_mode)
    out["ftruncate"] = err(lambda: os.ftruncate(fd, 2))
    out["size-after"] = os.fstat(fd).st_size
    out["futimens"] = err(lambda: os.utime(fd, ns=(1000000123, 2000000456)))
    out["mtime-after"] = os.fstat(fd).st_mtime_ns
    out["rmdir-while-open"] = err(lambda: os.rmdir(d + "/sub"))
    os.close(fd)
    return out


# -- unlink / rmdir ----------------------------------------------------------------
@check
def unlink_rmdir_errors(d: str) -> Any:
    os.mkdir(d + "/dir")
    os.mkdir(d + "/full")
    create(d + "/full/x")
    create(d + "/file")
    return {
        "unlink-dir": err(lambda: os.unlink(d + "/dir")),
        "unlink-missing": err(lambda: os.unlink(d + "/nope")),
        "rmdir-file": err(lambda: os.rmdir(d + "/file")),
        "rmdir-nonempty": err(lambda: os.rmdir(d + "/full")),
        "rmdir-dot": err(lambda: os.rmdir(d + "/dir/.")),
        "rmdir-missing": err(lambda: os.rmdir(d + "/nope")),
        "unlink-through-file": err(lambda: os.unlink(d + "/file/x")),
        "rmdir": err(lambda: os.rmdir(d + "/dir")),
    }


# -- permissions and ownership ---------------------------------------------------------
@check
def chmod_cases(d: str) -> Any:
    create(d + "/f")
    os.mkdir(d + "/dir")
    out = {}
    for m in (0o642, 0o4755, 0o2755, 0o1777, 0o0):
        os.chmod(d + "/f", m)
        out["file-%04o" % m] = mode(d + "/f")
    for m in (0o2755, 0o1777, 0o700):
        os.chmod(d + "/dir", m)
        out["dir-%04o" % m] = mode(d + "/dir")
    os.symlink("f", d + "/link")
    os.chmod(d + "/link", 0o640)  # follows the link
    out["through-symlink"] = [mode(d + "/f"), kind(os.lstat(d + "/link").st_mode)]
    return out


@check
def other_user(d: str) -> Any:
    """As root: switch to another uid (like pjdfstest -u) and check what the kernel allows."""
    if os.geteuid() != 0:
        return "not-root"
    os.chmod(d, 0o777)
    create(d + "/roots", 0o644)
    create(d + "/private", 0o600)
    os.mkdir(d + "/closed", 0o755)
    create(d + "/closed/inside")
    os.mkdir(d + "/sticky")
    os.chmod(d + "/sticky", 0o1777)
    create(d + "/sticky/roots", 0o666)
    create(d + "/shared", 0o666)
    os.chmod(d + "/shared", 0o666)
    create(d + "/suid", 0o6777)
    os.chmod(d + "/suid", 0o6777)

    def as_other() -> Dict[str, Any]:
        o = {
            "create": err(lambda: create(d + "/mine", 0o642)),
            "mkdir": err(lambda: os.mkdir(d + "/mydir", 0o751)),
            "mkfifo": err(lambda: os.mkfifo(d + "/myfifo", 0o640)),
            "symlink": err(lambda: os.symlink("x", d + "/mylink")),
            "read-private": err(lambda: os.open(d + "/private", os.O_RDONLY)),
            "write-roots": err(lambda: os.open(d + "/roots", os.O_WRONLY)),
            "create-in-closed": err(lambda: create(d + "/closed/x")),
            "chmod-roots": err(lambda: os.chmod(d + "/roots", 0o666)),
            "chown-roots": err(lambda: os.chown(d + "/roots", USER, GROUP)),
            "chown-mine-to-root": err(lambda: os.chown(d + "/mine", 0, -1)),
            "chown-mine-own-group": err(lambda: os.chown(d + "/mine", -1, GROUP)),
            "chgrp-mine-other-group": err(lambda: os.chown(d + "/mine", -1, 0)),
            "chmod-mine-sgid": err(lambda: os.chmod(d + "/mine", 0o2755)),
            "utime-roots": err(lambda: os.utime(d + "/roots", ns=(1, 1))),
            "utime-now-roots": err(lambda: os.utime(d + "/roots")),
            "utime-now-shared": err(lambda: os.utime(d + "/shared")),
            "utime-set-shared": err(lambda: os.utime(d + "/shared", ns=(1, 1))),
            "unlink-sticky-roots": err(lambda: os.unlink(d + "/sticky/roots")),
            "rename-sticky-roots": err(lambda: os.rename(d + "/sticky/roots", d + "/sticky/mine")),
            "truncate-roots": err(lambda: os.truncate(d + "/roots", 0)),
            "trunc-open-roots": err(lambda: os.open(d + "/roots", os.O_RDONLY | os.O_TRUNC)),
            "unlink-in-closed": err(lambda: os.unlink(d + "/closed/inside")),
            "mkdir-in-closed": err(lambda: os.mkdir(d + "/closed/sub")),
            "rmdir-closed": err(lambda: os.rmdir(d + "/closed")),
            "link-to-roots": err(lambda: os.link(d + "/private", d + "/hardlink")),
            "setxattr-roots": err(lambda: os.setxattr(d + "/roots", "user.x", b"1")),
            "readdir-closed": err(lambda: os.listdir(d + "/closed")),
            "write-suid": err(lambda: os.write(os.open(d + "/suid", os.O_WRONLY), b"x")),
            "access-private": os.access(d + "/private", os.R_OK),
            "access-roots-w": os.access(d + "/roots", os.W_OK),
        }
        o["mine-mode"] = mode(d + "/mine")
        return o

    out = as_user(lambda: with_umask(0o022, as_other))
    if not isinstance(out, dict):
        return out
    for name in ("mine", "mydir", "myfifo", "mylink"):
        out[name + "-owner"] = owner(d + "/" + name) if os.path.lexists(d + "/" + name) else "missing"
    out["mydir-mode"] = mode(d + "/mydir") if os.path.lexists(d + "/mydir") else "missing"
    out["suid-after-write"] = mode(d + "/suid")  # a write by another user drops set-id bits
    return out


@check
def chown_as_root(d: str) -> Any:
    if os.geteuid() != 0:
        return "not-root"
    create(d + "/f", 0o6755)
    os.chmod(d + "/f", 0o6755)
    out = {"chown": err(lambda: os.chown(d + "/f", USER, GROUP)), "owner": owner(d + "/f"),
           "mode-after-chown": mode(d + "/f")}
    os.symlink("f", d + "/link")
    out["lchown"] = err(lambda: os.lchown(d + "/link", 65534, 65534))
    out["link-owner"] = owner(d + "/link")
    out["target-owner"] = owner(d + "/f")
    os.mkdir(d + "/sgid")
    os.chown(d + "/sgid", 0, GROUP)
    os.chmod(d + "/sgid", 0o2775)
    create(d + "/sgid/inherits")
    os.mkdir(d + "/sgid/sub")
    out["sgid-file"] = owner(d + "/sgid/inherits")
    out["sgid-subdir"] = [owner(d + "/sgid/sub"), mode(d + "/sgid/sub")]
    return out


# -- special files -----------------------------------------------------------------
@check
def special_files(d: str) -> Any:
    out = {"mkfifo": err(lambda: os.mkfifo(d + "/fifo", 0o642))}
    out["fifo-mode"] = mode(d + "/fifo")
    out["mkfifo-exists"] = err(lambda: os.mkfifo(d + "/fifo"))
    r = os.open(d + "/fifo", os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(d + "/fifo", os.O_WRONLY | os.O_NONBLOCK)
    os.write(w, b"through")
    out["fifo-data"] = os.read(r, 100).decode()
    os.close(r)
    os.close(w)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    out["bind"] = err(lambda: s.bind(d + "/sock"))
    s.listen(1)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    out["connect"] = err(lambda: c.connect(d + "/sock"))
    out["sock-kind"] = kind(os.lstat(d + "/sock").st_mode)
    c.close()
    s.close()
    if os.geteuid() == 0:
        out["mknod-chr"] = err(lambda: os.mknod(d + "/chr", 0o640 | stat.S_IFCHR, os.makedev(1, 3)))
        out["chr"] = [mode(d + "/chr"), os.major(os.lstat(d + "/chr").st_rdev),
                      os.minor(os.lstat(d + "/chr").st_rdev)] if out["mknod-chr"] == "ok" else None
        out["mknod-blk"] = err(lambda: os.mknod(d + "/blk", 0o600 | stat.S_IFBLK, os.makedev(7, 200)))
        out["mknod-reg"] = err(lambda: os.mknod(d + "/reg", 0o604 | stat.S_IFREG))
        out["reg"] = mode(d + "/reg") if out["mknod-reg"] == "ok" else None
    return out


# -- truncate / fallocate ----------------------------------------------------------
@check
def truncate_cases(d: str) -> Any:
    create(d + "/f", data=b"x" * 100)
    os.mkdir(d + "/dir")
    out = {"grow": err(lambda: os.truncate(d + "/f", 70000)), "size": os.stat(d + "/f").st_size,
           "shrink": err(lambda: os.truncate(d + "/f", 10))}
    out["size2"] = os.stat(d + "/f").st_size
    out["dir"] = err(lambda: os.truncate(d + "/dir", 0))
    out["negative"] = err(lambda: os.truncate(d + "/f", -1))
    fd = os.open(d + "/f", os.O_RDONLY)
    out["ftruncate-rdonly"] = err(lambda: os.ftruncate(fd, 0))
    os.close(fd)
    os.chmod(d + "/f", 0o444)
    fd = os.open(d + "/f", os.O_RDWR) if os.geteuid() == 0 else os.open(d + "/f", os.O_RDONLY)
    os.close(fd)
    os.chmod(d + "/f", 0o644)
    fd = os.open(d + "/f", os.O_WRONLY)
    os.chmod(d + "/f", 0o444)
    out["ftruncate-readonly-mode"] = err(lambda: os.ftruncate(fd, 3))
    out["fallocate"] = err(lambda: os.posix_fallocate(fd, 0, 8192))
    os.close(fd)
    out["size3"] = os.stat(d + "/f").st_size
    return out


# -- times ---------------------------------------------------------------------------
@check
def timestamps(d: str) -> Any:
    create(d + "/f")
    out = {"set-ns": err(lambda: os.utime(d + "/f", ns=(1234567890123456789, 987654321987654321)))}
    st = os.stat(d + "/f")
    out["got"] = [st.st_atime_ns, st.st_mtime_ns]
    os.symlink("f", d + "/link")
    out["lutimes"] = err(lambda: os.utime(d + "/link", ns=(5000000001, 6000000002), follow_symlinks=False))
    out["link-mtime"] = os.lstat(d + "/link").st_mtime_ns
    out["target-mtime-kept"] = os.stat(d + "/f").st_mtime_ns == 987654321987654321
    fd = os.open(d + "/f", os.O_WRONLY)
    out["futimens"] = err(lambda: os.utime(fd, ns=(7, 8)))
    os.close(fd)
    out["futimens-got"] = os.stat(d + "/f").st_mtime_ns
    before = os.stat(d + "/f").st_mtime_ns
    fd = os.open(d + "/f", os.O_WRONLY)
    os.write(fd, b"x")
    os.close(fd)
    out["write-updates-mtime"] = os.stat(d + "/f").st_mtime_ns > before
    for label, ns in (("pre-1970", -123456789012), ("after-2106", (1 << 33) * 10 ** 9 + 7),
                      ("omit-atime", None)):
        if ns is None:
            out[label] = err(lambda: os.utime(d + "/f", ns=(os.stat(d + "/f").st_atime_ns, 42)))
        else:
            out[label] = err(lambda: os.utime(d + "/f", ns=(ns, ns)))
        st = os.stat(d + "/f")
        out[label + "-got"] = [st.st_atime_ns, st.st_mtime_ns]
    return out


# -- symlinks -----------------------------------------------------------------------
@check
def symlinks(d: str) -> Any:
    create(d + "/f", data=b"target")
    out = {"symlink": err(lambda: os.symlink("f", d + "/l")), "readlink": os.readlink(d + "/l"),
           "kind": kind(os.lstat(d + "/l").st_mode), "size": os.lstat(d + "/l").st_size,
           "exists": err(lambda: os.symlink("g", d + "/l")),
           "readlink-file": err(lambda: os.readlink(d + "/f")),
           "dangling": err(lambda: os.stat(os.path.join(d, "dangling")) if os.symlink(
               "nowhere", d + "/dangling") is None else None),
           "self-loop": err(lambda: os.symlink("self", d + "/self") or os.stat(d + "/self")),
           "mode": "%04o" % stat.S_IMODE(os.lstat(d + "/l").st_mode)}
    chain = "f"
    for i in range(45):
        os.symlink(chain, "%s/c%d" % (d, i))
        chain = "c%d" % i
    out["chain-40"] = err(lambda: os.stat("%s/c39" % d))
    out["chain-45"] = err(lambda: os.stat("%s/c44" % d))
    return out


# -- O_TMPFILE, locks, xattrs, fsync ----------------------------------------------------
@check
def o_tmpfile(d: str) -> Any:
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag:
        return "no-o_tmpfile"
    try:
        fd = os.open(d, flag | os.O_RDWR, 0o600)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    os.write(fd, b"anonymous")
    out = {"listing": os.listdir(d), "nlink": os.fstat(fd).st_nlink}
    out["linkat"] = err(lambda: os.link("/proc/self/fd/%d" % fd, d + "/named", follow_symlinks=True))
    os.close(fd)
    if out["linkat"] == "ok":
        with open(d + "/named", "rb") as fh:
            out["named"] = fh.read().decode()
    return out


@check
def locks(d: str) -> Any:
    create(d + "/f", data=b"x" * 10)
    fd = os.open(d + "/f", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    fcntl.lockf(fd, fcntl.LOCK_EX, 5, 0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        fd2 = os.open(d + "/f", os.O_RDWR)
        res = [err(lambda: fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)),
               err(lambda: fcntl.lockf(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 0)),
               err(lambda: fcntl.lockf(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 5))]
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    res = json.loads(os.read(r, 1000).decode())
    os.waitpid(pid, 0)
    os.close(r)
    os.close(fd)
    return res


@check
def xattrs(d: str) -> Any:
    create(d + "/f")
    out = {"set": err(lambda: os.setxattr(d + "/f", "user.rr", b"value"))}
    if out["set"] != "ok":
        return out
    out["get"] = os.getxattr(d + "/f", "user.rr").decode()
    out["list"] = sorted(n for n in os.listxattr(d + "/f") if n.startswith("user."))
    out["missing"] = err(lambda: os.getxattr(d + "/f", "user.none"))
    out["create-existing"] = err(lambda: os.setxattr(d + "/f", "user.rr", b"v", os.XATTR_CREATE))
    out["replace-missing"] = err(lambda: os.setxattr(d + "/f", "user.no", b"v", os.XATTR_REPLACE))
    out["remove"] = err(lambda: os.removexattr(d + "/f", "user.rr"))
    out["after"] = sorted(n for n in os.listxattr(d + "/f") if n.startswith("user."))
    return out


@check
def fsync_and_data(d: str) -> Any:
    fd = os.open(d + "/f", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"abc" * 1000)
    out = [err(lambda: os.fsync(fd)), err(lambda: os.fdatasync(fd))]
    os.pwrite(fd, b"Z", 70000)
    out.append(os.fstat(fd).st_size)
    os.close(fd)
    with open(d + "/f", "rb") as fh:
        data = fh.read()
    out.append([data[:3].decode(), data[2999:3001].hex(), data[-1:].decode()])
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    out.append(err(lambda: os.fsync(dfd)))
    os.close(dfd)
    return out


@check
def readdir_listing(d: str) -> Any:
    for name in ("b", "a", "c"):
        create(d + "/" + name)
    os.mkdir(d + "/sub")
    entries = sorted((e.name, e.is_dir(), e.is_file()) for e in os.scandir(d))
    return entries


def main(argv: List[str]) -> int:
    base = argv[1]
    os.umask(0o022)
    results: Dict[str, Any] = {}
    for fn in CHECKS:
        d = os.path.join(base, fn.__name__)
        os.mkdir(d, 0o755)
        os.chmod(d, 0o755)
        cwd = os.getcwd()
        os.chdir(base)  # relative paths, as pjdfstest uses them
        try:
            results[fn.__name__] = fn(fn.__name__)
        except OSError as exc:
            results[fn.__name__] = "raised " + errno.errorcode.get(exc.errno, str(exc.errno))
        except Exception as exc:
            results[fn.__name__] = "raised %s: %s" % (type(exc).__name__, exc)
        finally:
            os.chdir(cwd)
    json.dump(results, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
