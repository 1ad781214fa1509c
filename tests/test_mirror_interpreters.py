"""An interpreter's start-up names and directories, sent with the interpreter.

Unit tests: what :func:`interpreters.startup_files` derives from a CPython
layout built here, the directories the program's reply answers whole, and
the host keeping them. The lab test runs ``python3`` for the first time on a
host and checks that its path configuration and ``site`` asked nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remote_runner.mirror import interpreters, listing
from remote_runner.mirror.host.answers import absorb_listings
from remote_runner.mirror.host.names import NameCache
from remote_runner.mirror.replies import Reply
from remote_runner.mirror.service import LocalFileService
from tests.conftest import ssh
from tests.test_mirror_cache import HOST, rpc_lines, settle
from tests.test_mirror_lab import rr_exec, workdir  # noqa: F401 (fixtures)


_SERVICES: list = []


@pytest.fixture(autouse=True)
def _close_services():
    """A service used outside a request keeps the descriptors it walked with and its watches
    until it is closed (a session closes its own)."""
    yield
    while _SERVICES:
        service = _SERVICES.pop()
        service.request_fds.release()
        service.close()


def _closing(service: LocalFileService) -> LocalFileService:
    _SERVICES.append(service)
    return service


def _layout(root: Path) -> Path:
    """A CPython 3.9 installed under *root*/prefix, with a site directory holding a ``.pth``."""
    prefix = root / "prefix"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python3.9").write_bytes(b"\x7fELF not really")
    (prefix / "bin" / "python3").symlink_to("python3.9")
    stdlib = prefix / "lib" / "python3.9"
    (stdlib / "lib-dynload").mkdir(parents=True)
    (stdlib / "os.py").write_text("")
    site = stdlib / "site-packages"
    site.mkdir()
    (site / "extra.pth").write_text("/somewhere\n")
    (site / "pkg").mkdir()
    for directory in (stdlib, stdlib / "encodings"):
        (directory / "__pycache__").mkdir(parents=True)
        for name in ("abc", "__init__", "zoo"):
            (directory / "__pycache__" / f"{name}.cpython-39.pyc").write_bytes(b"x" * 100)
        (directory / "__pycache__" / "abc.cpython-312.pyc").write_bytes(b"another interpreter")
    return prefix


def test_a_cpython_start_is_derived_from_the_executables_real_path(tmp_path, monkeypatch):
    prefix = _layout(tmp_path)
    stdlib, site = f"{prefix}/lib/python3.9", f"{prefix}/lib/python3.9/site-packages"
    found = interpreters.startup_files(str(prefix / "bin" / "python3"), {"HOME": "/home/u"})
    for name in (f"{prefix}/bin/python3._pth", f"{prefix}/bin/pybuilddir.txt", f"{prefix}/bin/pyvenv.cfg",
                 f"{prefix}/pyvenv.cfg",
                 f"{prefix}/lib/python39.zip", f"{stdlib}/os.py", f"{stdlib}/sitecustomize.py",
                 "/home/u/.local/lib/python3.9/site-packages", f"{site}/extra.pth",
                 f"{prefix}/local/lib/python3.9/dist-packages", f"{prefix}/lib/python3/dist-packages"):
        assert name in found, name
    # directories to answer whole end in "/": the library, its extensions, a site directory that exists
    listed = [p for p in found if p.endswith("/")]
    assert listed == [f"{stdlib}/", f"{stdlib}/lib-dynload/", f"{stdlib}/__pycache__/", f"{stdlib}/encodings/",
                      f"{site}/"]
    # the library's bytecode for this interpreter, __init__ first, within the budget
    assert [p for p in found if p.endswith(".pyc")] == [
        f"{stdlib}/__pycache__/{n}.cpython-39.pyc" for n in ("__init__", "abc", "zoo")] + [
        f"{stdlib}/encodings/__pycache__/{n}.cpython-39.pyc" for n in ("__init__", "abc", "zoo")]
    assert interpreters.bytecode(stdlib, "39")[:1] == [f"{stdlib}/__pycache__/__init__.cpython-39.pyc"]
    monkeypatch.setattr(interpreters, "BYTECODE_BYTES", 250)
    assert len(interpreters.bytecode(stdlib, "39")) == 2
    assert f"{site}/pkg" not in found  # only .pth files are read there at start
    # not an interpreter: nothing; a relative HOME is not followed
    assert interpreters.startup_files(str(prefix / "lib" / "python3.9" / "os.py"), {}) == []
    assert not [p for p in interpreters.startup_files(str(prefix / "bin" / "python3"), {"HOME": "rel"})
                if p.startswith("rel")]


def test_a_programs_reply_answers_the_listed_directories_whole(public_tmp, monkeypatch):
    lib = public_tmp / "libx.so"
    lib.write_bytes(b"\x7fELF" + b"x" * 100)
    settle(lib)
    small, big = public_tmp / "small", public_tmp / "big"
    small.mkdir()
    big.mkdir()
    (small / "a.py").write_text("")
    for i in range(20):
        (big / f"m{i:02d}.py").write_text("")
    (public_tmp / "link").symlink_to("small")
    service = _closing(LocalFileService())
    body = service._libraries(str(lib), [str(lib), f"{small}/", f"{public_tmp}/link/", f"{public_tmp}/none/"])
    # a link leads to a directory already answered (once), a missing one is a negative answer
    assert [d[0] for d in body["dirs"]] == [str(small)]
    assert body["dirs"][0][1]["n"] == ["a.py"] and body["dirs"][0][2] in (0, 1)
    assert str(public_tmp / "link") in body["names"] and str(public_tmp / "none") in body["names"]
    # the listings' budget bounds what they add to the reply
    monkeypatch.setattr(listing, "LIBS_LISTING_BYTES", 200)
    body = _closing(LocalFileService())._libraries(str(lib), [str(lib), f"{big}/", f"{small}/"])
    assert [d[0] for d in body["dirs"]] == [str(small)]


def test_an_interpreters_bytecode_is_sent_as_siblings_are(public_tmp):
    """Sent with the interpreter, a compiled module joins the profile only if the host says
    the program opened it: like a sibling, unlike a library."""
    lib = public_tmp / "libx.so"
    lib.write_bytes(b"\x7fELF" + b"x" * 100)
    pyc = public_tmp / "__pycache__" / "m.cpython-39.pyc"
    pyc.parent.mkdir()
    pyc.parent.chmod(0o755)
    pyc.write_bytes(b"bytecode")
    for path in (lib, pyc):
        settle(path)
    service = _closing(LocalFileService())
    service._closures[str(lib)] = [str(lib), str(pyc)]
    reply = Reply({})
    service._add_libraries(reply, str(lib))
    assert [n for n, _ in reply.fields["libs"]["whole"]] == [str(lib), str(pyc)]
    assert list(service.sent_whole) == [str(lib)] and str(pyc) in service.listed_siblings


def test_the_host_keeps_the_directories_a_reply_answered_whole():
    cache = NameCache()
    row = {"st_mode": 0o100644, "st_size": 3, "st_ino": 7, "st_nlink": 1, "st_uid": 0, "st_gid": 0,
           "st_mtime_ns": 1, "st_ctime_ns": 1, "st_atime_ns": 1, "st_dev": 1, "st_blocks": 0,
           "st_blksize": 4096, "st_rdev": 0}
    from remote_runner.mirror import protocol as P
    answer = {"n": ["a.py"], "a": [[row.get(f, 0) for f in P.STAT_FIELDS]], "l": [None]}
    absorb_listings(cache, [["/lib/py", answer, 1], ["relative", answer, 1], ["/bad", "nope", 1], "x"],
                    cache.begin())
    assert [name for name, _ in cache.names("/lib/py")] == ["a.py"]
    assert cache.get("/lib/py/missing.py") is not None and cache.get("/lib/py/missing.py").get("missing")
    assert cache.names("/bad") is None
    absorb_listings(cache, None, None)  # nothing to keep


@pytest.mark.lab
def test_a_first_python_run_asks_nothing_for_its_path_configuration_and_site(lab, workdir, tmp_path):
    python = os.path.realpath("/usr/bin/python3")
    expected = interpreters.startup_files(python, os.environ) if os.path.exists(python) else []
    if not expected:
        pytest.skip("no CPython at /usr/bin/python3 here")
    stdlib = os.path.dirname(next(p for p in expected if p.endswith("/os.py")))
    ssh(lab, HOST, "rm -rf ~/.cache/remote-runner/files ~/.cache/remote-runner/files.profiles")
    proc = rr_exec(lab, HOST, ["/usr/bin/python3", "-c", "import ssl, sys; print(len(sys.path) > 1)"], workdir,
                   "--debug-rpc", "-l", "INFO", env={"XDG_CACHE_HOME": str(tmp_path / "fresh-profiles")})
    assert proc.returncode == 0 and proc.stdout == b"True\n", proc.stderr.decode()
    asked = rpc_lines(proc.stderr, "getattr") + rpc_lines(proc.stderr, "readdir")
    # (and OpenSSL's configuration, which _ssl's libcrypto reads: see elf.openssl_files)
    bindir = os.path.dirname(python)
    for name in ("pyvenv.cfg'", "._pth'", "pybuilddir.txt'", f"{bindir}/Modules'", f"{bindir}/lib'", ".zip'",
                 f"{stdlib}/os.py'",
                 f"{stdlib}/lib-dynload'", "dist-packages'", "site-packages'", "openssl.cnf'", "/ssl'"):
        assert not [line for line in asked if name in line], (name, asked)
    # the library's bytecode and the encodings package were there before they were opened
    opened = [line for line in rpc_lines(proc.stderr, "open") if "'ahead'" not in line
              and (f"{stdlib}/__pycache__/" in line or f"{stdlib}/encodings/" in line)]
    assert not opened and not [line for line in asked if f"{stdlib}/encodings/" in line], opened
