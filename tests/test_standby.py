"""The standby: a process with the runner loaded that runs the next commands for their callers.

What a user must not be able to tell apart from an in-process run is checked
through the real scripts in subprocesses: the working directory, environment,
umask, standard input, output and error, the exit status, Ctrl-C and a killed
caller. A config file is Python the runner executes, so a config that prints
``os.getpid()`` shows which process ran it: the caller's own (in-process) or a
standby's child. Each test gets its own standby directory and stops the standby
it started by the pid the standby wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from remote_runner import standby
from remote_runner.standby import names, server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "remote_runner.py")

PROBE = textwrap.dedent("""\
    import os, sys, time
    print("PROBE %d %s %s %03o %s %s" % (os.getpid(), os.getcwd(), os.environ.get("PROBE_VALUE"),
                                         os.umask(0o022), time.strftime("%Z"),
                                         sys.stdin.readline().strip()), flush=True)
    if os.environ.get("PROBE_SLEEP"):
        time.sleep(float(os.environ["PROBE_SLEEP"]))
    c = Component()
    c.name = "probe"
    c.host = "h1"
    c.executable = "/bin/true"
    {start}
    config.add_component(c)
    """)


@pytest.fixture
def standby_dir():
    """A standby directory of this test's own (short: a socket path has ~100 bytes at most)."""
    folder = tempfile.mkdtemp(prefix="rrsb-", dir="/tmp")
    yield folder
    server.stop_all(folder)
    shutil.rmtree(folder, ignore_errors=True)


def write_probe(directory, start_index=True) -> str:
    path = os.path.join(directory, "probe.py")
    with open(path, "w") as out:
        out.write(PROBE.format(start="c.start_index = 1" if start_index else ""))
    return path


def environment(folder, **extra) -> dict:
    env = dict(os.environ, REMOTE_RUNNER_STANDBY="60", REMOTE_RUNNER_STANDBY_DIR=folder)
    env.update(extra)
    return env


def probe_line(stdout: str):
    line = next(line for line in stdout.splitlines() if line.startswith("PROBE "))
    _, pid, cwd, value, umask, zone, *stdin = line.split(" ")
    return int(pid), cwd, value, umask, zone, " ".join(stdin)


def wait_for_socket(folder, seconds=60.0) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name in os.listdir(folder):
            if name.endswith(".sock"):
                return os.path.join(folder, name)
        time.sleep(0.05)
    raise AssertionError(f"no standby socket in {folder} after {seconds} s")


def run_classic(args, env, cwd, stdin="", umask=0o022):
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], env=env, cwd=cwd, umask=umask,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.communicate(stdin, timeout=120)
    return proc.pid, proc.returncode, out, err


def test_a_rerun_is_served_by_the_standby_exactly_as_it_would_run_here(tmp_path, standby_dir):
    config = write_probe(tmp_path)
    first_pid, code, out, err = run_classic(["-c", config, "--dry-run", "--no-connect"],
                                            environment(standby_dir, PROBE_VALUE="one", TZ="ONE-1"),
                                            tmp_path, stdin="first\n")
    assert code == 0, err
    assert probe_line(out) == (first_pid, str(tmp_path), "one", "022", "ONE", "first")  # in-process
    wait_for_socket(standby_dir)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    caller, code, out, err = run_classic(["-c", os.path.join("..", "probe.py"), "--dry-run", "--no-connect",
                                          "--json"], environment(standby_dir, PROBE_VALUE="two", TZ="TWO-2"),
                                         elsewhere, stdin="second line\n", umask=0o027)
    assert code == 0, err
    pid, cwd, value, umask, zone, stdin = probe_line(out)
    assert pid != caller, "the command ran in-process, not in the standby"
    # "../probe.py" was found from the caller's directory; the config runs in its own, as here
    assert (cwd, value, umask, zone, stdin) == (str(tmp_path), "two", "027", "TWO", "second line")
    plan = json.loads(out[out.index("{"):])
    assert plan["config_file"] == config
    assert [w["name"] for h in plan["hosts"] for w in h["windows"]] == ["probe"]

    broken = write_probe(elsewhere, start_index=False)
    caller, code, out, err = run_classic(["-c", broken], environment(standby_dir), elsewhere)
    assert probe_line(out)[0] != caller
    assert code == 2
    assert f"ERROR: {broken}:" in err and "component 'probe', field 'start_index'" in err


def test_python_c_in_a_directory_with_its_own_copy_of_the_package_is_served_that_copy(tmp_path, standby_dir):
    """``python -c`` imports from its working directory first (the bench runs so from a checkout):
    the standby must import the same copy, else no standby ever matches and every run pays."""
    shutil.copytree(os.path.join(ROOT, "remote_runner"), tmp_path / "remote_runner",
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = write_probe(tmp_path)
    code = ("import remote_runner, sys; sys.stderr.write('FROM ' + remote_runner.__file__ + '\\n'); "
            "from remote_runner.standby import launch; launch('classic')")
    runs = []
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", code, "-c", config, "--dry-run", "--no-connect"],
                                env=environment(standby_dir), cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert f"FROM {tmp_path}/remote_runner/__init__.py" in err
        runs.append(probe_line(out)[0] == proc.pid)
        wait_for_socket(standby_dir)
    assert runs == [True, False]  # in-process first, then in a standby (which imports this copy)


def test_ctrl_c_reaches_the_command_in_the_standby_and_a_killed_caller_ends_it(tmp_path, standby_dir):
    config = write_probe(tmp_path)
    run_classic(["-c", config, "--dry-run", "--no-connect"], environment(standby_dir), tmp_path)
    wait_for_socket(standby_dir)

    for how in (signal.SIGINT, signal.SIGKILL):
        caller = subprocess.Popen([sys.executable, SCRIPT, "-c", config, "--dry-run", "--no-connect"],
                                  env=environment(standby_dir, PROBE_SLEEP="60"), cwd=tmp_path,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        line = caller.stdout.readline()
        child = probe_line(line)[0]
        assert child != caller.pid
        caller.send_signal(how)
        caller.wait(timeout=30)
        rest = caller.stderr.read()
        caller.stdout.close()
        caller.stderr.close()
        if how == signal.SIGINT:
            assert caller.returncode == 130, rest
            assert "ERROR: interrupted" in rest
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.path.exists(f"/proc/{child}"):
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{child}"), f"the standby's child {child} outlived its caller"


STREAMS_PROBE = textwrap.dedent("""\
    import os, signal, sys
    print("STREAMS %d hup=%s int=%s through=%s stdin=%r" % (
        os.getpid(), signal.getsignal(signal.SIGHUP) == signal.SIG_IGN,
        signal.getsignal(signal.SIGINT) == signal.SIG_IGN, sys.stdout.write_through,
        sys.stdin.read()), flush=True)
    c = Component(name="probe", host="h1", executable="/bin/true", start_index=1)
    config.add_component(c)
    """)


def streams_line(stdout: str):
    line = next(line for line in stdout.splitlines() if line.startswith("STREAMS "))
    pid, rest = line.split(" ", 2)[1:]
    return int(pid), rest


def test_a_command_keeps_its_ignored_signals_streams_and_secrets_with_a_standby(tmp_path,
                                                                             standby_dir):
    """What a served command sees is what it would see in-process: signals ignored by nohup or a
    shell's `&` stay ignored (and a SIGHUP does not end it), ``PYTHONUNBUFFERED`` holds, stdin
    comes untranslated; the standby keeps no password of the command that started it."""
    config = tmp_path / "streams.py"
    config.write_text(STREAMS_PROBE)
    env = environment(standby_dir, REMOTE_RUNNER_PASSWORD="pw-of-the-first", PYTHONUNBUFFERED="1")
    argv = [sys.executable, SCRIPT, "-c", str(config), "--dry-run", "--no-connect"]

    def run(**popen):
        proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
        out, err = proc.communicate(b"a\r\nb\rc\n", timeout=120)
        return proc.pid, proc.returncode, out.decode(), err.decode()

    def ignoring():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    first_pid, code, out, err = run(preexec_fn=ignoring)
    assert code == 0, err
    here = streams_line(out)
    assert here[0] == first_pid  # in-process: what the standby's child must match
    sock = wait_for_socket(standby_dir)
    standby_pid = int(open(sock[:-len(".sock")] + ".pid").read())
    assert b"pw-of-the-first" not in open(f"/proc/{standby_pid}/environ", "rb").read()

    caller, code, out, err = run(preexec_fn=ignoring)
    assert code == 0, err
    served = streams_line(out)
    assert served[0] != caller, "the command ran in-process, not in the standby"
    assert served[1] == here[1] == "hup=True int=True through=True stdin='a\\r\\nb\\rc\\n'", out

    # a SIGHUP the caller ignores (nohup) does not end the served command
    proc = subprocess.Popen(argv, env=dict(env, PROBE_SLEEP="3"), cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=ignoring)
    time.sleep(1)
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def test_a_standby_started_by_a_nohup_command_gives_later_ones_their_own_signals(tmp_path,
                                                                                standby_dir):
    config = tmp_path / "streams.py"
    config.write_text(STREAMS_PROBE)
    argv = [sys.executable, SCRIPT, "-c", str(config), "--dry-run", "--no-connect"]

    def ignoring():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    subprocess.run(argv, env=environment(standby_dir), cwd=tmp_path, input=b"",
                   capture_output=True, preexec_fn=ignoring, timeout=120)  # starts the standby
    wait_for_socket(standby_dir)
    caller = subprocess.Popen(argv, env=environment(standby_dir), cwd=tmp_path,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    out, _ = caller.communicate(timeout=120)
    pid, rest = streams_line(out.decode())
    assert pid != caller.pid, "the command ran in-process, not in the standby"
    assert "hup=False int=False" in rest, rest


def test_a_command_with_stdin_closed_runs_in_process_instead_of_hanging(tmp_path, standby_dir):
    config = write_probe(tmp_path)
    run_classic(["-c", config, "--dry-run", "--no-connect"], environment(standby_dir), tmp_path)
    wait_for_socket(standby_dir)
    command = f"exec {sys.executable} {SCRIPT} -c {config} --dry-run --no-connect <&-"
    proc = subprocess.Popen(["sh", "-c", command], env=environment(standby_dir), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)  # (it hung: the socket became its stdin)
    # in-process, as without a standby: the probe's sys.stdin.readline() finds no stdin
    assert proc.returncode == 2, err
    assert "'NoneType' object has no attribute 'readline'" in err and "Traceback" not in err


def state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as src:
        return src.read().rsplit(")", 1)[1].split()[0]


def wait_for_state(pid: int, want: bool, state: str = "T") -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (state_of(pid) == state) is not want:
        time.sleep(0.02)
    assert (state_of(pid) == state) is want, f"pid {pid} is {state_of(pid)}"


def test_ctrl_z_stops_the_command_in_the_standby_and_fg_resumes_it(tmp_path, standby_dir):
    config = write_probe(tmp_path)
    run_classic(["-c", config, "--dry-run", "--no-connect"], environment(standby_dir), tmp_path)
    wait_for_socket(standby_dir)
    # Its own process group, whose parent (this process) is in the same session: never an
    # orphaned group, which the kernel does not let SIGTSTP stop (as when these tests run
    # from a background job of a shell).
    caller = subprocess.Popen([sys.executable, SCRIPT, "-c", config, "--dry-run", "--no-connect"],
                              env=environment(standby_dir, PROBE_SLEEP="60"), cwd=tmp_path,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, process_group=0)
    try:
        child = probe_line(caller.stdout.readline())[0]
        assert child != caller.pid
        caller.send_signal(signal.SIGTSTP)
        wait_for_state(caller.pid, True)
        wait_for_state(child, True)
        caller.send_signal(signal.SIGCONT)
        wait_for_state(caller.pid, False)
        wait_for_state(child, False)
        caller.send_signal(signal.SIGINT)
        assert caller.wait(timeout=30) == 130
    finally:
        if caller.poll() is None:
            caller.kill()
        caller.stdout.close()


def test_a_standby_stops_cleanly_and_the_next_command_runs_in_process(tmp_path, standby_dir):
    config = write_probe(tmp_path)
    run_classic(["-c", config, "--dry-run", "--no-connect"], environment(standby_dir), tmp_path)
    sock = wait_for_socket(standby_dir)
    pid_file = sock[:-len(".sock")] + ".pid"
    with open(pid_file) as src:
        os.kill(int(src.read()), signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(sock):
        time.sleep(0.05)
    assert not os.path.exists(sock) and not os.path.exists(pid_file)
    assert not os.path.exists(sock[:-len(".sock")] + ".lock")
    caller, code, out, _ = run_classic(["-c", config, "--dry-run", "--no-connect"],
                                       environment(standby_dir), tmp_path)
    assert code == 0 and probe_line(out)[0] == caller
    wait_for_socket(standby_dir)  # it started a new one: stopped by the fixture, by its pid


def test_commands_that_need_this_terminal_or_process_are_not_served(monkeypatch):
    monkeypatch.setenv(standby.ENV, "60")
    assert standby.wanted("classic", ["-c", "x.py"])
    assert standby.wanted("tool", ["status"])
    assert not standby.wanted("classic", ["-c", "x.py", "--ask-pass"])
    assert not standby.wanted("tool", ["run", "-c", "x.py", "--ask-pass"])
    for command in ("attach", "lab"):
        assert not standby.wanted("tool", [command, "h1"])
    # exec: only when its input is not a terminal (an interactive command keeps it here)
    assert standby.wanted("tool", ["exec", "h1", "true"]) is (not os.isatty(0))
    monkeypatch.setenv(standby.ENV, "0")
    assert not standby.wanted("classic", ["-c", "x.py"])
    assert standby.idle_seconds({standby.ENV: "90"}) == 90.0
    assert standby.idle_seconds({}) == standby.DEFAULT_IDLE
    assert standby.idle_seconds({standby.ENV: "off"}) is None


def test_the_directory_must_be_this_users_alone(tmp_path):
    made = tmp_path / "made"
    assert names.private_directory(str(made), create=True)
    assert os.stat(made).st_mode & 0o777 == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o755)
    assert not names.private_directory(str(open_dir), create=False)
    link = tmp_path / "link"
    link.symlink_to(made)
    assert not names.private_directory(str(link), create=False)


def test_the_socket_name_follows_what_the_imports_depend_on():
    assert standby.fingerprint({"LANG": "C"}) == standby.fingerprint({"LANG": "C"})
    assert standby.fingerprint({"LANG": "C"}) != standby.fingerprint({"LANG": "C.UTF-8"})
    assert standby.fingerprint({"PYTHONPATH": "/a"}) != standby.fingerprint({})
    # an edit of any of the package's files (and only of those: not the whole checkout's)
    edited = os.path.join(os.path.dirname(os.path.dirname(standby.__file__)), "errors.py")
    st = os.stat(edited)
    try:
        os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        changed = standby.fingerprint({})
    finally:
        os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert changed != standby.fingerprint({})
    files = names.package_files(os.path.dirname(os.path.dirname(standby.__file__)))
    assert ("errors.py", st.st_mtime_ns, st.st_size) in files
    assert not any(name.startswith(("tests", ".venv", "bench")) for name, _, _ in files)
    import resource  # a caller with other limits must not get a child with the standby's
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = standby.fingerprint({})
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(64, soft // 2), hard))
    try:
        assert standby.fingerprint({}) != before
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert standby.fingerprint({}) == before


PYTHON = shutil.which("python3", path="/usr/bin:/bin") or ""


@pytest.mark.skipif(os.geteuid() != 0 or not PYTHON, reason="needs root and /usr/bin/python3")
def test_another_user_is_refused(tmp_path):
    folder = tempfile.mkdtemp(prefix="rrpeer-", dir="/tmp")
    try:
        os.chmod(folder, 0o777)
        path = os.path.join(folder, "s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o777)
        listener.listen(1)
        code = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r}); s.recv(1)"
        for uid in (0, 65534):  # the system's python: this one may be in a home nobody can read
            other = subprocess.Popen([PYTHON, "-c", code], user=uid)
            conn, _ = listener.accept()
            assert server.same_user(conn) is (uid == os.getuid())
            conn.close()
            other.wait(timeout=30)
        listener.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.lab
def test_a_real_run_and_its_status_through_the_standby(lab, screen_name, tmp_path, standby_dir):
    """On lab hosts: the rerun the standby serves replaces the session as an in-process run does."""
    from tests.conftest import quit_screen, ssh

    state = f"/tmp/{screen_name}-state"
    config = tmp_path / "experiment.py"
    config.write_text(PROBE.format(start="c.start_index = 1").replace(
        'c.executable = "/bin/true"', 'c.executable = "/bin/sleep"; c.args = ["600"]'))
    env = environment(standby_dir, REMOTE_RUNNER_RUNS=str(tmp_path / "runs"))
    common = ["-F", lab.ssh_config, "--screen", screen_name, "--remote-done-dir", state]

    def remote_runner(*args):
        proc = subprocess.Popen([sys.executable, "-m", "remote_runner", *args], env=env, cwd=tmp_path,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=300)
        return proc.pid, proc.returncode, out, err

    try:
        pids = []
        for _ in range(2):
            caller, code, out, err = remote_runner("run", "-c", str(config), "--settle", "0", *common)
            assert code == 0, err
            pids.append((caller, probe_line(out)[0]))
            wait_for_socket(standby_dir)
        assert pids[0][0] == pids[0][1] and pids[1][0] != pids[1][1]  # here, then the standby
        _, code, out, err = remote_runner("status", "--json")
        assert code == 0, err
        assert [c["state"] for c in json.loads(out)["components"]] == ["running"]
        sessions = ssh(lab, "h1", f"screen -ls {screen_name}", check=False).stdout
        assert sessions.count(f".{screen_name}\t") == 1, sessions  # the first run's was replaced
    finally:
        quit_screen(lab, "h1", screen_name, state)


def children_of(pid: int):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as src:
                    if f"\nPPid:\t{pid}\n" in src.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.lab
def test_exec_through_the_standby_streams_stdin_and_returns_the_status(lab, tmp_path, standby_dir):
    """The mirror's exec (stdin not a terminal) runs in the standby's child: input reaches the
    remote command while it runs, its output comes back, its status is the caller's."""
    script = "read a; echo got $a; read b; echo then $b; exit 3"
    argv = [sys.executable, "-m", "remote_runner", "exec", "-F", lab.ssh_config, "h1", "sh", "-c", script]
    env = environment(standby_dir)
    first = subprocess.run(argv, env=env, cwd=tmp_path, input="x\ny\n", capture_output=True,
                           text=True, timeout=300)
    assert (first.returncode, first.stdout) == (3, "got x\nthen y\n"), first.stderr
    sock = wait_for_socket(standby_dir)
    with open(sock[:-len(".sock")] + ".pid") as src:
        server = int(src.read())
    caller = subprocess.Popen(argv, env=env, cwd=tmp_path, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        caller.stdin.write("hello\n")
        caller.stdin.flush()
        assert caller.stdout.readline() == "got hello\n"
        assert children_of(server), "the command is not running in the standby's child"
        out, err = caller.communicate("world\n", timeout=300)
    finally:
        if caller.poll() is None:
            caller.kill()
    assert (caller.returncode, out) == (3, "then world\n"), err


def test_a_stopped_standby_costs_a_few_seconds_and_holds_nothing_of_the_command(tmp_path,
                                                                                standby_dir):
    """A standby that does not answer (stopped here with SIGSTOP) gets nothing of a command: it
    runs in-process after TAKE_TIMEOUT and its output pipe ends with it (the descriptors sent
    ahead stayed open in the stopped standby's socket queue: a pipeline waited for ever)."""
    config = write_probe(tmp_path)
    run_classic(["-c", config, "--dry-run", "--no-connect"], environment(standby_dir), tmp_path)
    sock = wait_for_socket(standby_dir)
    standby_pid = int(open(sock[:-len(".sock")] + ".pid").read())
    os.kill(standby_pid, signal.SIGSTOP)
    try:
        caller, code, out, err = run_classic(["-c", config, "--dry-run", "--no-connect"],
                                             environment(standby_dir), tmp_path, stdin="x\n")
        assert code == 0, err
        assert probe_line(out)[0] == caller  # in-process, and communicate() saw the pipe end
    finally:
        os.kill(standby_pid, signal.SIGCONT)
