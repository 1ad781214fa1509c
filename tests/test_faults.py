"""Faults a run must survive without losing anything, on lab hosts.

Each test provokes one fault a user meets (a full disk on a host, ...) through
the real command line and judges the run by its exit status, its messages and
what the system OpenSSH client finds on the host afterwards.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import quit_screen, ssh
from tests.test_classic_cli import base_args, cli, write_config


@pytest.fixture
def env(lab, screen_name, tmp_path):
    """A unique screen name, state dir and a 64 KiB tmpfs as base_dir on h2."""
    state = f"/tmp/{screen_name}-state"
    full = f"/tmp/{screen_name}-full"
    ssh(lab, "h2", f"mkdir -p {full} && mount -t tmpfs -o size=64k tmpfs {full} && "
                   f"printf old > {full}/payload")
    yield {"screen": screen_name, "state": state, "tmp": tmp_path, "full": full}
    quit_screen(lab, "h2", screen_name, state)
    ssh(lab, "h2", f"umount {full}; rmdir {full}", check=False)


def test_a_full_disk_fails_the_run_names_the_cause_and_starts_nothing(lab, env):
    tmp = env["tmp"]
    (tmp / "payload").write_bytes(os.urandom(1 << 20))
    config = write_config(tmp, f"""
        c = Component()
        c.name = 'consumer'
        c.host = 'h2'
        c.executable = '/bin/sleep'
        c.args = ['600']
        c.files = {{'payload': 'payload'}}
        c.base_dir = {env["full"]!r}
        c.start_index = 1
        config.add_component(c)
    """)
    result = cli("-c", config, *base_args(lab, env))
    assert result.returncode == 4, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, result.stderr
    assert "h2" in errors[0] and f"{env['full']}/payload" in errors[0]
    assert "No space left on device" in errors[0]
    assert "Traceback" not in result.stderr
    assert ssh(lab, "h2", f"cat {env['full']}/payload").stdout == "old"
    assert ssh(lab, "h2", f"ls -A {env['full']}").stdout == "payload\n"
    assert env["screen"] not in ssh(lab, "h2", "screen -ls", check=False).stdout


def _sessions(lab, host, name):
    from remote_runner import screen as scr
    return scr.parse_sessions(ssh(lab, host, "screen -ls", check=False).stdout, name)


def test_a_run_that_cannot_copy_leaves_the_last_good_experiment_running(lab, env):
    tmp = env["tmp"]
    body = """
        for h in ('h1', 'h2'):
            c = Component()
            c.name = 'worker'
            c.host = h
            c.executable = '/bin/sleep'
            c.args = ['600']
            c.start_index = 1
            {extra}
            config.add_component(c)
    """
    good = write_config(tmp, body.format(extra="pass"), "good.py")
    assert cli("-c", good, *base_args(lab, env)).returncode == 0
    before = {h: _sessions(lab, h, env["screen"]) for h in ("h1", "h2")}
    assert all(len(ids) == 1 for ids in before.values())
    (tmp / "payload").write_bytes(os.urandom(1 << 20))
    extra = (f"if h == 'h2': c.files = {{'payload': 'payload'}}; c.base_dir = {env['full']!r}")
    bad = write_config(tmp, body.format(extra=extra), "bad.py")
    result = cli("-c", bad, *base_args(lab, env))
    assert result.returncode == 4 and "No space left on device" in result.stderr
    after = {h: _sessions(lab, h, env["screen"]) for h in ("h1", "h2")}
    assert after == before  # neither host's session was replaced
    quit_screen(lab, "h1", env["screen"], env["state"])
