"""Starting by waves on lab hosts: one command per host per start_index, cheap windows.

Counts are taken on the real connections (every exec channel a run opens on a
host), order and windows are checked with the system OpenSSH client. No timing
is asserted: only how many commands, which windows, which processes.
"""

from __future__ import annotations

import subprocess
import textwrap
from typing import Dict, List

import pytest

from remote_runner import screen as scr
from remote_runner.cli.classic import build_parser
from remote_runner.loader import load_experiment
from remote_runner.failpolicy import DEFAULT_FORKS
from remote_runner.runner import RunOptions, Runner
from remote_runner.ssh import SSHOptions
from tests.conftest import quit_screen, ssh

HOSTS = ("h1", "h2", "h9")


def test_forks_default_keeps_a_few_dozen_hosts_in_one_wave_and_f_still_works():
    parser = build_parser()
    assert parser.parse_args(["-c", "x.py"]).forks == DEFAULT_FORKS >= 48
    assert parser.parse_args(["-c", "x.py", "-f", "3"]).forks == 3
    assert RunOptions().forks == DEFAULT_FORKS and SSHOptions().forks == DEFAULT_FORKS


@pytest.fixture
def env(lab, foreign_host, screen_name, tmp_path):
    state = f"/tmp/{screen_name}-state"
    yield {"screen": screen_name, "state": state, "tmp": tmp_path, "lab": lab}
    for host in HOSTS:
        quit_screen(lab, host, screen_name, state, f"/tmp/{screen_name}-base*")


def run_counted(env, body: str) -> Dict[str, Dict[str, int]]:
    """Run the experiment *body* on the lab; return host -> phase -> commands sent.

    A command is an exec channel or a step on the session lock's shell; the
    counts are the connections' own (``Connection.traffic``), read before and
    after the start step, and ``start execs`` is how many of the start's were execs.
    """
    path = env["tmp"] / "experiment.py"
    path.write_text(textwrap.dedent(body))
    runner = Runner(load_experiment(str(path), None),
                    RunOptions(screen=env["screen"], remote_done_dir=env["state"]),
                    SSHOptions(ssh_config_file=env["lab"].ssh_config))
    counts: Dict[str, Dict[str, int]] = {}
    start_all, wait_all = runner.start_all, runner.wait_all

    def execs() -> Dict[str, int]:
        return {h: c.traffic.execs + c.traffic.steps for h, c in runner.connections.items()}

    def execs_only() -> Dict[str, int]:
        return {h: c.traffic.execs for h, c in runner.connections.items()}

    def start_counted() -> None:
        counts["before start"], counts["execs before start"] = execs(), execs_only()
        start_all()
        counts["start"], counts["execs at start"] = execs(), execs_only()

    def wait_counted() -> None:
        wait_all()
        counts["after start"] = execs()
    runner.start_all = start_counted  # type: ignore[method-assign]
    runner.wait_all = wait_counted  # type: ignore[method-assign]
    runner.run()
    return {host: {"before start": counts["before start"][host],
                   "start": counts["start"][host] - counts["before start"][host],
                   "start execs": counts["execs at start"][host] - counts["execs before start"][host],
                   "after start": counts["after start"][host] - counts["start"][host]}
            for host in counts["start"]}


THREE_WAVES = """
    for i, (host, index) in enumerate([('h1', 1), ('h1', 1), ('h2', 2), ('h1', 3), ('h9', 3)]):
        c = Component(name=f'c{i}', host=host, executable='/bin/sh', start_index=index,
                      args=['-c', f'echo up {i}; exec sleep 600'],
                      base_dir='/tmp/{screen}-base')
        config.add_component(c)
"""


def test_one_command_per_host_per_wave_for_a_run_and_a_rerun(lab, env):
    body = THREE_WAVES.replace("{screen}", env["screen"])
    for attempt in ("first run", "rerun replacing it"):
        counts = run_counted(env, body)
        # h1 has components in waves 1 and 3; h2 only in wave 2 and h9 only in 3: their
        # launchers and the old session's replacement ride along with wave 1
        for host in ("h1", "h2", "h9"):
            assert counts[host]["start"] == 2, (attempt, counts)
            assert counts[host]["start execs"] == 0, (attempt, counts)  # both on the lock's shell
            assert counts[host]["after start"] == 0, (attempt, counts)
    # one session per host, one window per component, titled with its name
    for host, names in (("h1", ["c0", "c1", "c3"]), ("h2", ["c2"]), ("h9", ["c4"])):
        ids = scr.parse_sessions(ssh(lab, host, "screen -ls", check=False).stdout, env["screen"])
        assert len(ids) == 1, (host, ids)
        listing = ssh(lab, host, f"screen -S {ids[0]} -Q windows").stdout
        assert sorted(t for t in listing.split() if t.startswith("c")) == names, listing
        for name in names:
            log = ssh(lab, host, f"cat {env['state']}/latest/{name}.log").stdout
            assert f"up {name[1:]}" in log, (host, name, log)


def test_a_window_runs_only_its_launcher_and_program(lab, env):
    """The launcher forks nothing but the program: its process group is sh + the program."""
    body = f"""
        c = Component(name='lean', host='h9', executable='/bin/sleep', args=['600'],
                      start_index=1)
        config.add_component(c)
    """
    run_counted(env, body)
    pid = ssh(lab, "h9", f"cat {env['state']}/latest/lean.pid").stdout.strip()
    group = ssh(lab, "h9", f"ps -o comm= -g {pid}").stdout.split()
    assert sorted(group) == ["sh", "sleep"], group
    # pid, window number and log are there for status, logs and restart
    files = ssh(lab, "h9", f"ls {env['state']}/latest/").stdout.split()
    assert {"lean.pid", "lean.win", "lean.log", "lean.launch"} <= set(files), files


def test_restart_replaces_the_window_and_keeps_one_per_component(lab, env, tmp_path):
    """After a restart the session still has one window per component (screen -r works)."""
    runs = tmp_path / "runs"
    config = tmp_path / "exp.py"
    config.write_text(textwrap.dedent(f"""
        for name in ('a', 'b'):
            c = Component(name=name, host='h1', executable='/bin/sh', start_index=1,
                          args=['-c', 'echo run $$; exec sleep 600'])
            config.add_component(c)
    """))
    import os
    import sys
    envvars = {**os.environ, "REMOTE_RUNNER_RUNS": str(runs)}
    base = [sys.executable, "-m", "remote_runner"]
    subprocess.run(base + ["run", "-c", str(config), "-F", lab.ssh_config, "--screen", env["screen"],
                           "--remote-done-dir", env["state"], "-q"], env=envvars, check=True,
                   timeout=300)
    subprocess.run(base + ["restart", "a", "--grace", "5"], env=envvars, check=True,
                   timeout=300)
    ids = scr.parse_sessions(ssh(lab, "h1", "screen -ls", check=False).stdout, env["screen"])
    listing = ssh(lab, "h1", f"screen -S {ids[0]} -Q windows").stdout
    assert sorted(t for t in listing.split() if t in ("a", "b")) == ["a", "b"], listing
    # the new window logs to a.log; the old log is kept beside it
    logs = ssh(lab, "h1", f"ls {env['state']}/latest/").stdout.split()
    assert "a.log" in logs and any(f.startswith("a.log.") for f in logs), logs
    new = ssh(lab, "h1", f"cat {env['state']}/latest/a.log").stdout
    old = ssh(lab, "h1", f"cat {env['state']}/latest/a.log.*").stdout
    assert new.count("run ") == 1 and old.count("run ") == 1 and new != old


def test_the_first_step_runs_on_the_lock_channel_only_once_the_lock_is_held(tmp_path):
    """Locally (no SSH): the command given to the lock runs under it; a refused lock runs nothing."""
    from remote_runner.errors import SessionBusy
    from remote_runner.sessionlock import acquire_lock

    state, marker = str(tmp_path / "state"), tmp_path / "ran"
    held = acquire_lock("localhost", state, "first", then=f"echo prepared; touch {marker}; exit 4")
    try:
        assert held.then_output.strip() == "prepared" and held.then_status == 4
        marker.unlink()
        with pytest.raises(SessionBusy) as info:
            acquire_lock("localhost", state, "second", then=f"touch {marker}")
        assert "first" in str(info.value)
        assert not marker.exists()
    finally:
        held.release()
    again = acquire_lock("localhost", state, "third", then="echo ok")
    assert again.then_output == "ok\n" and again.then_status == 0
    again.release()


def test_a_fed_step_reads_exactly_its_bytes_and_runs_only_after_the_first_succeeded(tmp_path):
    """Locally (no SSH): the fed step gets its request on stdin; the lock still holds after it."""
    from remote_runner.errors import SessionBusy
    from remote_runner.sessionlock import acquire_lock

    state = str(tmp_path / "state")
    held = acquire_lock("localhost", state, "first", then="echo prepared",
                        fed="head -c 5; echo", feed=b"hello and more")
    try:
        assert held.then_output == "prepared\nhello\n" and held.then_status == 0
        with pytest.raises(SessionBusy):  # what the fed step left unread did not end the lock
            acquire_lock("localhost", state, "second")
    finally:
        held.release()
    failed = acquire_lock("localhost", state, "third", then="exit 4", fed="echo fed; cat",
                          feed=b"never read")
    assert failed.then_output == "" and failed.then_status == 4
    failed.release()


def test_a_staged_file_that_cannot_be_renamed_stops_the_start_as_a_copy_error(tmp_path):
    """The host's first start command renames the files the change check staged before anything
    else; a rename that fails ends it there (the previous session untouched) and names the file."""
    import shlex
    from remote_runner.errors import CopyError
    from remote_runner.screen import placing_failed
    from remote_runner.shell import ScriptResult
    from remote_runner.wave import _wave_result
    dest = tmp_path / "it's here"
    missing = shlex.quote(str(tmp_path / ".it's here.rr-00000000.tmp"))
    script = (f"mv -f -- {missing} {shlex.quote(str(dest))} {placing_failed(str(dest))}\n"
              "echo after\n")
    done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True)
    assert "after" not in done.stdout
    result = ScriptResult(done.returncode, done.stdout, done.stderr)

    class Host:
        class shell:
            host = "h1"
    with pytest.raises(CopyError) as caught:
        _wave_result(Host, [], result)
    assert caught.value.host == "h1" and caught.value.path == str(dest)
