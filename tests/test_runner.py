"""The whole run (library API) on lab hosts: order, waits, re-runs, termination, hooks.

Configs are real config files loaded with :func:`load_experiment`. Results are
checked with the system OpenSSH client. Each test uses its own screen name and
state directory and quits its sessions afterwards.
"""

from __future__ import annotations

import subprocess
import textwrap
import threading
import time
from typing import List

import pytest

from remote_runner import screen as scr
from remote_runner.loader import load_experiment
from remote_runner.errors import ComponentFailed, ConfigError, CopyError, StartError
from remote_runner.runner import RunOptions, Runner, run
from remote_runner.ssh import SSHOptions
from tests.conftest import quit_screen, ssh

HOSTS = ("h1", "h2", "h3")


@pytest.fixture
def env(lab, screen_name, tmp_path):
    """Options for one test; sessions and state dirs are cleaned up on every host."""
    state = f"/tmp/{screen_name}-state"
    yield {"screen": screen_name, "state": state, "tmp": tmp_path,
           "ssh": SSHOptions(ssh_config_file=lab.ssh_config)}
    for host in HOSTS:
        quit_screen(lab, host, screen_name, state, f"/tmp/{screen_name}-base*")
    subprocess.run(["sh", "-c", scr.quit_sessions_script(screen_name, 0) +
                    f"rm -rf {state} /tmp/{screen_name}-base*"], check=False)


def experiment(tmp_path, body: str):
    path = tmp_path / "experiment.py"
    path.write_text(textwrap.dedent(body))
    return load_experiment(str(path), None)


def options(env, **kw) -> RunOptions:
    return RunOptions(screen=env["screen"], remote_done_dir=env["state"], **kw)


def sessions(lab, host, name) -> List[str]:
    return scr.parse_sessions(ssh(lab, host, "screen -ls", check=False).stdout, name)


def windows(lab, host, session_id) -> str:
    return ssh(lab, host, f"screen -S {session_id} -Q windows").stdout


def test_full_run_on_three_hosts(lab, env):
    tmp = env["tmp"]
    (tmp / "client.sh").write_text('#!/bin/sh\necho "client $1 of $(cat data/peer.txt)"\n'
                                   'exec sleep 600\n')
    (tmp / "client.sh").chmod(0o755)
    (tmp / "data").mkdir()
    (tmp / "data" / "peer.txt").write_text("h1\n")
    exp = experiment(tmp, f"""
        server = Component()
        server.name = 'server'
        server.host = 'h1'
        server.executable = '/bin/sh'
        server.args = ['-c', 'echo serving; exec sleep 600']
        server.start_index = 0
        config.add_component(server)
        probe = Component()
        probe.name = 'probe'
        probe.host = 'h1'
        probe.executable = '/bin/sh'
        probe.args = ['-c', 'test -s {env["state"]}/latest/server.pid']
        probe.start_index = 1
        probe.wait = True
        config.add_component(probe)
        for h in ('h2', 'h3'):
            c = Component()
            c.name = 'client'
            c.host = h
            c.executable = 'client.sh'
            c.args = [h]
            c.files = {{'client.sh': 'client.sh', 'data': 'data'}}
            c.start_index = 1
            config.add_component(c)
        waiter = Component()
        waiter.name = 'waiter'
        waiter.host = 'h3'
        waiter.executable = '/bin/sh'
        waiter.args = ['-c', 'exit 0']
        waiter.start_index = 2
        waiter.wait = True
        config.add_component(waiter)
    """)
    report = run(exp, options(env), env["ssh"])
    assert report.failures == {}
    assert report.components[("h1", "probe")].status == 0  # server confirmed before index 1
    assert report.components[("h3", "waiter")].status == 0
    for host in HOSTS:
        ids = sessions(lab, host, env["screen"])
        assert ids == [report.session[host]]
    assert "server" in windows(lab, "h1", report.session["h1"])
    assert "probe" in windows(lab, "h1", report.session["h1"])
    listing = windows(lab, "h3", report.session["h3"])
    assert "client" in listing and "waiter" in listing
    for host in ("h2", "h3"):
        base = report.components[(host, "client")].base_dir
        assert base.startswith("/tmp/")
        log = f"{env['state']}/latest/client.log"
        deadline = time.monotonic() + 60
        while f"client {host} of h1" not in ssh(lab, host, f"cat {log}", check=False).stdout:
            assert time.monotonic() < deadline, ssh(lab, host, f"ls -la {env['state']}; "
                                                    f"tail -v -n 5 {env['state']}/latest/*.log", check=False).stdout
            time.sleep(0.2)
        assert ssh(lab, host, f"cat {base}/data/peer.txt").stdout == "h1\n"
    assert report.sync["h2"].copied and "h1" not in report.sync  # server has no files


def test_rerun_copies_nothing_and_replaces_or_keeps_windows(lab, env):
    tmp = env["tmp"]
    (tmp / "payload.txt").write_text("payload\n")
    base = f"/tmp/{env['screen']}-base"
    exp = experiment(tmp, f"""
        c = Component()
        c.name = 'svc'
        c.host = 'h2'
        c.executable = '/bin/sleep'
        c.args = ['600']
        c.base_dir = '{base}'
        c.files = {{'payload.txt': 'payload.txt'}}
        c.start_index = 0
        config.add_component(c)
    """)
    first = run(exp, options(env), env["ssh"])
    assert first.sync["h2"].copied == [f"{base}/payload.txt"]
    second = run(exp, options(env), env["ssh"])
    assert second.sync["h2"].copied == [] and second.sync["h2"].skipped == [f"{base}/payload.txt"]
    assert sessions(lab, "h2", env["screen"]) == [second.session["h2"]]
    assert second.session["h2"] != first.session["h2"]
    assert windows(lab, "h2", second.session["h2"]).count("svc") == 1
    third = run(exp, options(env, kill_first=False), env["ssh"])
    assert third.session["h2"] == second.session["h2"]
    assert sessions(lab, "h2", env["screen"]) == [second.session["h2"]]
    assert windows(lab, "h2", third.session["h2"]).count("svc") == 2


def test_rerun_stops_every_program_of_the_replaced_session(lab, env):
    """Quitting screen only hangs up a window's launcher; its program must not outlive it."""
    exp = experiment(env["tmp"], f"""
        for name, args in (('plain', ['-c', 'exec sleep 600']),
                           ('stubborn', ['-c', "trap '' HUP TERM; sleep 600 & wait; sleep 600"])):
            c = Component()
            c.name = name
            c.host = 'h3'
            c.executable = '/bin/sh'
            c.args = args
            c.start_index = 0
            config.add_component(c)
    """)
    state = env["state"]
    first = run(exp, options(env), env["ssh"])
    old = {name: ssh(lab, "h3", f"cat {state}/latest/{name}.pid").stdout.strip()
           for name in ("plain", "stubborn")}
    assert all(ssh(lab, "h3", f"kill -0 -{pg}", check=False).returncode == 0 for pg in old.values())
    second = run(exp, options(env, terminate_grace=1.0), env["ssh"])
    assert second.session["h3"] != first.session["h3"]
    for name, pg in old.items():
        assert ssh(lab, "h3", f"kill -0 -{pg}", check=False).returncode != 0, name
    # the new run's programs are the only ones left, one group per component
    left = ssh(lab, "h3", f"ps -eo args= | grep -c '^/bin/sh {state}/'", check=False)
    assert left.stdout.strip() == "2"


def test_failing_and_missing_waited_components(lab, env):
    exp = experiment(env["tmp"], """
        for name, exe, args in (('bad', '/bin/sh', ['-c', 'exit 3']),
                                ('missing', '/no/such/program', []),
                                ('good', '/bin/true', [])):
            c = Component()
            c.name = name
            c.host = 'h1'
            c.executable = exe
            c.args = args
            c.start_index = 0
            c.wait = True
            config.add_component(c)
    """)
    with pytest.raises(ComponentFailed) as info:
        run(exp, options(env), env["ssh"])
    failures = info.value.failures
    assert failures["h1:bad"] == "exited with status 3"
    assert "127" in failures["h1:missing"]
    assert "h1:good" not in failures


def test_wait_timeout_and_terminate(lab, env):
    exp = experiment(env["tmp"], """
        for name, host, args, wait in (('forever', 'h2', ['600'], False),
                                       ('slow', 'h1', ['600'], True)):
            c = Component()
            c.name = name
            c.host = host
            c.executable = '/bin/sleep'
            c.args = args
            c.start_index = 0
            c.wait = wait
            config.add_component(c)
    """)
    with pytest.raises(ComponentFailed) as info:
        run(exp, options(env, wait_timeout=1.0), env["ssh"])
    assert "wait-timeout" in info.value.failures["h1:slow"]
    # without -t the other component is left running
    pid = ssh(lab, "h2", f"cat {env['state']}/latest/forever.pid").stdout.strip()
    assert ssh(lab, "h2", f"kill -0 {pid}", check=False).returncode == 0


def test_terminate_stops_others_after_waits(lab, env):
    exp = experiment(env["tmp"], """
        for name, host, args, wait in (('forever', 'h2', ['-c', 'exec sleep 600'], False),
                                       ('other', 'h3', ['-c', 'sleep 600 & wait'], False),
                                       ('brief', 'h3', ['-c', 'exit 0'], False),
                                       ('job', 'h1', ['-c', 'exit 0'], True)):
            c = Component()
            c.name = name
            c.host = host
            c.executable = '/bin/sh'
            c.args = args
            c.start_index = 0
            c.wait = wait
            config.add_component(c)
    """)
    report = run(exp, options(env, terminate=True, terminate_grace=120), env["ssh"])
    assert report.components[("h1", "job")].status == 0
    assert report.components[("h2", "forever")].terminated
    assert not report.components[("h3", "brief")].terminated  # it had ended by itself
    assert ssh(lab, "h2", f"cat {env['state']}/latest/forever.status").stdout.strip() == "143"
    for host, name in (("h2", "forever"), ("h3", "other")):
        pid = ssh(lab, host, f"cat {env['state']}/latest/{name}.pid").stdout.strip()
        assert ssh(lab, host, f"kill -0 -{pid}", check=False).returncode != 0
    # the window stays (zombie) so its output can still be read
    assert "forever" in windows(lab, "h2", report.session["h2"])


def test_localhost_component_runs_without_ssh(env):
    state = str(env["tmp"] / "state")
    out = env["tmp"] / "out.txt"
    exp = experiment(env["tmp"], f"""
        c = Component()
        c.name = 'local'
        c.host = 'localhost'
        c.executable = '/bin/sh'
        c.args = ['-c', 'pwd > {out}', '$HOME']
        c.start_index = 0
        c.wait = True
        config.add_component(c)
    """)
    report = Runner(exp, RunOptions(screen=env["screen"], remote_done_dir=state),
                    connect=lambda hosts: pytest.fail(f"SSH used for {hosts}")).run()
    assert report.components[("localhost", "local")].status == 0
    assert out.read_text().strip() == report.components[("localhost", "local")].base_dir


def test_change_checks_are_planned_while_hosts_connect_and_bad_input_contacts_none(tmp_path):
    """The change checks' planning (local work no input can make fail) runs while the hosts
    connect; a bad source is refused before any host is contacted."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    body = """
        for n, src in {pairs!r}:
            c = Component()
            c.name = n
            c.host = 'h1'
            c.executable = '/bin/true'
            c.base_dir = '/tmp/rr-planned-dest/' + n
            c.start_index = 1
            c.files = {{src: 'same-name'}}
            config.add_component(c)
    """
    asked = []
    good = experiment(tmp_path, body.format(pairs=(("one", str(a)), ("two", str(b)))))
    runner = Runner(good, RunOptions(screen="rr-planned"), connect=lambda hosts: connect(hosts))

    def connect(hosts):
        asked.append(list(hosts))
        deadline = time.monotonic() + 30
        while not runner.early and time.monotonic() < deadline:
            time.sleep(0.01)  # the planning goes on meanwhile
        raise StartError(f"stop here: checks for {sorted(runner.early)}")

    with pytest.raises(StartError, match=r"stop here: checks for \['h1'\]"):
        runner.run()
    assert asked == [["h1"]]
    body = body.replace("'/tmp/rr-planned-dest/' + n", "'/tmp/rr-planned-dest'")  # one destination
    bad = experiment(tmp_path, body.format(pairs=(("one", str(a)), ("two", str(b)))))
    with pytest.raises(ConfigError, match="two different sources go to /tmp/rr-planned-dest/same-name") as info:
        Runner(bad, RunOptions(screen="rr-planned"), connect=connect).run()
    # a config mistake: the later component's files, the earlier one named with its line
    assert (info.value.component, info.value.field) == ("two", "files") and info.value.line
    assert "the first from component 'one' at" in str(info.value)
    assert asked == [["h1"]]  # not contacted again
    # a source gone since the config was read: named with its component, no host contacted
    b.unlink()
    with pytest.raises(CopyError) as info:  # exit 4, as a source missing at load is
        Runner(good, RunOptions(screen="rr-planned"), connect=connect).run()
    assert (info.value.component, info.value.field) == ("two", "files")
    assert str(b) in str(info.value) and "No such file" in str(info.value)
    assert asked == [["h1"]]


class FakeMirror:
    """Stands in for remote_runner.mirror: wraps the argv and records close()."""

    def __init__(self, connections, specs):
        self.specs = [s.name for s in specs]
        self.closed = False
        self.hosts = sorted(connections)

    def argv(self, spec, base_dir):
        return ["/bin/sh", "-c", 'echo "mirrored $0" > mirrored.txt', spec.name]

    def close(self):
        self.closed = True


def test_mirror_hook_supplies_argv_and_is_closed_after_the_components(lab, env):
    made = []

    def factory(connections, specs):
        made.append(FakeMirror(connections, specs))
        return made[-1]

    base = f"/tmp/{env['screen']}-base"
    exp = experiment(env["tmp"], f"""
        c = Component()
        c.name = 'm'
        c.host = 'h1'
        c.executable = '/usr/bin/ffmpeg'
        c.base_dir = '{base}'
        c.mirror = True
        c.start_index = 0
        config.add_component(c)
    """)
    report = Runner(exp, options(env), env["ssh"], mirror_factory=factory).run()
    assert made and made[0].specs == ["m"] and made[0].hosts == ["h1"] and made[0].closed
    assert report.components[("h1", "m")].status == 0
    assert ssh(lab, "h1", f"cat {base}/mirrored.txt").stdout == "mirrored m\n"


def test_unstartable_session_is_a_start_error(lab, env):
    exp = experiment(env["tmp"], """
        c = Component()
        c.name = 'x'
        c.host = 'h1'
        c.executable = '/bin/true'
        c.start_index = 0
        config.add_component(c)
    """)
    with pytest.raises(StartError):
        run(exp, RunOptions(screen=env["screen"], remote_done_dir="/proc/no-such-dir"), env["ssh"])
    assert sessions(lab, "h1", env["screen"]) == []


def test_real_mirror_runs_a_local_only_program_on_a_host(lab, env):
    """mirror=True through remote_runner.mirror: the program exists only locally."""
    import os
    import shutil
    import uuid

    from remote_runner.lab import LOCAL_ONLY

    local = os.path.join(LOCAL_ONLY, f"runner-{uuid.uuid4().hex[:8]}")
    os.makedirs(local)
    try:
        prog = os.path.join(local, "prog.sh")
        with open(prog, "w") as handle:
            handle.write('#!/bin/sh\necho "ran on $(hostname): $*" > "$(dirname "$0")/out.txt"\n')
        os.chmod(prog, 0o755)
        exp = experiment(env["tmp"], f"""
            c = Component()
            c.name = 'mirrored'
            c.host = 'h2'
            c.executable = '{prog}'
            c.args = ['a b', '$HOME']
            c.mirror = True
            c.export = ['{local}']  # the program writes beside itself (the /opt tree is read-only)
            c.wait = True
            c.start_index = 0
            config.add_component(c)
        """)
        report = run(exp, options(env), env["ssh"])
        assert report.components[("h2", "mirrored")].status == 0
        with open(os.path.join(local, "out.txt")) as handle:
            assert handle.read() == "ran on h2: a b $HOME\n"
        assert ssh(lab, "h2", f"test -e {LOCAL_ONLY}", check=False).returncode != 0
    finally:
        shutil.rmtree(local, ignore_errors=True)


def test_lost_connection_during_wait_raises_instead_of_hanging(lab, env):
    import threading

    from remote_runner.errors import HostError
    from remote_runner.ssh import connect_all

    exp = experiment(env["tmp"], """
        c = Component()
        c.name = 'long'
        c.host = 'h3'
        c.executable = '/bin/sleep'
        c.args = ['600']
        c.start_index = 0
        c.wait = True
        config.add_component(c)
    """)
    made = {}

    def connect(hosts):
        made.update(connect_all(hosts, env["ssh"]))
        return dict(made)

    def cut_link_once_started():
        pid_file = f"{env['state']}/latest/long.pid"
        deadline = time.monotonic() + 120
        while ssh(lab, "h3", f"test -s {pid_file}", check=False).returncode != 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        made["h3"].transport.close()  # the link dies under the runner

    cutter = threading.Thread(target=cut_link_once_started, daemon=True)
    cutter.start()
    with pytest.raises(HostError) as info:
        Runner(exp, options(env), connect=connect).run()
    cutter.join(60)
    assert info.value.host == "h3"


def test_polls_that_answer_nothing_give_the_host_up_instead_of_looping(monkeypatch):
    """A host that runs something else than the wait's poll (a login shell turned nologin, a
    ForceCommand) is given up after a few polls with a backoff, never polled in a tight loop."""
    from types import SimpleNamespace
    from remote_runner import runend
    from remote_runner.errors import HostError
    polls, naps = [], []
    monkeypatch.setattr(runend.time, "sleep", naps.append)
    fake = SimpleNamespace(_poll_status=lambda host, places, seconds: polls.append(host) or {})
    place = SimpleNamespace(window=SimpleNamespace(stem="job"))
    with pytest.raises(HostError) as info:
        runend.RunEnd._wait_on_host(fake, "h2", [place], None)
    assert info.value.host == "h2" and "answered nothing" in str(info.value)
    assert len(polls) == runend.BLANK_POLLS and naps == sorted(naps) and naps[0] > 0
