"""The life of an experiment on lab hosts: healthy start, the session lock, status, logs, stop,
restart, fetch, as a user drives them through ``remote-runner`` in a subprocess.

Every test gets its own screen name, remote state directory and local run-record
directory (``$REMOTE_RUNNER_RUNS``), so it never sees another test's runs; the
outcome is judged by exit codes and messages, and by what the system OpenSSH
client finds on the hosts.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.conftest import quit_screen, ssh

HOSTS = ("h1", "h2", "h3")


@pytest.fixture
def env(lab, screen_name, tmp_path):
    state = f"/tmp/{screen_name}-state"
    runs = tmp_path / "runs"
    yield {"screen": screen_name, "state": state, "tmp": tmp_path, "runs": str(runs),
           "base": f"/tmp/{screen_name}-base", "lab": lab}
    for host in HOSTS:
        quit_screen(lab, host, screen_name, state, f"/tmp/{screen_name}-base*")


def rr(env, *args, timeout=300, check=None):
    """Run ``remote-runner ARGS`` with this test's run records; return the CompletedProcess."""
    full = {k: v for k, v in os.environ.items() if k != "REMOTE_RUNNER_PASSWORD"}
    full["REMOTE_RUNNER_RUNS"] = env["runs"]
    out = subprocess.run([sys.executable, "-m", "remote_runner", *args], capture_output=True,
                         text=True, timeout=timeout, env=full)
    if check is not None:
        assert out.returncode == check, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def start(env, body: str, *extra, check=None):
    """Write *body* as a config and run it on the lab; return the CompletedProcess."""
    path = env["tmp"] / "experiment.py"
    path.write_text(textwrap.dedent(body))
    return rr(env, "run", "-c", str(path), "-F", env["lab"].ssh_config, "--screen", env["screen"],
              "--remote-done-dir", env["state"], *extra, check=check)


def record(env):
    with open(os.path.join(env["runs"], "latest", "record.json")) as src:
        return json.load(src)


def port() -> int:
    return random.randint(20000, 60000)


def on(env, host, command, check=False):
    return ssh(env["lab"], host, command, check=check)


# --------------------------------------------------------------------------- healthy start

def test_component_that_exits_at_once_stops_the_run_before_the_next_index(env):
    out = start(env, """
        s = Component(name='server', host='h1', executable='no-such-server-program',
                      args=['--port', '1'], start_index=0)
        config.add_component(s)
        c = Component(name='client', host='h2', executable='/bin/sleep', args=['600'],
                      start_index=1)
        config.add_component(c)
    """)
    assert out.returncode == 6, out.stderr
    assert "component 'server'" in out.stderr and "exited 127" in out.stderr
    # the launcher's own line names the host and its PATH, and the log tail shows it
    assert "no-such-server-program is neither in" in out.stderr and "PATH=" in out.stderr
    assert "later start indexes not started" in out.stderr
    assert on(env, "h2", f"ls {env['state']}/latest/client.pid").returncode != 0
    rec = record(env)
    server = next(c for c in rec["components"] if c["name"] == "server")
    assert server["state"] == "exited 127" and server["exit_status"] == 127
    assert rec["finished"]
    status = rr(env, "status", "--json")
    states = {c["name"]: c["state"] for c in json.loads(status.stdout)["components"]}
    assert status.returncode == 5 and states == {"server": "exited 127", "client": "not started"}


@pytest.mark.parametrize("host", ["h1", "h9"])
def test_a_program_that_dies_inside_the_settle_time_is_a_failed_start(env, host, request):
    # the settle clock counts centiseconds: with whole seconds, a check that began late in a
    # second passed at the next boundary, before this program's death at 0.5 s
    if host == "h9":
        host = request.getfixturevalue("foreign_host")  # (up even when this test runs alone)
    try:
        out = start(env, f"""
            s = Component(name='flaky', host='{host}', executable='/bin/sh',
                          args=['-c', 'sleep 0.5; exit 3'], start_index=0)
            config.add_component(s)
        """, "--settle", "1")
        assert out.returncode == 6, out.stdout + out.stderr
        assert "component 'flaky'" in out.stderr and "exited 3" in out.stderr
    finally:
        quit_screen(env["lab"], host, env["screen"], env["state"])


def test_a_components_own_settle_holds_under_a_shorter_run_settle_and_on_restart(env):
    # --settle 0 alone would call it started; its own settle watches it until it dies at 1 s
    try:
        out = start(env, """
            s = Component(name='slow', host='h2', executable='/bin/sh',
                          args=['-c', 'sleep 1; exit 3'], start_index=0)
            s.settle = 5
            config.add_component(s)
        """, "--settle", "0")
        assert out.returncode == 6, out.stdout + out.stderr
        assert "component 'slow'" in out.stderr and "exited 3" in out.stderr
        assert record(env)["components"][0]["settle"] == 5
        # restart judges it by the same rule (the record keeps the component's settle)
        again = rr(env, "restart", "slow", "--settle", "0", "--grace", "5")
        assert again.returncode == 6 and "exited 3" in again.stderr, again.stdout + again.stderr
    finally:
        quit_screen(env["lab"], "h2", env["screen"], env["state"])


def test_component_that_never_becomes_ready_stops_the_run(env):
    p = port()
    out = start(env, f"""
        s = Component(name='server', host='h1', executable='/bin/sh',
                      args=['-c', 'echo booting; exec sleep 600'], start_index=0,
                      ready='tcp:{p}', ready_timeout=2)
        config.add_component(s)
        c = Component(name='client', host='h2', executable='/bin/sleep', args=['600'],
                      start_index=1)
        config.add_component(c)
    """)
    assert out.returncode == 6, out.stderr
    assert f"did not become ready (tcp:{p}) within 2 s" in out.stderr
    assert "booting" in out.stderr  # the end of its log
    assert on(env, "h2", f"ls {env['state']}/latest/client.pid").returncode != 0


def test_ready_server_is_waited_for_by_the_next_index(env):
    p = port()
    # the server takes a while to listen; the client only succeeds if it is listening
    start(env, f"""
        s = Component(name='server', host='h1', executable='/bin/sh',
                      args=['-c', 'sleep 2; echo listening now; exec python3 -m http.server {p}'],
                      start_index=0, ready='tcp:{p}', ready_timeout=60)
        config.add_component(s)
        w = Component(name='logger', host='h3', executable='/bin/sh',
                      args=['-c', 'sleep 1; echo service up; exec sleep 600'],
                      start_index=0, ready='log:service +up')
        config.add_component(w)
        c = Component(name='client', host='h2', executable='python3', start_index=1, wait=True,
                      args=['-c', 'import urllib.request as u; u.urlopen("http://h1:{p}/")'])
        config.add_component(c)
    """, check=0)
    rec = record(env)
    states = {c["name"]: (c["state"], c["exit_status"]) for c in rec["components"]}
    assert states["client"] == ("exited 0", 0)
    assert states["server"] == ("running", None) and states["logger"] == ("running", None)


# --------------------------------------------------------------------------- the session lock

def test_same_screen_twice_at_once_is_refused_with_the_holder(env):
    first_box = {}

    def first():
        first_box["out"] = start(env, """
            j = Component(name='job', host='h1', executable='/bin/sh',
                          args=['-c', 'sleep 8; exit 4'], start_index=0, wait=True)
            config.add_component(j)
        """)
    thread = threading.Thread(target=first)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while on(env, "h1", f"test -s {env['state']}/latest/job.pid").returncode != 0:
            assert time.monotonic() < deadline, "first run never started its job"
            time.sleep(0.2)
        second_config = env["tmp"] / "second.py"
        second_config.write_text(textwrap.dedent("""
            j = Component(name='job', host='h1', executable='/bin/sh', args=['-c', 'exit 0'],
                          start_index=0, wait=True)
            config.add_component(j)
        """))
        second = rr(env, "run", "-c", str(second_config), "-F", env["lab"].ssh_config,
                    "--screen", env["screen"], "--remote-done-dir", env["state"])
    finally:
        thread.join(timeout=300)
    assert second.returncode == 6, second.stderr
    assert "already in use by a running remote-runner" in second.stderr
    assert "pid " in second.stderr and " run 2" in second.stderr and "since" in second.stderr
    # the first run was not disturbed: it reports its own job's status, not the second's
    assert first_box["out"].returncode == 5, first_box["out"].stderr
    assert "exited with status 4" in first_box["out"].stderr
    # and once it has ended, the lock is free again
    start(env, """
        j = Component(name='job', host='h1', executable='/bin/true', start_index=0, wait=True)
        config.add_component(j)
    """, check=0)


# --------------------------------------------------------------------------- status, logs, stop

TICKER = "i=0; while true; do i=$((i+1)); echo \"$0 tick $i\"; sleep 0.5; done"


def ticking(env, extra="", *flags, check=0):
    """Start a server on h1 (ready by its log), clients on h2 and h3, and *extra* components."""
    return start(env, textwrap.dedent(f"""
        s = Component(name='server', host='h1', executable='/bin/sh',
                      args=['-c', {TICKER!r}, 'server'], start_index=0, ready='log:server tick 2')
        config.add_component(s)
        for h in ('h2', 'h3'):
            c = Component(name='client', host=h, executable='/bin/sh',
                          args=['-c', {TICKER!r}, 'client'], start_index=1)
            config.add_component(c)
    """) + textwrap.dedent(extra), *flags, check=check)


def status_json(env, *args):
    out = rr(env, "status", "--json", *args)
    data = json.loads(out.stdout)
    return out.returncode, {f"{c['host']}/{c['name']}": c for c in data["components"]}


def test_status_logs_and_stop(env):
    ticking(env, """
        v = Component(name='victim', host='h1', executable='/bin/sleep', args=['600'],
                      start_index=1)
        config.add_component(v)
        j = Component(name='job', host='h3', executable='/bin/sh', args=['-c', 'echo job done'],
                      start_index=1, wait=True)
        config.add_component(j)
    """)
    code, rows = status_json(env)
    assert code == 0, rows
    assert {k: r["state"] for k, r in rows.items()} == {
        "h1/server": "running", "h2/client": "running", "h3/client": "running",
        "h1/victim": "running", "h3/job": "exited 0"}
    assert rows["h1/server"]["uptime"] is not None and "server tick" in rows["h1/server"]["last_line"]
    # the program's own last line, not screen's "=== Command terminated ..." below it
    assert rows["h3/job"]["last_line"] == "job done", rows["h3/job"]
    # a component killed by a signal (its program, not the launcher)
    on(env, "h1", f"pkill -KILL -P $(cat {env['state']}/latest/victim.pid)", check=True)
    assert wait_until(lambda: status_json(env)[1]["h1/victim"]["state"] == "killed by SIGKILL")
    code, rows = status_json(env)
    assert code == 5 and rows["h1/victim"]["ended"]
    table = rr(env, "status").stdout
    assert "killed by SIGKILL" in table and "h2" in table and "client tick" in table

    # logs: each line prefixed host/name, only the components asked for
    out = rr(env, "logs", "-n", "2", "client", check=0).stdout.splitlines()
    assert len(out) == 4 and {line.split(" | ")[0].strip() for line in out} == {"h2/client",
                                                                                "h3/client"}
    assert all("client tick" in line.split(" | ", 1)[1] for line in out)

    # stop one component: the rest keep running, its session stays
    said = rr(env, "stop", "h2/client", "--grace", "5", check=0)
    assert "h2/client: stopped" in said.stderr, said.stderr
    code, rows = status_json(env)
    assert rows["h2/client"]["state"] == "killed by SIGTERM"
    assert rows["h3/client"]["state"] == "running" and rows["h1/server"]["state"] == "running"
    # stop by host; then everything: no session left anywhere
    rr(env, "stop", "--host", "h1", "--grace", "5", check=0)
    assert status_json(env)[1]["h1/server"]["state"] == "killed by SIGTERM"
    said = rr(env, "stop", "--grace", "5", check=0)
    # what had ended before (killed, stopped) is not claimed stopped again
    assert "h1/victim: was not running" in said.stderr and "h2/client: was not running" in said.stderr
    assert "h3/client: stopped" in said.stderr, said.stderr
    for host in HOSTS:
        assert env["screen"] not in on(env, host, "screen -ls").stdout, host
    rec = record(env)
    assert all(c["ended"] for c in rec["components"])


def wait_until(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


def test_logs_follow_interleaves_hosts_on_one_connection_each(env):
    ticking(env)
    proc = subprocess.Popen([sys.executable, "-m", "remote_runner", "logs", "-f", "-n", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "REMOTE_RUNNER_RUNS": env["runs"]})
    seen = set()
    lines = []
    try:
        deadline = time.monotonic() + 60
        while len(seen) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            seen.add(line.split(" | ")[0].strip())
        # one ssh connection per host: the run's sshd on each host sees one session from us
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert seen >= {"h1/server", "h2/client", "h3/client"}, lines
    assert all(" tick " in line for line in lines if line.strip())


# --------------------------------------------------------------------------- restart

def test_restart_one_component_keeps_the_others_and_the_old_logs(env):
    prog = env["tmp"] / "srv.sh"
    prog.write_text("#!/bin/sh\necho version one; exec sleep 600\n")
    prog.chmod(0o755)
    extra = """
        w = Component(name='web', host='h1', executable='srv.sh', files={'srv.sh': 'srv.sh'},
                      start_index=1)
        config.add_component(w)
    """
    ticking(env, extra)
    first_run = record(env)["run_id"]
    _, before = status_json(env)
    prog.write_text("#!/bin/sh\necho version two; exec sleep 600\n")
    rr(env, "restart", "web", "server", "--grace", "5", check=0)
    _, after = status_json(env)
    assert after["h1/web"]["pid"] != before["h1/web"]["pid"]
    assert after["h1/server"]["pid"] != before["h1/server"]["pid"]
    for other in ("h2/client", "h3/client"):
        assert after[other]["pid"] == before[other]["pid"] and after[other]["state"] == "running"
    assert wait_until(lambda: "version two" in rr(env, "logs", "web").stdout)
    # the previous log of the restarted component survives next to the new one
    old = on(env, "h1", f"cat {env['state']}/latest/web.log.*").stdout
    assert "version one" in old
    # a new run keeps the previous run's logs on the host
    ticking(env, extra)
    assert record(env)["run_id"] != first_run
    assert "server tick" in on(env, "h1", f"cat {env['state']}/runs/{first_run}/server.log").stdout


def test_restart_of_a_component_that_now_fails_is_exit_6(env):
    flag = env["tmp"] / "mode.txt"
    flag.write_text("good\n")
    ticking(env, """
        w = Component(name='picky', host='h2', executable='/bin/sh', files={'mode.txt': 'mode.txt'},
                      args=['-c', 'grep -qx good mode.txt || { echo bad mode; exit 9; }; exec sleep 600'],
                      start_index=1)
        config.add_component(w)
    """)
    flag.write_text("bad\n")
    out = rr(env, "restart", "picky", "--grace", "5")
    assert out.returncode == 6 and "exited 9" in out.stderr and "bad mode" in out.stderr
    assert status_json(env)[1]["h2/picky"]["state"] == "exited 9"


# --------------------------------------------------------------------------- fetch

def test_fetch_results_and_logs_from_three_hosts(env):
    script = ('mkdir -p out/deeper; echo "{\\"h\\": \\"$(hostname)\\"}" > out/result.json; '
              'echo nope > out/deeper/skip.json; echo "n,1" > stats.csv; echo finished')
    start(env, f"""
        for h in ('h1', 'h2', 'h3'):
            c = Component(name='worker', host=h, executable='/bin/sh', args=['-c', {script!r}],
                          start_index=0, wait=True, results=['out/*.json', 'stats.csv'])
            config.add_component(c)
    """, "--fetch", check=0)
    rec = record(env)
    root = os.path.join(env["runs"], rec["run_id"])
    for host in HOSTS:
        folder = os.path.join(root, host, "worker")
        with open(os.path.join(folder, "out", "result.json")) as src:
            assert json.load(src) == {"h": host}
        assert open(os.path.join(folder, "stats.csv")).read() == "n,1\n"
        assert "finished" in open(os.path.join(folder, "screen.log")).read()
        assert not os.path.exists(os.path.join(folder, "out", "deeper"))
    again = rr(env, "fetch", check=0)
    assert again.stderr.count("fetched 0 files (0 bytes), 3 unchanged") == 3, again.stderr


def test_a_hosts_hostile_names_and_log_escapes_stay_on_the_host(env):
    # the host's component writes names no local file should get, and a log line made of
    # terminal escapes and rich markup; fetch leaves those names there, status shows text only
    script = ("mkdir -p out; echo ok > out/good.json; echo x > \"out/bad$(printf '\\033')[2J.json\"; "
              "echo log > screen.log; printf 'tick\\n\\033]0;pwned\\007[/][link=x]boom\\n'; "
              "exec sleep 600")
    start(env, f"""
        c = Component(name='odd', host='h2', executable='/bin/sh', args=['-c', {script!r}],
                      start_index=0, results=['out/*.json', '*.log'])
        config.add_component(c)
    """, check=0)
    try:
        folder = os.path.join(env["runs"], record(env)["run_id"], "h2", "odd")
        out = rr(env, "fetch")
        assert out.returncode == 0, out.stderr
        assert "control characters" in out.stderr and "take the place of the fetched log" in out.stderr
        assert sorted(os.listdir(os.path.join(folder, "out"))) == ["good.json"]
        assert "tick" in open(os.path.join(folder, "screen.log")).read()  # the log, not the result
        assert not [n for n in os.listdir(folder) if n.startswith(".rr-")]  # no temporary left
        shown = rr(env, "status")
        assert shown.returncode == 0, shown.stderr  # rich markup from a host does not break it
        assert "boom" in shown.stdout and "\x1b" not in shown.stdout and "pwned" not in shown.stdout
    finally:
        rr(env, "stop", "--grace", "5", check=0)


def test_results_must_be_relative_globs(env):
    out = start(env, """
        c = Component(name='w', host='h1', executable='/bin/true', start_index=0,
                      results=['../etc/passwd'])
        config.add_component(c)
    """)
    assert out.returncode == 2
    assert "experiment.py:2" in out.stderr and "'results'" in out.stderr and "'w'" in out.stderr


# --------------------------------------------------------------------------- env and PATH

def test_env_and_a_bare_executable_from_the_hosts_path(env, foreign_host):
    start(env, f"""
        c = Component(name='show', host='{foreign_host}', executable='printenv',
                      args=['GREETING'], env={{'GREETING': 'hello $USER; world'}},
                      start_index=0, wait=True)
        config.add_component(c)
    """, check=0)
    assert "hello $USER; world" in rr(env, "logs", "show", check=0).stdout


# --------------------------------------------------------------------------- in a real terminal

def tmux(*args, check=True):
    return subprocess.run(["tmux", "-L", "rr-life-tests", *args], capture_output=True, text=True,
                          check=check, timeout=60)


@pytest.fixture
def terminal(env):
    name = env["screen"]
    tmux("new-session", "-d", "-s", name, "-x", "200", "-y", "50",
         f"env REMOTE_RUNNER_RUNS={env['runs']} bash --norc --noprofile")
    yield name
    tmux("kill-session", "-t", name, check=False)


def screen_text(name):
    return tmux("capture-pane", "-p", "-t", name).stdout


def test_status_watch_refreshes_the_table_live(env, terminal):
    ticking(env)
    tmux("send-keys", "-t", terminal,
         f"{sys.executable} -m remote_runner status --watch --interval 0.5", "Enter")
    assert wait_until(lambda: "h3" in screen_text(terminal) and
                      screen_text(terminal).count("running") == 3), screen_text(terminal)
    rr(env, "stop", "h3/client", "--grace", "5", check=0)
    assert wait_until(lambda: "killed by SIGTERM" in screen_text(terminal)), screen_text(terminal)
    text = screen_text(terminal)
    assert text.count("running") == 2 and "HOST" in text and "LAST LOG LINE" in text
    tmux("send-keys", "-t", terminal, "C-c")
    assert wait_until(lambda: "Traceback" not in screen_text(terminal))


def test_attach_and_the_printed_hint_work_pasted(env, terminal):
    out = ticking(env)
    row = next(line for line in out.stdout.splitlines() if line.startswith("h1 "))
    command = row[row.index("ssh -t"):].strip()  # the recap's attach column, pasted as it is
    assert "-F" in command
    tmux("send-keys", "-t", terminal, command, "Enter")
    assert wait_until(lambda: "server tick" in screen_text(terminal)), screen_text(terminal)
    tmux("send-keys", "-t", terminal, "C-a", "d")
    assert wait_until(lambda: "detached" in screen_text(terminal)), screen_text(terminal)
    tmux("send-keys", "-t", terminal, "clear", "Enter")
    tmux("send-keys", "-t", terminal, f"{sys.executable} -m remote_runner attach h3/client",
         "Enter")
    assert wait_until(lambda: "client tick" in screen_text(terminal)), screen_text(terminal)
    tmux("send-keys", "-t", terminal, "C-a", "d")
    assert wait_until(lambda: "detached" in screen_text(terminal)), screen_text(terminal)


# --------------------------------------------------------------------------- clean

def test_clean_removes_a_finished_runs_temporary_dirs_only_when_stopped(env):
    start(env, """
        c = Component(name='keeper', host='h2', executable='/bin/sh',
                      args=['-c', 'echo data > out.txt; exec sleep 600'], start_index=0)
        config.add_component(c)
    """, check=0)
    rec = record(env)
    base = rec["components"][0]["base_dir"]
    assert rec["components"][0]["temp_base"] and base.startswith("/tmp/")
    refused = rr(env, "clean")
    assert refused.returncode == 6 and "h2/keeper" in refused.stderr and "stop" in refused.stderr
    assert on(env, "h2", f"test -f {base}/out.txt").returncode == 0
    rr(env, "stop", "--grace", "5", check=0)
    rr(env, "clean", check=0)
    assert on(env, "h2", f"test -e {base}").returncode != 0
    assert on(env, "h2", f"test -e {env['state']}/runs/{rec['run_id']}").returncode != 0
    assert os.path.exists(os.path.join(env["runs"], rec["run_id"], "record.json"))


# --------------------------------------------------------------------------- subsets and -t

def test_only_runs_a_subset_of_the_config(env):
    ticking(env, "", "--only", "server", "h2")
    rec = record(env)
    assert sorted(f"{c['host']}/{c['name']}" for c in rec["components"]) == ["h1/server",
                                                                              "h2/client"]
    assert on(env, "h3", f"test -e {env['state']}/latest/client.pid").returncode != 0
    out = ticking(env, "", "--only", "nosuch", check=None)
    assert out.returncode == 2 and "--only nosuch" in out.stderr and "h1/server" in out.stderr


def test_terminate_also_stops_waited_components_on_wait_timeout(env):
    out = start(env, """
        s = Component(name='slow', host='h1', executable='/bin/sleep', args=['600'],
                      start_index=0, wait=True)
        config.add_component(s)
    """, "-t", "--wait-timeout", "2", "--grace", "5")
    assert out.returncode == 5 and "wait-timeout" in out.stderr
    code, rows = status_json(env)
    assert rows["h1/slow"]["state"] == "killed by SIGTERM"
    pid = on(env, "h1", f"cat {env['state']}/latest/slow.pid").stdout.strip()
    assert on(env, "h1", f"kill -0 -{pid}").returncode != 0
