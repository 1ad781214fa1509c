"""--retries and --max-fail: unreachable hosts retried with backoff, skipped within the limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from remote_runner import screen as scr
from remote_runner.errors import (EXIT_CONNECT, EXIT_PARTIAL, AuthError, ConfigError,
                                  UnreachableError)
from remote_runner.failpolicy import FailLimit, backoff, with_retries
from remote_runner.lab.netns import unused_address
from tests.conftest import quit_screen, ssh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "remote_runner.py")
UP = ("h1", "h2", "h3", "h4", "h9")
#: Addresses in the lab's network where no host answers, even with every lab host up.
DOWN = tuple(f"root@{unused_address(n)}" for n in (1, 2, 3))


@pytest.mark.parametrize("text, hosts, allowed", [
    ("0", 20, 0), ("5", 20, 5), ("10%", 20, 2), ("10%", 15, 1), ("100%", 7, 7), ("2.5%", 200, 5),
])
def test_fail_limit_counts_and_shares(text, hosts, allowed):
    assert FailLimit.parse(text).allowed(hosts) == allowed


@pytest.mark.parametrize("text", ["", "-1", "five", "150%", "1.5"])
def test_bad_fail_limits_are_usage_errors(text):
    with pytest.raises(ConfigError, match="--max-fail"):
        FailLimit.parse(text)


def test_backoff_doubles_with_jitter_and_is_capped():
    assert [backoff(n, rand=lambda: 1.0) for n in (1, 2, 3, 10)] == [0.5, 1.0, 2.0, 8.0]
    assert backoff(1, rand=lambda: 0.0) == 0.25


def test_retries_only_what_can_pass():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise UnreachableError("h", "no answer")
        return "connected"

    assert with_retries(flaky, 2, sleep=sleeps.append) == "connected"
    assert len(calls) == 3 and len(sleeps) == 2

    down = []

    def dead():
        down.append(1)
        raise UnreachableError("h", "down")

    with pytest.raises(UnreachableError):
        with_retries(dead, 1, sleep=sleeps.append)
    assert len(down) == 2

    denied = []

    def auth():
        denied.append(1)
        raise AuthError("h", "denied")

    with pytest.raises(AuthError):
        with_retries(auth, 5, sleep=sleeps.append)
    assert denied == [1]  # never retried: it cannot pass and may lock the account


def _spec(name, host, index, wait=False):
    from types import SimpleNamespace
    return SimpleNamespace(name=name, host=host, start_index=index, wait=wait,
                           is_local=host == "localhost")


def test_a_wave_that_loses_every_component_stops_the_run_later_waves_need_it():
    from remote_runner.failpolicy import lost_prerequisites
    specs = [_spec("server", "srv", 1), _spec("c1", "n1", 2), _spec("c2", "n2", 2),
             _spec("local", "localhost", 3)]
    assert lost_prerequisites(specs, {}, set()) == []
    assert lost_prerequisites(specs, {}, {"n1"}) == []  # an interchangeable client
    (reason,) = lost_prerequisites(specs, {}, {"n1", "n2"})  # the local wave 3 comes after
    assert reason.startswith("start_index 2 loses every component (c1 on n1, c2 on n2)")
    assert lost_prerequisites(specs[:3], {}, {"n1", "n2"}) == []  # nothing after the last wave
    (reason,) = lost_prerequisites(specs, {}, {"srv"})
    assert reason.startswith("start_index 1 loses every component (server on srv)")
    assert "start_index 2 and later" in reason
    # An alias of the skipped login is skipped with it.
    specs.append(_spec("monitor", "srv-alias", 1))
    assert lost_prerequisites(specs, {"srv-alias": "srv"}, {"srv"})
    assert lost_prerequisites(specs, {}, {"srv"}) == []  # the monitor still starts wave 1


def test_losing_every_waited_component_stops_the_run():
    from remote_runner.failpolicy import lost_prerequisites
    specs = [_spec("driver", "d", 1, wait=True), _spec("w1", "n1", 1), _spec("w2", "n2", 1)]
    (reason,) = lost_prerequisites(specs, {}, {"d"})
    assert "every component the run waits for is unreachable (driver on d)" in reason
    specs.append(_spec("driver2", "n1", 1, wait=True))
    assert lost_prerequisites(specs, {}, {"d"}) == []


# --------------------------------------------------------------------------- lab

def _config(tmp_path, screen_name):
    hosts = list(UP) + list(DOWN)
    path = tmp_path / "exp.py"
    path.write_text(textwrap.dedent(f"""
        for i, h in enumerate({hosts!r}):
            c = Component(name="probe%d" % i, host=h, executable="/bin/sh",
                          args=["-c", "echo ran > /tmp/{screen_name}-ran"], start_index=1,
                          wait=True)
            config.add_component(c)
    """))
    return str(path)


def _run(lab, config, screen_name, *extra, ssh_config=None):
    env = {k: v for k, v in os.environ.items() if k != "REMOTE_RUNNER_PASSWORD"}
    return subprocess.run(
        [sys.executable, SCRIPT, "-c", config, "-F", ssh_config or lab.ssh_config,
         "--screen", screen_name,
         "--remote-done-dir", f"/tmp/{screen_name}-state", "--connect-timeout", "3",
         "--retries", "1", "-f", "16", *extra],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def _ran_on(lab, screen_name):
    return [h for h in UP
            if ssh(lab, h, f"test -e /tmp/{screen_name}-ran", check=False).returncode == 0]


def test_three_hosts_down_skipped_within_max_fail_else_nothing_starts(lab, foreign_host, screen_name,
                                                                      tmp_path):
    config = _config(tmp_path, screen_name)
    try:
        # Default: all or nothing, as SPAR did.
        out = _run(lab, config, screen_name)
        assert out.returncode == EXIT_CONNECT, out.stderr
        assert "could not connect to 3 host(s)" in out.stderr
        assert "retry 1 of 1" in out.stderr  # each unreachable host was tried again
        assert _ran_on(lab, screen_name) == []
        for host in UP:
            sessions = ssh(lab, host, "screen -ls", check=False).stdout
            assert scr.parse_sessions(sessions, screen_name) == []
        # A limit below the number of dead hosts: still nothing starts.
        out = _run(lab, config, screen_name, "--max-fail", "2")
        assert out.returncode == EXIT_CONNECT, out.stderr
        assert _ran_on(lab, screen_name) == []
        # Within the limit: the five live hosts run, the three dead ones are reported.
        out = _run(lab, config, screen_name, "--max-fail", "5", "--json")
        assert out.returncode == EXIT_PARTIAL, out.stderr
        assert _ran_on(lab, screen_name) == list(UP)
        result = json.loads(out.stdout)
        assert result["result"] == "partial" and result["exit_code"] == EXIT_PARTIAL
        skipped = sorted(c["host"] for c in result["components"] if c["outcome"] == "skipped")
        assert skipped == sorted(DOWN)
        exited = sorted(c["host"] for c in result["components"] if c["outcome"] == "exited")
        assert exited == sorted(UP)
        assert "partial run: 3 unreachable host(s) skipped (within --max-fail 5)" in out.stderr
        # The same in text form, with a share instead of a count.
        out = _run(lab, config, screen_name, "--max-fail", "40%")
        assert out.returncode == EXIT_PARTIAL, out.stderr
        assert "result: PARTIAL (exit 8)" in out.stdout
        assert "unreachable: " in out.stdout and "3 component(s) skipped" in out.stdout
    finally:
        for host in UP:
            quit_screen(lab, host, screen_name, f"/tmp/{screen_name}-state",
                        f"/tmp/{screen_name}-ran")


def test_skipping_never_leaves_a_run_without_its_first_wave_or_its_end(lab, screen_name,
                                                                        tmp_path):
    """A dead server (start_index 1) or a dead waited driver stops the run within the limit;
    two aliases of one dead login are one unreachable host, both their components skipped."""
    dead = unused_address(4)
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(open(lab.ssh_config).read() + f"\nHost deadA deadB\n    HostName {dead}\n"
                          "    User root\n    ConnectTimeout 3\n")
    marker = f"/tmp/{screen_name}-ran"

    def config(name, components):
        path = tmp_path / name
        path.write_text("".join(
            f"config.add_component(Component(name={n!r}, host={h!r}, executable='/bin/sh', "
            f"args=['-c', 'echo ran > {marker}'], start_index={i}, wait={w!r}))\n"
            for n, h, i, w in components))
        return str(path)

    try:
        server_down = config("server.py", [("server", "deadA", 1, False),
                                           ("c1", "h1", 2, True), ("c2", "h2", 2, True)])
        out = _run(lab, server_down, screen_name, "--max-fail", "5", ssh_config=str(ssh_config))
        assert out.returncode == EXIT_CONNECT, out.stderr
        assert "the rest of the run depends on them, so nothing was started" in out.stderr
        assert "start_index 1 loses every component (server on deadA)" in out.stderr
        assert _ran_on(lab, screen_name) == []

        driver_down = config("driver.py", [("driver", "deadB", 1, True), ("w1", "h1", 1, False)])
        out = _run(lab, driver_down, screen_name, "--max-fail", "1", ssh_config=str(ssh_config))
        assert out.returncode == EXIT_CONNECT, out.stderr
        assert "every component the run waits for is unreachable (driver on deadB)" in out.stderr
        assert _ran_on(lab, screen_name) == []

        aliases = config("aliases.py", [("a", "deadA", 1, True), ("b", "deadB", 1, True),
                                        ("c1", "h1", 1, True), ("c2", "h2", 2, True)])
        out = _run(lab, aliases, screen_name, "--max-fail", "1", "--json",
                   ssh_config=str(ssh_config))
        assert out.returncode == EXIT_PARTIAL, out.stderr
        result = json.loads(out.stdout)
        outcome = {c["name"]: c["outcome"] for c in result["components"]}
        assert outcome == {"a": "skipped", "b": "skipped", "c1": "exited", "c2": "exited"}
        rows = {h["host"]: h["connected"] for h in result["hosts"]}
        assert rows == {"deadA": False, "h1": True, "h2": True}  # one login, one row
        assert "partial run: 1 unreachable host(s) skipped (within --max-fail 1)" in out.stderr
        assert _ran_on(lab, screen_name) == ["h1", "h2"]
    finally:
        for host in ("h1", "h2"):
            quit_screen(lab, host, screen_name, f"/tmp/{screen_name}-state", marker)
