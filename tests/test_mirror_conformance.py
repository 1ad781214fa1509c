"""Conformance of the mirror with the local disk: POSIX checks and CPython's own file tests.

A program must behave through the mirror as it does locally. Two standards:

* ``tests/posix_checks.py`` (what pjdfstest covers; pjdfstest itself is not
  packaged for Debian) runs on the local disk and through the mirror — the
  agent on this machine (libfuse 3 and 2), a lab host as root, the same host
  as the non-root ``rrtest`` and the Debian 11 host — and every difference
  must be on the README's documented list for that case;
* CPython's test suite for files (``python3 -m test``, Debian's
  libpython3.11-testsuite) runs locally and through the mirror on a lab host,
  and every test case that passes locally must pass through the mirror.
  ``RR_CPYTHON_TESTS=full`` runs the whole list of the issue instead of the
  quicker subset.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest

from remote_runner.mirror.bundle import build_bundle
from remote_runner.mirror.session import MirrorOptions, PipeStream, run_command

HERE = Path(__file__).resolve().parent
CHECKS = HERE / "posix_checks.py"
README = HERE.parent / "README.md"
#: A file system other than the test directory's on this machine and on every host (EXDEV).
OTHER_FS = "/dev/shm"
TIMEOUT = 900

CPYTHON_QUICK = ["test_tempfile", "test_shutil", "test_posix", "test_glob", "test_stat", "test_fileinput"]
CPYTHON_FULL = CPYTHON_QUICK + ["test_os", "test_pathlib", "test_zipfile", "test_tarfile"]

needs_root_fuse = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                     reason="the mirror on this machine needs root and /dev/fuse")


# -- the documented list --------------------------------------------------------------------
def documented(contexts: Set[str]) -> Set[str]:
    """Check keys the README accepts as differing where any of *contexts* applies.

    The table follows the line "Differences from the local disk": first cell
    the keys (``check`` or ``check/field``, in backquotes), second where.
    """
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Differences from the local disk"))
    keys: Set[str] = set()
    for line in lines[start + 1:]:
        if line.startswith("#") or (keys and not line.startswith("|")):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1] in contexts:
            keys.update(re.findall(r"`([^`]+)`", cells[0]))
    return keys


def differences(local: Dict[str, Any], mirror: Dict[str, Any]) -> List[str]:
    """Keys (``check`` or ``check/field``) whose outcomes differ."""
    out = []
    for name in sorted(set(local) | set(mirror)):
        a, b = local.get(name), mirror.get(name)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += ["%s/%s" % (name, k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            out.append(name)
    return out


def assert_conforms(local: Dict[str, Any], mirror: Dict[str, Any], contexts: Set[str]) -> None:
    allowed = documented(contexts | {"every host"})
    unexplained = [k for k in differences(local, mirror) if k not in allowed and k.split("/")[0] not in allowed]
    detail = {k: (local.get(k.split("/")[0]), mirror.get(k.split("/")[0])) for k in unexplained}
    assert not unexplained, "differences from the local disk not documented in the README:\n" + \
        json.dumps(detail, indent=1, sort_keys=True)


def test_the_documented_list_is_read_and_differences_are_named():
    assert "o_tmpfile" in documented({"every host"})
    assert "special_files/mknod-chr" in documented({"non-root host user"})
    assert "special_files/mknod-chr" not in documented({"every host"})
    assert differences({"a": {"x": 1, "y": 2}, "b": "ok", "c": 1}, {"a": {"x": 1, "y": 3}, "b": "EIO", "c": 1}) \
        == ["a/y", "b"]
    with pytest.raises(AssertionError):
        assert_conforms({"a": {"x": 1}}, {"a": {"x": 2}}, set())


# -- running the checks ------------------------------------------------------------------------
def local_checks(tmp_path: Path) -> Dict[str, Any]:
    where = tmp_path / "local"
    where.mkdir()
    proc = subprocess.run([sys.executable, str(CHECKS), str(where), OTHER_FS], capture_output=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def checks_dir(tmp_path: Path) -> Path:
    where = tmp_path / "mirror"
    where.mkdir()
    where.chmod(0o755)
    tmp_path.chmod(0o755)
    return where


@pytest.fixture(scope="module")
def agent_pyz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("agent") / build_bundle().filename
    path.write_bytes(build_bundle().data)
    return path


def run_here(agent_pyz: Path, tmp_path: Path, argv: List[str]) -> bytes:
    """Run *argv* through a mirror whose agent runs on this machine; return its stdout."""
    stream = PipeStream([sys.executable, str(agent_pyz), "exec"])
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err, \
            open(os.devnull, "rb") as devnull:
        try:
            result = run_command(None, argv, cwd=str(tmp_path), options=MirrorOptions(), stream=stream,
                                 stdin_fd=devnull.fileno(), stdout_fd=out.fileno(), stderr_fd=err.fileno())
        finally:
            if stream.proc.poll() is None:
                stream.proc.kill()
            stream.proc.wait()
    assert result.status == 0, (tmp_path / "err").read_text(errors="replace") + result.message
    return (tmp_path / "out").read_bytes()


def run_on_host(lab, host: str, argv: List[str], cwd: Path, user: str = "") -> bytes:
    """Run *argv* through the mirror on a lab host with ``remote-runner exec``; return its stdout."""
    target = f"{user}@{host}" if user else host
    proc = subprocess.run([sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config, target, *argv],
                          cwd=str(cwd), capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


@needs_root_fuse
@pytest.mark.parametrize("library", ["libfuse3.so.3", "libfuse.so.2"])
def test_posix_checks_through_a_mirror_on_this_machine(agent_pyz, tmp_path, monkeypatch, library):
    import ctypes
    try:
        ctypes.CDLL(library)
    except OSError:
        pytest.skip(f"{library} is not installed here")
    monkeypatch.setenv("FUSE_LIBRARY_PATH", library)
    local = local_checks(tmp_path)
    where = checks_dir(tmp_path)
    mirror = json.loads(run_here(agent_pyz, tmp_path, [sys.executable, str(CHECKS), str(where), OTHER_FS]))
    assert_conforms(local, mirror, {"libfuse 2 host"} if library == "libfuse.so.2" else set())


@pytest.mark.lab
@pytest.mark.parametrize("user", ["", "rrtest"])
def test_posix_checks_through_the_mirror_on_a_lab_host(lab, tmp_path, user):
    local = local_checks(tmp_path)
    where = checks_dir(tmp_path)
    mirror = json.loads(run_on_host(lab, "h1", [sys.executable, str(CHECKS), str(where), OTHER_FS], tmp_path,
                                    user=user))
    assert_conforms(local, mirror, {"non-root host user"} if user else set())


@pytest.mark.lab
@pytest.mark.parametrize("release", ["11", "13"])
def test_posix_checks_through_the_mirror_on_another_debian_release(lab, request, tmp_path, release):
    foreign_host = request.getfixturevalue("foreign_host" if release == "11" else "newer_host")
    local = local_checks(tmp_path)
    where = checks_dir(tmp_path)
    mirror = json.loads(run_on_host(lab, foreign_host, [sys.executable, str(CHECKS), str(where), OTHER_FS],
                                    tmp_path))
    assert_conforms(local, mirror, set())


# -- CPython's own tests ---------------------------------------------------------------------------
def test_outcomes(junit: Path) -> Dict[str, str]:
    """Per test case (class and name): "pass", "skipped", "failure" or "error"."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "pass"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
        out["%s.%s" % (case.get("classname"), case.get("name"))] = outcome
    return out


test_outcomes.__test__ = False  # a helper, not a test


def cpython_argv(junit: Path) -> List[str]:
    names = CPYTHON_FULL if os.environ.get("RR_CPYTHON_TESTS") == "full" else CPYTHON_QUICK
    return ["/usr/bin/python3", "-m", "test", "--junit-xml", str(junit), *names]


@pytest.mark.lab
def test_cpython_file_tests_pass_through_the_mirror_where_they_pass_locally(lab, tmp_path):
    probe = subprocess.run(["/usr/bin/python3", "-c", "import test.support, test.test_tempfile"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.fail("CPython's test suite is missing: apt-get install libpython3.11-testsuite "
                    "(scripts/setup.sh installs it)")
    (tmp_path / "local").mkdir()
    (tmp_path / "mirror").mkdir()
    local_xml, mirror_xml = tmp_path / "local.xml", tmp_path / "mirror.xml"
    subprocess.run(cpython_argv(local_xml), cwd=str(tmp_path / "local"), capture_output=True, timeout=TIMEOUT)
    run_on_host_status = subprocess.run(
        [sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config, "h2", *cpython_argv(mirror_xml)],
        cwd=str(tmp_path / "mirror"), capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert mirror_xml.exists(), run_on_host_status.stderr.decode(errors="replace")[-3000:]
    local, mirror = test_outcomes(local_xml), test_outcomes(mirror_xml)
    assert len(local) > 500  # the suite really ran
    worse = {case: (outcome, mirror.get(case)) for case, outcome in local.items()
             if outcome == "pass" and mirror.get(case) != "pass"}
    assert not worse, "passes locally, not through the mirror: %s\n%s" % (
        json.dumps(worse, indent=1, sort_keys=True),
        run_on_host_status.stdout.decode(errors="replace")[-3000:])


# -- whose permissions -----------------------------------------------------------------------------
@needs_root_fuse
def test_a_local_user_other_than_root_runs_as_itself_on_a_root_host(agent_pyz, tmp_path, monkeypatch):
    """Connected as root, the command still gets the local user's ids: the host's kernel then
    allows and refuses what this machine's kernel would for that user."""
    import remote_runner.mirror.session as session_module
    monkeypatch.setattr(session_module.os, "getuid", lambda: 2000)
    monkeypatch.setattr(session_module.os, "getgid", lambda: 2000)
    monkeypatch.setattr(session_module.os, "getgroups", lambda: [2000, 2001])
    tmp_path.chmod(0o755)
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "closed").mkdir(mode=0o755)
    (tmp_path / "private").write_text("secret")
    (tmp_path / "private").chmod(0o600)
    (tmp_path / "group").write_text("shared")
    os.chown(tmp_path / "group", 0, 2001)
    (tmp_path / "group").chmod(0o640)
    code = ("import os, json\n"
            "def e(f):\n"
            "    try:\n        f(); return 'ok'\n"
            "    except OSError as x:\n        return x.errno\n"
            "r = {'ids': [os.getuid(), os.getgid(), sorted(os.getgroups())]}\n"
            "r['mine'] = e(lambda: open('open/mine', 'w').close())\n"
            "r['closed'] = e(lambda: open('closed/x', 'w').close())\n"
            "r['private'] = e(lambda: open('private').read())\n"
            "r['group'] = e(lambda: open('group').read())\n"
            "print(json.dumps(r))\n")
    out = json.loads(run_here(agent_pyz, tmp_path, ["/usr/bin/python3", "-c", code]))
    assert out == {"ids": [2000, 2000, [2000, 2001]], "mine": "ok", "closed": errno.EACCES,
                   "private": errno.EACCES, "group": "ok"}
    st = (tmp_path / "open" / "mine").stat()
    assert (st.st_uid, st.st_gid) == (2000, 2000)
    assert not (tmp_path / "closed" / "x").exists()
