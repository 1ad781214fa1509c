"""Screen sessions, windows and launchers: pure checks plus real screen on lab hosts.

The lab tests drive :class:`remote_runner.screen.Screen` through a real SSH
connection and check the result with the system OpenSSH client (``ssh`` from
conftest), an independent witness. Every session uses a unique name and is
quit at the end.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time

import pytest

from remote_runner import screen as scr
from remote_runner.errors import ConfigError, StartError
from remote_runner.shell import LocalShell, RemoteShell
from remote_runner.ssh import Connection, SSHOptions
from tests.conftest import quit_screen, ssh

ODD_ARGS = ["$HOME", "a;b", "it's", 'say "hi"', "two  spaces", "back\\slash", "ünïcødé ✓",
            "`id`", "$(id)", "*", "", "-n", "%n"]

LS_OUTPUT = """There are screens on:
\t4242.runner2\t(11/22/26 04:14:34)\t(Detached)
\t4243.runner\t(11/22/26 04:14:35)\t(Detached)
\t4244.xrunner\t(11/22/26 04:14:35)\t(Attached)
3 Sockets in /run/screen/S-root.
"""


def test_parse_sessions_matches_exact_names_only():
    assert scr.parse_sessions(LS_OUTPUT, "runner") == ["4243.runner"]
    assert scr.parse_sessions(LS_OUTPUT, "run") == []
    assert scr.parse_sessions("No Sockets found in /run/screen/S-root.\n", "runner") == []


@pytest.mark.parametrize("name", ["", "a b", "-x", "a$b", "a/b", ".hidden", "x" * 81, "a'b"])
def test_bad_session_names_are_config_errors(name):
    with pytest.raises(ConfigError) as info:
        scr.validate_session_name(name)
    assert info.value.field == "--screen"


def test_file_stem_is_safe_and_distinct():
    assert scr.file_stem("server") == "server"
    odd = scr.file_stem("my comp $x")
    assert odd.startswith("my_comp_x-") and "/" not in odd and " " not in odd
    assert scr.file_stem("a b") != scr.file_stem("a_b")


def test_escape_x_protects_dollar_and_backslash():
    assert scr.escape_x("a$HOME\\b") == "a\\$HOME\\\\b"


def test_state_dir_with_quote_is_rejected():
    with pytest.raises(ConfigError):
        scr.check_state_dir("/tmp/it's", "h1")
    with pytest.raises(ConfigError):
        scr.check_state_dir("relative/dir", "h1")


def test_window_groups_are_found_through_the_children_list_and_without_it():
    # A parent with three children that each lead their own process group (as screen's
    # windows do) and one that does not: both ways list exactly the three leaders.
    parent = subprocess.Popen(["sh", "-c", "setsid sleep 60 & setsid sleep 60 & setsid sleep 60 & "
                               "sleep 60 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = open(f"/proc/{parent.pid}/task/{parent.pid}/children").read().split()
            if len(kids) == 4:
                break
            time.sleep(0.05)
        time.sleep(0.2)  # (setsid has run in each)
        listed = {}
        for way, script in (("children", scr._window_groups(str(parent.pid))),
                            ("scan", scr._window_groups(str(parent.pid), children="/nonexistent"))):
            out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30).stdout
            listed[way] = sorted(out.split("\n")[:-1])
        leaders = sorted(f"{k} {parent.pid}" for k in kids if os.getpgid(int(k)) == int(k))
        assert len(leaders) == 3
        assert listed["children"] == listed["scan"] == leaders
    finally:
        os.killpg(parent.pid, 9)
        for k in kids:
            try:
                os.killpg(int(k), 9)
            except OSError:
                pass
        parent.wait()


def test_launcher_runs_argv_byte_exact_and_records_status(tmp_path):
    """Run a launcher locally (no screen): cwd, argv, pid and status files."""
    state = tmp_path / "state"
    state.mkdir()
    work = tmp_path / "work dir"
    work.mkdir()
    out = tmp_path / "argv.txt"
    window = scr.Window("t", "comp", str(state))
    argv = ["/bin/sh", "-c", 'pwd > "$0"; printf "%s\\n" "$@" >> "$0"; exit 7', str(out), *ODD_ARGS]
    (state / "comp.launch").write_text(scr.launcher_text(window, argv, str(work), "comp"))
    proc = subprocess.run(["/bin/sh", str(state / "comp.launch")], env={"PATH": "/usr/bin:/bin"},
                          check=False)
    assert proc.returncode == 7
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[0] == str(work)
    assert lines[1:-1] == ODD_ARGS
    assert (state / "comp.status").read_text().strip() == "7"
    assert int((state / "comp.pid").read_text()) > 1


def test_launcher_missing_executable_is_127(tmp_path):
    window = scr.Window("t", "gone", str(tmp_path))
    launcher = tmp_path / "gone.launch"
    launcher.write_text(scr.launcher_text(window, ["./does-not-exist"], str(tmp_path), "gone"))
    proc = subprocess.run(["/bin/sh", str(launcher)], capture_output=True, check=False)
    assert proc.returncode == 127
    assert (tmp_path / "gone.status").read_text().strip() == "127"


# --------------------------------------------------------------------------- lab

@pytest.fixture
def conn(lab):
    connection = Connection("h1", SSHOptions(ssh_config_file=lab.ssh_config)).connect()
    yield connection
    connection.close()


@pytest.fixture
def session(lab, conn, screen_name):
    """A Screen on h1 with its own state dir; quit (and removed) afterwards."""
    shell = RemoteShell(conn, "h1")
    state = f"/tmp/{screen_name}-state"
    shell.script(f"mkdir -p {state}", timeout=30)
    s = scr.Screen(shell, screen_name, state)
    yield s
    quit_screen(lab, "h1", screen_name, state)


def write_launcher(shell, window, argv, cwd="/tmp"):
    """Write *window*'s launcher on the host."""
    result = shell.script(scr.heredoc_write(window.launcher,
                                            scr.launcher_text(window, argv, cwd, window.title)),
                          timeout=30)
    assert result.exit_status == 0, result.stderr


def sessions_named(lab, host, name):
    out = ssh(lab, host, "screen -ls", check=False).stdout
    return scr.parse_sessions(out, name)


def poll(predicate, what, timeout=60.0):
    """Poll *predicate* until truthy (the log flush of screen is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_windows_with_titles_in_one_session(lab, session, screen_name):
    shell = session.shell
    titles = ["first", "se$cond win", "third"]
    windows = [scr.Window(t, scr.file_stem(t), session.state_dir) for t in titles]
    for w in windows:
        write_launcher(shell, w, ["/bin/sleep", "600"])
    pids = session.start(windows[:1])
    pids.update(session.start(windows[1:]))
    assert set(pids) == {w.stem for w in windows}
    ids = sessions_named(lab, "h1", screen_name)
    assert ids == [session.session_id]
    listing = ssh(lab, "h1", f"screen -S {ids[0]} -Q windows").stdout
    for title in titles:
        assert title in listing
    # the recorded pid is the window's process group: kill it and the status appears
    ssh(lab, "h1", f"kill -TERM -{pids['third']}")
    status = poll(lambda: ssh(lab, "h1", f"cat {windows[2].status_file}", check=False).stdout.strip(),
                  "status of the terminated window")
    assert status == "143"


def test_args_reach_program_byte_exact_and_output_is_logged(lab, session):
    shell = session.shell
    w = scr.Window("echo", "echo", session.state_dir)
    out = f"{session.state_dir}/argv.txt"
    write_launcher(shell, w, ["/bin/sh", "-c", 'printf "%s\\n" "$@" > "$0"; echo "logged: $1"',
                              out, *ODD_ARGS], cwd=session.state_dir)
    session.start([w])
    status = poll(lambda: ssh(lab, "h1", f"cat {w.status_file}", check=False).stdout.strip(),
                  "exit status")
    assert status == "0"
    got = ssh(lab, "h1", f"cat {out}").stdout.split("\n")[:-1]
    assert got == ODD_ARGS
    log = poll(lambda: ssh(lab, "h1", f"cat {w.log_file}", check=False).stdout, "log content")
    assert "logged: $HOME" in log
    # zombie mode from the rc file keeps the finished window (flag Z)
    listing = ssh(lab, "h1", f"screen -S {session.session_id} -Q windows").stdout
    assert "Z echo" in listing


def test_kill_quits_and_adopt_reuses(lab, session, screen_name):
    w1 = scr.Window("one", "one", session.state_dir)
    write_launcher(session.shell, w1, ["/bin/sleep", "600"])
    session.start([w1])
    first = session.session_id
    other = scr.Screen(session.shell, screen_name, session.state_dir)
    assert other.adopt() == first
    w2 = scr.Window("two", "two", session.state_dir)
    write_launcher(session.shell, w2, ["/bin/sleep", "600"])
    other.start([w2])
    assert sessions_named(lab, "h1", screen_name) == [first]
    listing = ssh(lab, "h1", f"screen -S {first} -Q windows").stdout
    assert "one" in listing and "two" in listing
    assert other.kill() == [first]
    assert sessions_named(lab, "h1", screen_name) == []


def _dead_session(lab, name):
    """Leave a dead session called *name* on h1: its screen killed, its socket left behind."""
    ssh(lab, "h1", f"screen -dmS {name} sleep 600")
    [dead] = poll(lambda: sessions_named(lab, "h1", name), "the session to be listed")
    pid = dead.split(".")[0]  # the screen process and its window's, by pid
    ssh(lab, "h1", f"kill -9 {pid} $(cat /proc/{pid}/task/{pid}/children)", check=False)
    poll(lambda: "Dead" in ssh(lab, "h1", "screen -ls", check=False).stdout, "the session to be dead")
    return dead


@pytest.mark.parametrize("replace", ["kill", "adopt"])
def test_a_dead_session_is_wiped_not_adopted_or_reported_quit(lab, session, screen_name, replace):
    """The start lists sessions with ``screen -wipe``, which prints the dead ones as removed."""
    dead = _dead_session(lab, screen_name)
    w = scr.Window("one", "one", session.state_dir)
    write_launcher(session.shell, w, ["/bin/sleep", "600"])
    wave = session.start_wave([w], replace=replace)
    assert wave.quit == [] and not wave.adopted
    assert session.session_id != dead and sessions_named(lab, "h1", screen_name) == [session.session_id]
    assert "Dead" not in ssh(lab, "h1", "screen -ls", check=False).stdout


def test_no_zombie_lets_window_close(lab, conn, screen_name):
    shell = RemoteShell(conn, "h1")
    state = f"/tmp/{screen_name}-nz"
    shell.script(f"mkdir -p {state}", timeout=30)
    s = scr.Screen(shell, screen_name, state, zombie=False)
    try:
        keep = scr.Window("keep", "keep", state)
        quick = scr.Window("quick", "quick", state)
        write_launcher(shell, keep, ["/bin/sleep", "600"])
        write_launcher(shell, quick, ["/bin/true"])
        s.start([keep, quick])
        poll(lambda: "quick" not in s.windows(), "the finished window to close")
        assert "keep" in s.windows()
    finally:
        s.kill()
        shell.script(f"rm -rf {state}", timeout=30)


def test_window_that_cannot_start_is_a_start_error(lab, session):
    session.start_timeout = 2
    w = scr.Window("ghost", "ghost", session.state_dir)  # no launcher written
    with pytest.raises(StartError) as info:
        session.start([w])
    assert "ghost" in str(info.value) and "h1" in str(info.value)


def test_local_session_without_ssh(tmp_path, screen_name):
    state = str(tmp_path)
    s = scr.Screen(LocalShell(), screen_name, state)
    w = scr.Window("local", "local", state)
    (tmp_path / "local.launch").write_text(
        scr.launcher_text(w, ["/bin/sh", "-c", "exit 4"], state, "local"))
    try:
        s.start([w])
        assert poll(lambda: (tmp_path / "local.status").exists(), "status") and \
            (tmp_path / "local.status").read_text().strip() == "4"
        out = subprocess.run(["screen", "-ls"], capture_output=True, text=True).stdout
        assert scr.parse_sessions(out, screen_name) == [s.session_id]
    finally:
        s.kill()
    out = subprocess.run(["screen", "-ls"], capture_output=True, text=True).stdout
    assert scr.parse_sessions(out, screen_name) == []


def test_quoting_helper_round_trip(tmp_path):
    target = tmp_path / "x y'z"
    script = scr.heredoc_write(str(target), "line $HOME `id`\nRR_EOF\n", mode="755")
    subprocess.run(["/bin/sh", "-c", script], check=True)
    assert target.read_text() == "line $HOME `id`\nRR_EOF\n"
    assert oct(target.stat().st_mode & 0o777) == "0o755"
    assert shlex.quote(str(target)) in script


def launched(tmp_path, stem, argv):
    """Start a launcher for *argv* locally in the background (no screen) and return its Window."""
    window = scr.Window(stem, stem, str(tmp_path))
    path = tmp_path / f"{stem}.launch"
    path.write_text(scr.launcher_text(window, argv, str(tmp_path), stem))
    proc = subprocess.Popen(["/bin/sh", str(path)], start_new_session=True)
    threading.Thread(target=proc.wait, daemon=True).start()  # reap like screen does
    poll(lambda: (tmp_path / f"{stem}.pid").exists(), "pid file")
    return window, proc


def test_poll_and_stop_windows_by_process_group(tmp_path):
    """Status polling and TERM/KILL of process groups, on launchers run by a local shell."""
    shell = LocalShell()
    quick, p1 = launched(tmp_path, "quick", ["/bin/sh", "-c", "exit 5"])
    soft, p2 = launched(tmp_path, "soft", ["/bin/sleep", "600"])
    hard, p3 = launched(tmp_path, "hard", ["/bin/sh", "-c", "trap '' TERM; sleep 600 & wait"])
    try:
        p1.wait(timeout=60)
        states = scr.poll_windows(shell, [quick, soft, hard], seconds=0.5)
        assert states == {"quick": ("DONE", "5"), "soft": ("RUNNING", "-"),
                          "hard": ("RUNNING", "-")}
        # returns once the group is gone; a window whose program ended is not "stopped"
        assert scr.stop_windows(shell, [soft, quick], grace=120) == scr.Stopped(["soft"], [])
        assert scr.stop_windows(shell, [hard], grace=0.5) == scr.Stopped(["hard"], ["hard"])
        assert p2.wait(timeout=60) == 143
        p3.wait(timeout=60)
        assert (tmp_path / "soft.status").read_text().strip() == "143"
        states = scr.poll_windows(shell, [soft, hard], seconds=0.5)
        assert states["soft"] == ("DONE", "143") and states["hard"][0] == "GONE"
    finally:
        for proc in (p1, p2, p3):
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()


def test_a_components_own_settle_time_outweighs_the_runs(tmp_path):
    """The health check judges each window by its own settle time, else by the run's."""
    from remote_runner.hostops import HealthCheck, check_health, health_time
    shell = LocalShell()
    late, p1 = launched(tmp_path, "late", ["/bin/sh", "-c", "sleep 2; exit 3"])
    steady, p2 = launched(tmp_path, "steady", ["/bin/sleep", "600"])
    try:
        # by the run's --settle 0 alone, both are started at once (the late death is unseen)
        plain = [HealthCheck(w, str(tmp_path), None, 60.0, False) for w in (late, steady)]
        assert {s: h.verdict for s, h in check_health(shell, plain, 0).items()} == {
            "late": "READY", "steady": "READY"}
        # its own 30 s keeps "late" under watch until it dies: a failed start, exit 3
        own = [HealthCheck(late, str(tmp_path), None, 60.0, False, settle=30.0), plain[1]]
        assert health_time(own, 0) == 30.0
        verdicts = check_health(shell, own, 0)
        assert verdicts["late"].verdict == "DEAD" and verdicts["late"].status == 3
        assert verdicts["steady"].verdict == "READY"
    finally:
        for proc in (p1, p2):
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            proc.wait()


def test_a_run_directory_is_made_and_only_the_newest_runs_are_kept(tmp_path):
    from remote_runner.hostops import KEEP_RUNS, prepare_run_script
    state = tmp_path / "state dir"  # (a space: every path word is quoted)
    (state / "runs").mkdir(parents=True)
    old = [f"20260101-0000{i:02d}-abcd" for i in range(KEEP_RUNS + 3)]
    for name in old:
        (state / "runs" / name).mkdir()

    def prepare(run_id):
        script = f'd={shlex.quote(str(state))}\n' + prepare_run_script('"$d"', run_id)
        subprocess.run(["/bin/sh", "-c", script], check=True, timeout=30)
        return sorted(os.listdir(state / "runs"))

    kept = prepare("20261202-000000-ffff")
    assert kept == old[-(KEEP_RUNS - 1):] + ["20261202-000000-ffff"]  # the oldest went
    assert os.readlink(state / "latest") == "runs/20261202-000000-ffff"
    # a run whose id sorts first (this machine's clock behind) is kept, and the oldest others go
    kept = prepare("20250101-000000-0000")
    assert kept == ["20250101-000000-0000"] + old[-(KEEP_RUNS - 1):] + ["20261202-000000-ffff"]
    few = tmp_path / "few"
    state = few
    (state / "runs" / "20260101-000000-aaaa").mkdir(parents=True)
    assert prepare("20260101-000001-bbbb") == ["20260101-000000-aaaa", "20260101-000001-bbbb"]
