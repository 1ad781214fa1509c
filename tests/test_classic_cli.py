"""The classic command line (``remote_runner.py`` / ``remote-runner run``) as a user runs it.

Every test runs the real script in a subprocess and judges it by its exit
code, its ``LEVEL: message`` lines and, for lab runs, by what the system
OpenSSH client finds on the hosts afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest

from remote_runner import screen as scr
from remote_runner.cli.classic import build_parser, join_extra_args
from remote_runner.lab import LOCAL_ONLY
from tests.conftest import quit_screen, ssh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "remote_runner.py")
HOSTS = ("h1", "h2", "h3")


def test_each_subcommand_is_built_from_the_module_the_dispatcher_names():
    from remote_runner import cli as top
    full = top.build_parser()
    commands = next(a for a in full._actions if a.dest == "command").choices
    assert set(commands) == set(top.COMMAND_MODULES)
    for name in commands:
        alone = top.build_parser(name)
        assert name in next(a for a in alone._actions if a.dest == "command").choices


def test_running_exec_does_not_import_the_runner():
    code = ("import sys; from remote_runner.cli import main\n"
            "try:\n    main(['exec', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('remote_runner.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().splitlines()[-1] == "['remote_runner.cli.exec_']"


def cli(*args, env=None, timeout=300):
    """Run remote_runner.py with *args*; return the CompletedProcess (text)."""
    full_env = {k: v for k, v in os.environ.items() if k != "REMOTE_RUNNER_PASSWORD"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


@pytest.fixture
def env(lab, screen_name, tmp_path):
    """A unique screen name and state dir; sessions and files are removed afterwards."""
    state = f"/tmp/{screen_name}-state"
    yield {"screen": screen_name, "state": state, "tmp": tmp_path, "base": f"/tmp/{screen_name}-base"}
    for host in HOSTS:
        quit_screen(lab, host, screen_name, state, f"/tmp/{screen_name}-base")


def write_config(tmp_path, body: str, name="experiment.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def base_args(lab, env):
    return ["-F", lab.ssh_config, "--screen", env["screen"], "--remote-done-dir", env["state"]]


# --------------------------------------------------------------------------- no hosts needed

def test_extra_args_may_start_with_a_dash():
    assert join_extra_args(["-c", "x", "--extra-args", "-t", "-l", "DEBUG"]) == \
        ["-c", "x", "--extra-args=-t", "-l", "DEBUG"]
    args = build_parser().parse_args(["-c", "x", "--extra-args", "-p X", "-t"])
    assert args.extra_args == "-p X" and args.terminate is True
    args = build_parser().parse_args(["-c", "x", "--extra-args", "-q"])
    assert args.extra_args == "-q" and args.terminate is False
    args = build_parser().parse_args(["-c", "x", "--no-terminate", "--no-kill", "--no-zombie"])
    assert (args.terminate, args.kill_first, args.no_zombie, args.screen) == (False, False, True, "runner")


def test_help_and_version():
    out = cli("--help")
    assert out.returncode == 0
    for flag in ("--extra-args", "--remote-done-dir", "--no-terminate", "--accept-new-host-keys",
                 "--wait-timeout", "exit codes"):
        assert flag in out.stdout
    version = cli("--version")
    assert version.returncode == 0 and "remote_runner" in version.stdout


def test_arg_parser_gets_dash_values_in_both_entry_points(tmp_path):
    parser_file = write_config(tmp_path, """
        def parse_args(extra_args, ssh_user):
            return extra_args.split()
    """, name="arg_parser.py")
    config = write_config(tmp_path, """
        import logging
        logging.getLogger('experiment').info('extra=%s', extra_options)
        c = Component()
        c.name = 'x'
        c.host = 'h1'
        c.executable = '/bin/true'
        c.start_index = 0
        config.add_component(c)
    """)
    out = cli("-c", config, "-a", parser_file, "--extra-args", "-p X", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "INFO: extra=['-p', 'X']" in out.stderr
    assert "  index 0: h1:x" in out.stdout.splitlines()  # the plan, on stdout
    sub = subprocess.run([sys.executable, "-m", "remote_runner", "run", "-c", config, "-a",
                          parser_file, "--extra-args", "-t", "--dry-run"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert sub.returncode == 0, sub.stderr
    assert "INFO: extra=['-t']" in sub.stderr


def test_bad_config_exits_2_with_file_and_line(tmp_path):
    config = write_config(tmp_path, """
        c = Component()
        c.name = 'x'
        c.hots = 'h1'
    """)
    out = cli("-c", config)
    assert out.returncode == 2
    assert f"{config}:4" in out.stderr and out.stderr.startswith("ERROR: ")


def test_bad_screen_name_exits_2(tmp_path):
    config = write_config(tmp_path, """
        c = Component()
        c.name = 'x'
        c.host = 'h1'
        c.executable = '/bin/true'
        c.start_index = 0
        config.add_component(c)
    """)
    out = cli("-c", config, "--screen", "bad name", "--dry-run")
    assert out.returncode == 2 and "--screen" in out.stderr


# --------------------------------------------------------------------------- lab

def test_full_run_then_unchanged_rerun_copies_nothing(lab, env):
    """A program that exists only locally (LOCAL_ONLY) is shipped and run on three hosts."""
    local_dir = os.path.join(LOCAL_ONLY, f"cli-{uuid.uuid4().hex[:8]}")
    os.makedirs(local_dir)
    try:
        prog = os.path.join(local_dir, "prog.sh")
        with open(prog, "w") as handle:
            handle.write('#!/bin/sh\necho "ran on $(hostname) with $1"; exit "${2:-0}"\n')
        os.chmod(prog, 0o755)
        config = write_config(env["tmp"], f"""
            roles = (('server', 'h1', 0, False), ('client', 'h2', 1, False), ('check', 'h3', 2, True))
            for name, host, index, wait in roles:
                c = Component()
                c.name = name
                c.host = host
                c.executable = 'prog.sh'
                c.args = ['a $b', '0']
                c.base_dir = '{env["base"]}'
                c.files = {{'{prog}': 'prog.sh'}}
                c.start_index = index
                c.wait = wait
                config.add_component(c)
        """)
        first = cli("-c", config, *base_args(lab, env))
        assert first.returncode == 0, first.stderr
        for host in HOSTS:
            assert f"INFO: {host}: copied 1 file" in first.stderr
            assert ssh(lab, host, f"test -e {LOCAL_ONLY}", check=False).returncode != 0
            ids = scr.parse_sessions(ssh(lab, host, "screen -ls", check=False).stdout, env["screen"])
            assert len(ids) == 1
        assert "INFO: h3: check exited with status 0" in first.stderr
        second = cli("-c", config, *base_args(lab, env))
        assert second.returncode == 0, second.stderr
        for host in HOSTS:
            assert f"INFO: {host}: copied 0 files (0 bytes), 1 unchanged" in second.stderr
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


def test_missing_source_exits_4_and_changes_nothing(lab, env):
    config = write_config(env["tmp"], f"""
        for host in ('h1', 'h2'):
            c = Component()
            c.name = 'x'
            c.host = host
            c.executable = '/bin/true'
            c.base_dir = '{env["base"]}'
            c.files = {{'present.txt': 'present.txt'}}
            c.start_index = 0
            config.add_component(c)
        c = Component()
        c.name = 'y'
        c.host = 'h3'
        c.executable = '/bin/true'
        c.files = {{'no-such-file.bin': 'x.bin'}}
        c.start_index = 0
        config.add_component(c)
    """)
    (env["tmp"] / "present.txt").write_text("here\n")
    out = cli("-c", config, *base_args(lab, env))
    assert out.returncode == 4
    assert "no-such-file.bin" in out.stderr
    for host in HOSTS:
        assert scr.parse_sessions(ssh(lab, host, "screen -ls", check=False).stdout, env["screen"]) == []
        assert ssh(lab, host, f"ls -d {env['state']} {env['base']}", check=False).returncode != 0


def test_unknown_host_key_exits_3_and_can_be_accepted(lab, env):
    known = env["tmp"] / "known_hosts"
    known.write_text("")
    original = open(lab.ssh_config).read()
    lab_known = [line.split()[1] for line in original.splitlines()
                 if line.strip().startswith("UserKnownHostsFile")][0]
    ssh_config = env["tmp"] / "ssh_config"
    ssh_config.write_text(original.replace(lab_known, str(known)))
    config = write_config(env["tmp"], """
        c = Component()
        c.name = 'x'
        c.host = 'h1'
        c.executable = '/bin/true'
        c.start_index = 0
        c.wait = True
        config.add_component(c)
    """)
    args = ["--screen", env["screen"], "--remote-done-dir", env["state"], "-F", str(ssh_config)]
    out = cli("-c", config, *args)
    assert out.returncode == 3
    assert "--accept-new-host-keys" in out.stderr and "h1" in out.stderr
    assert scr.parse_sessions(ssh(lab, "h1", "screen -ls", check=False).stdout, env["screen"]) == []
    accepted = cli("-c", config, *args, "--accept-new-host-keys")
    assert accepted.returncode == 0, accepted.stderr
    assert known.read_text().strip()


def test_failing_waited_component_exits_5_with_its_status(lab, env):
    config = write_config(env["tmp"], """
        c = Component()
        c.name = 'worker'
        c.host = 'h2'
        c.executable = '/bin/sh'
        c.args = ['-c', 'exit 9']
        c.start_index = 0
        c.wait = True
        config.add_component(c)
    """)
    out = cli("-c", config, *base_args(lab, env), "-l", "DEBUG")
    assert out.returncode == 5
    assert "worker" in out.stderr and "status 9" in out.stderr


def test_password_is_never_logged(tmp_path):
    config = write_config(tmp_path, """
        c = Component()
        c.name = 'x'
        c.host = 'h1'
        c.executable = '/bin/true'
        c.start_index = 0
        config.add_component(c)
    """)
    out = cli("-c", config, "-p", "s3cret-not-logged", "-l", "DEBUG", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "s3cret-not-logged" not in out.stderr + out.stdout
    from_env = cli("-c", config, "-l", "DEBUG", "--dry-run",
                   env={"REMOTE_RUNNER_PASSWORD": "s3cret-env"})
    assert from_env.returncode == 0 and "s3cret-env" not in from_env.stderr + from_env.stdout


def test_terminate_flag_stops_other_components(lab, env):
    config = write_config(env["tmp"], """
        for name, host, args, wait in (('daemon', 'h1', ['-c', 'exec sleep 600'], False),
                                       ('job', 'h2', ['-c', 'exit 0'], True)):
            c = Component()
            c.name = name
            c.host = host
            c.executable = '/bin/sh'
            c.args = args
            c.start_index = 0
            c.wait = wait
            config.add_component(c)
    """)
    out = cli("-c", config, *base_args(lab, env), "-t")
    assert out.returncode == 0, out.stderr
    assert "INFO: h1: terminated daemon" in out.stderr
    pid = ssh(lab, "h1", f"cat {env['state']}/latest/daemon.pid").stdout.strip()
    assert ssh(lab, "h1", f"kill -0 {pid}", check=False).returncode != 0


@pytest.mark.parametrize("release", ["11", "13"])
def test_run_on_a_foreign_distribution(lab, env, request, release):
    """Another Debian release with its own root: screen, sh, openssl and paths are its own."""
    foreign_host = request.getfixturevalue("foreign_host" if release == "11" else "newer_host")
    (env["tmp"] / "tool.sh").write_text('#!/bin/sh\nprintf "%s|" "$@"; echo; cat /etc/debian_version\n')
    (env["tmp"] / "tool.sh").chmod(0o755)
    config = write_config(env["tmp"], f"""
        c = Component()
        c.name = 'tool'
        c.host = '{foreign_host}'
        c.executable = 'tool.sh'
        c.args = ['$HOME', 'a b', "q'uote"]
        c.base_dir = '{env["base"]}'
        c.files = {{'tool.sh': 'tool.sh'}}
        c.start_index = 0
        c.wait = True
        config.add_component(c)
    """)
    for expected in ("copied 1 file", "copied 0 files"):
        out = cli("-c", config, *base_args(lab, env))
        assert out.returncode == 0, out.stderr
        assert f"INFO: {foreign_host}: {expected}" in out.stderr
    log = ssh(lab, foreign_host, f"cat {env['state']}/latest/tool.log").stdout
    assert "$HOME|a b|q'uote|" in log and log.split("\n")[1].startswith(release + ".")
    quit_screen(lab, foreign_host, env["screen"], env["state"], env["base"])


def test_run_as_a_non_root_user_uses_its_home(lab, env):
    ssh_config = env["tmp"] / "ssh_config"
    ssh_config.write_text(open(lab.ssh_config).read().replace("User root", "User rrtest"))
    config = write_config(env["tmp"], """
        c = Component()
        c.name = 'who'
        c.host = 'h3'
        c.executable = '/bin/sh'
        c.args = ['-c', 'test "$(id -un)" = rrtest && test "$PWD" != "$HOME"']
        c.start_index = 0
        c.wait = True
        config.add_component(c)
    """)
    out = cli("-c", config, "-F", str(ssh_config), "--screen", env["screen"])
    try:
        assert out.returncode == 0, out.stderr
        assert "INFO: h3: who exited with status 0" in out.stderr
        status = ssh(lab, "h3", f"cat ~/.remote-runner/{env['screen']}/latest/who.status", user="rrtest")
        assert status.stdout.strip() == "0"
    finally:
        quit_screen(lab, "h3", env["screen"], f"~/.remote-runner/{env['screen']}", user="rrtest")


def test_no_kill_keeps_windows_and_default_replaces_them(lab, env):
    config = write_config(env["tmp"], """
        c = Component()
        c.name = 'svc'
        c.host = 'h1'
        c.executable = '/bin/sleep'
        c.args = ['600']
        c.start_index = 0
        config.add_component(c)
    """)

    def session_windows():
        ids = scr.parse_sessions(ssh(lab, "h1", "screen -ls", check=False).stdout, env["screen"])
        assert len(ids) == 1, ids
        return ssh(lab, "h1", f"screen -S {ids[0]} -Q windows").stdout.count("svc")

    assert cli("-c", config, *base_args(lab, env)).returncode == 0
    assert session_windows() == 1
    out = cli("-c", config, *base_args(lab, env), "--no-kill")
    assert out.returncode == 0, out.stderr
    assert "adding windows to existing screen session" in out.stderr
    assert session_windows() == 2
    assert cli("-c", config, *base_args(lab, env)).returncode == 0
    assert session_windows() == 1
