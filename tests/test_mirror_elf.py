"""Predicting a program's libraries from its ELF files, and listing them with the program's open.

The unit tests compare :func:`elf.closure` with what the real loader does
(``ldd``, and programs built here with their own libraries, RPATH, RUNPATH
and $ORIGIN); the lab test shows a first run fetching a local-only program's
library ahead, without the loader's lookup or open reaching the link.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from remote_runner.mirror import elf
from remote_runner.mirror.agent import FileCache, NameCache, fetch_ahead
from remote_runner.mirror.service import LocalFileService, _walk
from tests.conftest import ssh
from tests.test_mirror_cache import HOST, host_copies, rpc_lines, settle, whole_open
from tests.test_mirror_lab import local_only, rr_exec, workdir  # noqa: F401 (fixtures)

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")


def build(directory: Path, rpath: str, new_dtags: bool = False) -> Path:
    """Build ``prog`` -> ``lib/libouter.so`` -> ``lib/libinner.so``, found through *rpath*."""
    lib = directory / "lib"
    lib.mkdir()
    (directory / "inner.c").write_text("int inner(void) { return 41; }\n")
    (directory / "outer.c").write_text("int inner(void);\nint outer(void) { return inner() + 1; }\n")
    (directory / "main.c").write_text(textwrap.dedent("""\
        #include <stdio.h>
        int outer(void);
        int main(void) { printf("%d\\n", outer()); return 0; }
        """))
    run = lambda *argv: subprocess.run(argv, check=True, capture_output=True)  # noqa: E731
    run("gcc", "-shared", "-fPIC", "-o", str(lib / "libinner.so"), str(directory / "inner.c"))
    # libouter has no path of its own: libinner is found through the program's RPATH (or not at all
    # with RUNPATH, which serves only the object that carries it).
    run("gcc", "-shared", "-fPIC", "-o", str(lib / "libouter.so"), str(directory / "outer.c"),
        f"-L{lib}", "-linner")
    tags = "-Wl,--enable-new-dtags" if new_dtags else "-Wl,--disable-new-dtags"
    run("gcc", "-o", str(directory / "prog"), str(directory / "main.c"), f"-L{lib}", "-louter",
        f"-Wl,-rpath-link,{lib}", f"-Wl,-rpath,{rpath}", tags)
    return directory / "prog"


def loader_view(program: Path) -> set:
    """The real paths ``ldd`` (the real loader) says *program* loads; a failed lookup is 'not found'."""
    out = subprocess.run(["ldd", str(program)], capture_output=True, text=True).stdout
    seen = set()
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and parts[parts.index("=>") + 1].startswith("/"):
            seen.add(os.path.realpath(parts[parts.index("=>") + 1]))
        elif parts and parts[0].startswith("/"):
            seen.add(os.path.realpath(parts[0]))
        elif "not found" in line:
            seen.add("not found: " + parts[0])
    return seen


@pytest.mark.skipif(shutil.which("ldd") is None, reason="no ldd here")
@pytest.mark.parametrize("program", ["/bin/ls", sys.executable, shutil.which("ffmpeg") or "/bin/sh"])
def test_closure_matches_the_loader(program):
    predicted = {os.path.realpath(p) for p in elf.closure(program)}
    assert predicted and predicted == loader_view(Path(program))


@pytest.mark.skipif(shutil.which("ldd") is None, reason="no ldd here")
def test_a_shared_object_opened_with_dlopen_lists_its_own_libraries():
    """An extension module: what it needs, as ldd shows it (the loader itself aside)."""
    import glob
    dynload = os.path.join(os.path.dirname(os.__file__), "lib-dynload")
    found = glob.glob(os.path.join(dynload, "_ssl*.so")) or glob.glob(os.path.join(dynload, "*.so"))
    if not found:
        pytest.skip("no extension module with libraries here")
    module = found[0]
    interp = {os.path.realpath(elf.read_dynamic("/bin/ls").interp)}
    predicted = {os.path.realpath(p) for p in elf.closure(module)} - interp
    expected = loader_view(Path(module)) - interp
    assert predicted and predicted == expected
    assert elf.read_dynamic(module).interp is None


@needs_gcc
def test_rpath_origin_and_an_rpath_inherited_by_a_library(tmp_path):
    program = build(tmp_path, "$ORIGIN/lib")
    assert {os.path.realpath(p) for p in elf.closure(str(program))} == loader_view(program)
    paths = elf.closure(str(program))
    assert str(tmp_path / "lib" / "libouter.so") in paths and str(tmp_path / "lib" / "libinner.so") in paths
    assert paths.index(str(tmp_path / "lib" / "libouter.so")) < paths.index(str(tmp_path / "lib" / "libinner.so"))
    assert subprocess.run([str(program)], capture_output=True, text=True).stdout == "42\n"


@needs_gcc
def test_runpath_serves_only_its_own_object(tmp_path):
    program = build(tmp_path, str(tmp_path / "lib"), new_dtags=True)
    paths = elf.closure(str(program))
    assert str(tmp_path / "lib" / "libouter.so") in paths
    assert str(tmp_path / "lib" / "libinner.so") not in paths  # the loader cannot find it either
    assert "not found: libinner.so" in loader_view(program)


@needs_gcc
def test_not_a_dynamic_program(tmp_path):
    (tmp_path / "text").write_text("#!/bin/sh\necho hi\n")
    (tmp_path / "short").write_bytes(Path("/bin/ls").read_bytes()[:40])
    (tmp_path / "s.c").write_text("int main(void) { return 0; }\n")
    static = subprocess.run(["gcc", "-static", "-o", str(tmp_path / "static"), str(tmp_path / "s.c")],
                            capture_output=True)
    assert elf.closure(str(tmp_path / "text")) == []
    assert elf.closure(str(tmp_path / "short")) == []
    assert elf.closure(str(tmp_path / "missing")) == []
    if static.returncode == 0:  # libc.a installed
        assert elf.read_dynamic(str(tmp_path / "static")) is not None
        assert elf.closure(str(tmp_path / "static")) == []


def test_walk_follows_symlinks_as_the_kernel_does(tmp_path):
    base = os.path.realpath(tmp_path)
    real = Path(base) / "real"
    real.mkdir()
    (real / "lib.so.1.2").write_text("x")
    (real / "lib.so.1").symlink_to("lib.so.1.2")  # relative
    (Path(base) / "alias").symlink_to(str(real))  # absolute: the walk starts again at /
    walked = [os.fsdecode(p) for p in _walk(os.fsencode(f"{base}/alias/./lib.so.1"))]
    assert walked == (_prefixes(base) + [f"{base}/alias"] + _prefixes(base)
                      + [f"{base}/real", f"{base}/real/lib.so.1", f"{base}/real/lib.so.1.2"])
    assert _walk(b"/usr/../usr/../usr") == [b"/usr", b"/usr", b"/usr"]  # ".." of a top directory is /
    # a missing name ends the walk there
    assert [os.fsdecode(p) for p in _walk(os.fsencode(f"{base}/real/../nothing/x"))][-1] == f"{base}/nothing"


def _prefixes(path: str) -> list:
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]


@needs_gcc
def test_a_programs_open_lists_its_libraries_once(public_tmp):
    program = build(public_tmp, "$ORIGIN/lib")
    for path in (program, public_tmp / "lib" / "libouter.so", public_tmp / "lib" / "libinner.so"):
        settle(path)
    service = LocalFileService()
    fields, data = whole_open(service, program)
    assert data.startswith(elf.MAGIC) and fields["whole"]
    libs = fields["libs"]
    whole = dict((name, meta) for name, meta in libs["whole"])
    outer = str(public_tmp / "lib" / "libouter.so")
    st = os.stat(outer)
    assert whole[outer] == [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    assert str(public_tmp / "lib" / "libinner.so") in whole
    answers = dict(zip(libs["names"], libs["answers"]))
    assert answers[outer][0]["st_ino"] == st.st_ino and answers[outer][1] is None
    assert answers[str(public_tmp / "lib")][0]["st_mode"] == os.stat(public_tmp / "lib").st_mode
    assert outer in service.sent_whole and outer in service.looked_up  # kept in the profile
    assert "libs" not in whole_open(service, program)[0]  # once per session
    assert "libs" not in whole_open(LocalFileService(roots=[os.fsencode(str(public_tmp))]), program)[0]
    assert "libs" not in whole_open(LocalFileService(), public_tmp / "lib" / "libouter.so")[0]  # no PT_INTERP


class GatedLink:
    """A stand-in for the agent's link: answered by a local service, once *gate* is open."""

    def __init__(self, gate: threading.Event) -> None:
        self.service = LocalFileService()
        self.gate = gate

    def call_many(self, op, many, timeout=None):
        assert self.gate.wait(30)
        return [self._one(op, args) for args in many]

    def call_each(self, op, many, timeout=None):
        yield from self.call_many(op, many, timeout)

    def _one(self, op, args):
        reply = self.service.handle(op, args, b"")
        return reply.fields, reply.payload

    def call(self, op, args, payload=b"", timeout=None):
        return self._one(op, args)


def test_an_open_waits_for_a_file_being_fetched_ahead(public_tmp):
    lib = public_tmp / "lib.so"
    lib.write_bytes(os.urandom(3000))
    settle(lib)
    st = lib.stat()
    meta = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    files, cache, gate = FileCache(str(public_tmp / "files"), limit=1 << 20), NameCache(), threading.Event()
    fetch_ahead(GatedLink(gate), files, cache, {"names": [str(lib)], "answers": [[{"st_size": 3000}, None]],
                                                "whole": [[str(lib), meta]]})
    assert cache.get(str(lib)) == {"st_size": 3000}  # the answers are kept at once
    threading.Timer(0.2, gate.set).start()  # the data is still on its way
    files.wait_for(str(lib), 30)  # what an open of it does first
    assert files.lookup(str(lib)) == meta


@needs_gcc
@pytest.mark.lab
def test_first_run_fetches_a_programs_libraries_ahead(lab, local_only, workdir, tmp_path):
    """Never run before anywhere: the library still comes with the program, not by the loader's asking."""
    program = build(local_only, "$ORIGIN/lib")
    libs = [local_only / "lib" / "libouter.so", local_only / "lib" / "libinner.so"]
    for path in [program, *libs]:
        settle(path)
    ssh(lab, HOST, "rm -rf ~/.cache/remote-runner/files ~/.cache/remote-runner/files.profiles")
    proc = rr_exec(lab, HOST, [str(program)], workdir, "--debug-rpc", "-l", "INFO",
                   env={"XDG_CACHE_HOME": str(tmp_path / "fresh-profiles")})
    assert proc.returncode == 0 and proc.stdout == b"42\n", proc.stderr.decode()
    for lib in libs:
        # fetched by the agent (O_RDONLY|O_NONBLOCK), never looked up or opened by the loader itself
        opens = [line for line in rpc_lines(proc.stderr, "open") if str(lib) in line]
        assert opens and all(f"'flags': {os.O_RDONLY | os.O_NONBLOCK}," in line for line in opens), opens
        assert not [line for line in rpc_lines(proc.stderr, "getattr") if f"'{lib}'" in line]
        assert len(host_copies(lab, lib)) == 1


def test_glibc_locale_names_are_normalized_as_glibc_does():
    assert elf.normalized_locale("C.UTF-8") == "C.utf8"
    assert elf.normalized_locale("en_US.UTF-8@euro") == "en_US.utf8@euro"
    assert elf.normalized_locale("de_DE.8859-1") == "de_DE.iso88591"
    assert elf.normalized_locale("C") == "C"


def test_what_the_c_library_reads_at_start_follows_the_environment(tmp_path, monkeypatch):
    """The locale's directory and category files, the alias files, the converters' cache beside
    libc and the zone file, for the names the environment gives; nothing without a libc."""
    locales = tmp_path / "locale"
    (locales / "xx_YY.utf8" / "LC_MESSAGES").mkdir(parents=True)
    (locales / "xx_YY.utf8" / "LC_CTYPE").write_bytes(b"ctype")
    (locales / "xx_YY.utf8" / "LC_MESSAGES" / "SYS_LC_MESSAGES").write_bytes(b"messages")
    monkeypatch.setattr(elf, "LOCALE_DIR", str(locales))
    libs = ["/opt/x/lib/libm.so.6", "/opt/x/lib/libc.so.6"]
    assert elf.libc_files(["/opt/x/lib/libm.so.6"], {"LANG": "xx_YY.UTF-8"}) == []
    found = elf.libc_files(libs, {"LANG": "xx_YY.UTF-8"})
    assert found == ["/etc/localtime", f"{locales}/locale-archive", *elf.LOCALE_ALIASES,
                     f"{locales}/xx_YY.UTF-8", f"{locales}/xx_YY.utf8",
                     f"{locales}/xx_YY.utf8/LC_CTYPE", f"{locales}/xx_YY.utf8/LC_MESSAGES/SYS_LC_MESSAGES",
                     "/opt/x/lib/gconv/gconv-modules.cache"]
    # LC_ALL and the others name more locales; C and POSIX need no file; TZ names the zone
    assert elf.libc_files(libs, {"LANG": "C", "TZ": ":Europe/Paris"}) == ["/usr/share/zoneinfo/Europe/Paris"]
    assert elf.libc_files(libs, {"LC_ALL": "POSIX", "TZ": "/srv/zone"}) == ["/srv/zone"]
    both = elf.libc_files(libs, {"LC_ALL": "xx_YY.utf8", "LC_TIME": "zz_ZZ", "TZ": ""})
    assert f"{locales}/zz_ZZ" in both and both.count(f"{locales}/xx_YY.utf8") == 1
    assert not any("zoneinfo" in p or "localtime" in p for p in both)


def test_openssls_configuration_is_the_one_its_library_names(tmp_path):
    crypto = tmp_path / "libcrypto.so.3"
    crypto.write_bytes(b"\x7fELF" + b"\0" * 1000 + b'OPENSSLDIR: "/opt/tls"\0more' + b"\0" * 100)
    libs = ["/lib/libc.so.6", str(crypto)]
    assert elf.openssl_files(libs, {}) == ["/opt/tls/openssl.cnf"]
    assert elf.openssl_files(libs, {"OPENSSL_CONF": "/srv/my.cnf"}) == ["/srv/my.cnf"]
    assert elf.openssl_files(libs, {"OPENSSL_CONF": "relative.cnf"}) == []
    assert elf.openssl_files(["/lib/libc.so.6"], {}) == []  # not linked with OpenSSL
    other = tmp_path / "libcrypto.so.1.1"
    other.write_bytes(b"\x7fELF no directory named here")
    assert elf.openssl_files([str(other)], {}) == []


@needs_gcc
@pytest.mark.lab
def test_a_first_run_has_its_locale_and_time_zone_files_with_its_libraries(lab, local_only, workdir,
                                                                            tmp_path):
    """glibc's setlocale and tzset read files in directories no lookup has listed yet: on a
    first run they come with the program's libraries, not one round trip each."""
    if not os.path.isdir("/usr/lib/locale/C.utf8"):
        pytest.skip("no C.utf8 locale directory here")
    source = local_only / "loc.c"
    source.write_text(textwrap.dedent("""\
        #include <locale.h>
        #include <stdio.h>
        #include <time.h>
        int main(void) {
            const char *name = setlocale(LC_ALL, "");
            tzset();
            printf("%s\\n", name ? name : "none");
            return 0;
        }
        """))
    program = local_only / "loc"
    subprocess.run(["gcc", "-o", str(program), str(source)], check=True, capture_output=True)
    settle(program)
    ssh(lab, HOST, "rm -rf ~/.cache/remote-runner/files ~/.cache/remote-runner/files.profiles")
    env = {"XDG_CACHE_HOME": str(tmp_path / "fresh-profiles"), "LANG": "C.UTF-8", "LC_ALL": ""}
    env.pop("TZ", None)
    proc = rr_exec(lab, HOST, [str(program)], workdir, "--debug-rpc", "-l", "INFO", env=env)
    assert proc.returncode == 0 and proc.stdout == b"C.UTF-8\n", proc.stderr.decode()
    asked = rpc_lines(proc.stderr, "getattr") + rpc_lines(proc.stderr, "open") + rpc_lines(proc.stderr, "readdir")
    ctype = [line for line in asked if "/usr/lib/locale/C.utf8/LC_CTYPE'" in line]
    assert ctype and all(f"'flags': {os.O_RDONLY | os.O_NONBLOCK}," in line for line in ctype), ctype
    for name in ("/usr/lib/locale'", "/usr/lib/locale/C.utf8'", "/usr/share/locale/locale.alias'",
                 "/etc/localtime'", "gconv-modules.cache'"):
        assert not [line for line in asked if name in line and "'ahead'" not in line], (name, asked)


@needs_gcc
def test_the_paths_tried_before_a_library_is_found_are_named(tmp_path):
    """A RUNPATH directory lacking a library is looked in first: a negative lookup the host can be told."""
    program = build(tmp_path, str(tmp_path / "lib"), new_dtags=True)
    misses = []
    elf.closure(str(program), misses)
    assert str(tmp_path / "lib" / "libc.so.6") in misses  # tried there, found in the system's
    assert not any(os.path.exists(m) for m in misses)
