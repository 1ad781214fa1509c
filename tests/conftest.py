"""Shared fixtures: throwaway lab hosts for integration tests.

``lab`` brings up (at least) three lab hosts once per test session and tears
down only what this session created, so a lab that a developer already had up
survives the run. Lab tests skip with a clear reason only where network
namespaces cannot be created (not root); under ``CI=true`` they must run, and
``.ci/run`` fails when any of them was skipped.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

LAB_HOSTS = 3


@pytest.fixture(scope="session", autouse=True)
def own_cache_home(tmp_path_factory):
    """Give the whole session a cache directory of its own (``$XDG_CACHE_HOME``).

    The local hash cache, the hosts' manifests of ``localhost`` trees and the
    mirror's caches live there: a test run must neither read what the
    developer's own runs left (a result then depends on their history) nor
    change it. Programs the tests start inherit it.
    """
    with pytest.MonkeyPatch.context() as patch:  # (put back as it was at the session's end)
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def no_standby():
    """Run every command the tests start in its own process: no standby is started or used
    (``$REMOTE_RUNNER_STANDBY=0``) unless a test asks for one (tests/test_standby.py), so no
    process outlives the test that started it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REMOTE_RUNNER_STANDBY", "0")
        yield


def _lab_possible() -> str:
    """Return why the lab cannot run here, or '' when it can."""
    if os.geteuid() != 0:
        return "lab hosts need root (network and mount namespaces)"
    return ""


@pytest.fixture(scope="session")
def lab():
    """A running lab with at least ``LAB_HOSTS`` hosts (h1..hN)."""
    reason = _lab_possible()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"lab tests cannot be skipped in CI: {reason}")
        pytest.skip(reason)
    from remote_runner.lab import Lab

    the_lab = Lab()
    was_up = the_lab.running_hosts()
    the_lab.up(LAB_HOSTS)
    yield the_lab
    if not was_up:
        the_lab.down()


#: A lab host with a Debian release root of its own (built once with debootstrap),
#: for proving that nothing depends on the host being a copy of this machine.
FOREIGN_HOST, FOREIGN_RELEASE = "h9", "bullseye"


@pytest.fixture(scope="session")
def foreign_host(lab) -> str:
    """Name of a running lab host whose root is Debian 11, not an overlay of the local root."""
    lab.up(LAB_HOSTS, {FOREIGN_HOST: FOREIGN_RELEASE})
    return FOREIGN_HOST


#: A lab host of a newer release than this machine (Debian 13: libfuse 3.17, Python 3.13).
NEWER_HOST, NEWER_RELEASE = "h8", "trixie"


@pytest.fixture(scope="session")
def newer_host(lab) -> str:
    """Name of a running lab host whose root is Debian 13, built with debootstrap like h9's."""
    lab.up(LAB_HOSTS, {NEWER_HOST: NEWER_RELEASE})
    return NEWER_HOST


@pytest.fixture
def screen_name() -> str:
    """A screen session name unique to one test (never a prefix of another)."""
    return f"rrt-{uuid.uuid4().hex[:10]}"


def ssh(lab, host: str, command: str, check: bool = True, user: str = "") -> subprocess.CompletedProcess:
    """Run *command* on a lab host with the system OpenSSH client (an independent witness)."""
    target = f"{user}@{host}" if user else host
    return subprocess.run(
        ["ssh", "-F", lab.ssh_config, "-o", "BatchMode=yes", target, command],
        capture_output=True, text=True, check=check, timeout=120,
    )


def quit_screen(lab, host: str, name: str, *paths: str, user: str = "") -> None:
    """Stop every process of the sessions called *name* on *host*, quit them, remove *paths*."""
    from remote_runner.screen import quit_sessions_script
    remove = f"rm -rf {' '.join(paths)}\n" if paths else ""
    ssh(lab, host, quit_sessions_script(name, 0) + remove, check=False, user=user)


def experiment(directory, *components: dict) -> str:
    """Write a config declaring *components* (field -> value; ``start_index`` 0 unless given)
    as ``experiment.py`` in *directory*; return its path."""
    lines = []
    for fields in components:
        lines.append("c = Component()")
        lines += [f"c.{key} = {value!r}" for key, value in {"start_index": 0, **fields}.items()]
        lines.append("config.add_component(c)")
    path = os.path.join(str(directory), "experiment.py")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a skipped test that needs lab hosts is a failure."""
    outcome = yield
    report = outcome.get_result()
    if (os.environ.get("CI") == "true" and report.skipped
            and ("lab" in getattr(item, "fixturenames", ()) or item.get_closest_marker("lab"))):
        report.outcome = "failed"
        report.longrepr = f"lab test skipped under CI=true: {report.longrepr}"


@pytest.fixture
def public_tmp():
    """A temporary directory every local user can reach (pytest's own tmp_path is 0700).

    The mirror keeps whole-file copies on hosts only of files reachable by every
    local user, so tests of that cache need a world-searchable path.
    """
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="rr-public-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def conn(lab):
    """Connect to lab hosts by name (``conn("h2")``); every connection is closed afterwards."""
    from remote_runner.ssh import Connection, SSHOptions
    opened = []

    def connect(host):
        opened.append(Connection(host, SSHOptions(ssh_config_file=lab.ssh_config)).connect())
        return opened[-1]

    yield connect
    for c in opened:
        c.close()
