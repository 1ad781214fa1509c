"""What a run shows: plain lines when piped, verbosity, the recap, --json, the live view."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
import uuid

import jsonschema
import pytest

from remote_runner import console, events as ev
from remote_runner.schemas import RUN_SCHEMA
from remote_runner.tails import clean_line, parse_tails
from tests.conftest import quit_screen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "remote_runner.py")
HOSTS = ("h1", "h2", "h3")
PLAIN = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR): ")


# --------------------------------------------------------------------------- no hosts needed

class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("kwargs, env, live, level", [
    ({}, {"TERM": "xterm"}, True, logging.INFO),
    ({"stream": io.StringIO()}, {"TERM": "xterm"}, False, logging.INFO),
    ({"no_progress": True}, {"TERM": "xterm"}, False, logging.INFO),
    ({}, {"TERM": "dumb"}, False, logging.INFO),
    ({}, {"TERM": "xterm", "NO_COLOR": "1"}, False, logging.INFO),
    ({}, {"TERM": "xterm", "NO_COLOR": ""}, True, logging.INFO),  # empty means unset
    ({"quiet": 1}, {"TERM": "xterm"}, False, logging.WARNING),
    ({"quiet": 2}, {"TERM": "xterm"}, False, logging.ERROR),
    ({"verbose": 1, "log_level": "ERROR"}, {"TERM": "xterm"}, True, logging.DEBUG),
    ({"log_level": "WARNING"}, {"TERM": "xterm"}, False, logging.WARNING),
])
def test_choose_live_view_only_on_a_capable_terminal(kwargs, env, live, level):
    kwargs.setdefault("stream", _Tty())
    chosen = console.choose(environ=env, **kwargs)
    assert (chosen.live, chosen.level) == (live, level)
    assert chosen.paramiko_debug is False


def test_debug_lines_name_their_host():
    stream = io.StringIO()
    console.setup(console.Output(logging.DEBUG, True, False, False), stream=stream)
    try:
        with ev.host_context("h7"):
            logging.getLogger("remote_runner.sync").debug("uploading %s", "x")
            logging.getLogger("remote_runner.sync").debug("h7: already named")
        logging.getLogger("paramiko.transport.host.h8").debug("kex done")
        logging.getLogger("remote_runner.runner").debug("no host here")
    finally:
        logging.getLogger().handlers.clear()
    lines = [PLAIN.sub("", line) for line in stream.getvalue().splitlines()]
    assert lines == ["h7: uploading x", "h7: already named", "h8: kex done", "no host here"]


def test_log_tails_from_a_host_are_cleaned():
    assert clean_line("ok \x1b[31mred\x1b[0m\x07 done\n") == "ok red done"
    assert clean_line("10%\r50%\r100%\r") == "100%"
    assert clean_line("x" * 500) == "x" * 200
    out = "@@RR-TAIL a\nlast of a\n\n@@RR-TAIL b\n\n@@RR-TAIL c\nc \x1b]0;title\x07line\n"
    assert parse_tails(out) == {"a": "last of a", "b": "", "c": "c line"}


# --------------------------------------------------------------------------- on lab hosts

def cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("REMOTE_RUNNER_PASSWORD",)}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.fixture
def run_env(lab, screen_name, tmp_path):
    state, base = f"/tmp/{screen_name}-state", f"/tmp/{screen_name}-base"
    yield {"screen": screen_name, "state": state, "base": base, "tmp": tmp_path,
           "args": ["-F", lab.ssh_config, "--screen", screen_name, "--remote-done-dir", state]}
    for host in HOSTS:
        quit_screen(lab, host, screen_name, state, base)


def experiment(run_env, script='echo done on {host}', wait_status=0):
    (run_env["tmp"] / "payload.txt").write_text("payload\n")
    path = run_env["tmp"] / "exp.yaml"
    path.write_text(textwrap.dedent(f"""
        hosts:
          all: h[1-3]
        components:
          - name: server
            host: h1
            executable: /bin/sleep
            args: ["600"]
            start_index: 1
          - name: job-{{index}}
            on: all
            executable: /bin/sh
            args: ["-c", "{script}; exit {{index}}0 && true", "x"]
            files: {{payload.txt: payload.txt}}
            base_dir: {run_env["base"]}
            start_index: 2
            wait: true
    """).replace("exit {index}0 && true", "exit 0" if wait_status == 0 else
                 f"test {{host}} = h2 && exit {wait_status}; exit 0"))
    return str(path)


def test_piped_output_is_plain_lines_then_a_plain_recap(run_env):
    config = experiment(run_env)
    out = cli("-c", config, *run_env["args"])
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert all(PLAIN.match(line) for line in lines), out.stderr
    messages = [re.sub(r"pid \d+|\d+\.", "N", PLAIN.sub("", line)) for line in lines]
    screen = run_env["screen"]
    for host in HOSTS:
        assert f"{host}: connected" in messages
        assert f"{host}: copied 1 file (8 bytes), 0 unchanged" in messages
        assert f"{host}: started job-{HOSTS.index(host) + 1} (N) in screen session N{screen}" \
            in messages
        assert f"{host}: job-{HOSTS.index(host) + 1} exited with status 0" in messages
    assert messages.index("connected to 3 host(s)") < messages.index(
        "copied 3 file(s) (24 bytes), 0 unchanged") < messages.index(
        "starting index 1: h1:server") < messages.index("started 4 component(s)")
    assert "\x1b[" not in out.stderr + out.stdout  # no colour, no cursor movement
    recap = out.stdout.splitlines()
    assert recap[0] == "RECAP"
    assert recap[1].split() == ["host", "connected", "copied", "unchanged", "bytes", "started",
                                "ready", "failed", "attach"]
    rows = {line.split()[0]: line.split() for line in recap[2:5]}
    # the attach hint carries the run's -F, so it works pasted as it is
    assert rows["h1"][:14] == ["h1", "yes", "1", "0", "8", "B", "2", "2", "0", "ssh", "-t", "-F",
                               rows["h1"][12], "h1"]
    assert rows["h2"][:9] == ["h2", "yes", "1", "0", "8", "B", "1", "1", "0"]
    assert re.fullmatch(r"\d+\." + screen, rows["h3"][-1])
    assert re.match(r"result: ok \(exit 0\) — 3 host\(s\), 4/4 component\(s\) started, [\d.]+ s$",
                    recap[5]), recap[5]
    assert len(recap) == 6


def test_verbosity_flags(run_env):
    config = experiment(run_env)
    quiet = cli("-c", config, *run_env["args"], "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""  # nothing but warnings and errors, and there were none
    assert "result: ok (exit 0)" in quiet.stdout
    verbose = cli("-c", config, *run_env["args"], "-v")
    assert verbose.returncode == 0, verbose.stderr
    debug = [PLAIN.sub("", l) for l in verbose.stderr.splitlines() if " DEBUG: " in l]
    assert "h1: connected (root@10.213.0.11:22)" in debug
    assert not any("paramiko" in l or "kex" in l.lower() for l in debug)
    very = cli("-c", config, *run_env["args"], "-vv")
    assert very.returncode == 0, very.stderr
    chatter = [PLAIN.sub("", l) for l in very.stderr.splitlines()
               if "Authentication (publickey) successful" in l]
    assert sorted(c.split(":")[0] for c in chatter) == ["h1", "h2", "h3"]


def test_json_result_follows_its_schema_for_success_and_failure(run_env):
    ok = cli("-c", experiment(run_env), *run_env["args"], "--json")
    assert ok.returncode == 0, ok.stderr
    document = json.loads(ok.stdout)
    jsonschema.validate(document, RUN_SCHEMA)
    assert document["result"] == "ok" and document["exit_code"] == 0
    assert [p["name"] for p in document["phases"]] == ["connect", "prepare", "copy", "start", "wait"]
    jobs = {c["name"]: c for c in document["components"] if c["name"].startswith("job")}
    assert {c["exit_status"] for c in jobs.values()} == {0}
    assert all(c["outcome"] == "exited" and c["seconds"] >= 0 for c in jobs.values())
    server = [c for c in document["components"] if c["name"] == "server"][0]
    assert server["outcome"] == "running" and server["pid"] > 0 and server["ended_at"] is None
    failing = cli("-c", experiment(run_env, wait_status=3), *run_env["args"], "--json")
    assert failing.returncode == 5, failing.stderr
    document = json.loads(failing.stdout)
    jsonschema.validate(document, RUN_SCHEMA)
    assert document["result"] == "failed" and document["exit_code"] == 5
    assert "h2:job-2: exited with status 3" in document["error"]
    job2 = [c for c in document["components"] if c["name"] == "job-2"][0]
    assert (job2["exit_status"], job2["outcome"]) == (3, "failed")
    assert [h["failed"] for h in document["hosts"]] == [0, 1, 0]


def test_unreachable_host_is_in_the_recap(run_env, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("components:\n  - name: a\n    on: h1,nohost\n    executable: /bin/true\n"
                      "    start_index: 1\n")
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(open(run_env["args"][1]).read() +
                          "\nHost nohost\n    HostName 10.213.0.251\n    ConnectTimeout 2\n")
    out = cli("-c", str(config), "-F", str(ssh_config), "--screen", run_env["screen"])
    assert out.returncode == 3
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:4]}
    assert rows["h1"][1] == "yes" and rows["nohost"][1] == "FAILED"
    assert "unreachable: nohost" in out.stdout
    # The closing error, which decides the exit status, is the one bare ERROR: line.
    assert [l for l in out.stderr.splitlines() if l.startswith("ERROR: ")] == [
        l for l in out.stderr.splitlines() if "could not connect to 1 host" in l]


def tmux(*args):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30)


def test_live_view_and_recap_in_a_real_terminal(run_env):
    # Long enough for several 2 s log reads even on a loaded machine; nothing is timed.
    config = experiment(run_env, script="for i in $(seq 1 14); do echo step $i of {host}; "
                                        "sleep 1; done")
    session = f"rr-{uuid.uuid4().hex[:8]}"
    done = run_env["tmp"] / "done"
    command = (f"cd {shlex.quote(REPO)} && {shlex.quote(sys.executable)} {shlex.quote(SCRIPT)} "
               f"-c {shlex.quote(config)} {' '.join(shlex.quote(a) for a in run_env['args'])}; "
               f"echo EXIT=$? > {shlex.quote(str(done))}; sleep 600")
    env = f"TERM=xterm-256color"
    assert tmux("new-session", "-d", "-s", session, "-x", "150", "-y", "45",
                f"env -u NO_COLOR -u COLUMNS -u LINES {env} sh -c {shlex.quote(command)}").returncode == 0
    try:
        seen_live = ""
        deadline = time.monotonic() + 180
        while not done.exists() and time.monotonic() < deadline:
            screen = tmux("capture-pane", "-p", "-t", session).stdout
            if re.search(r"h2:job-2 +\d+ s +step \d+ of h2", screen):
                seen_live = screen
            time.sleep(0.3)
        assert done.read_text().strip() == "EXIT=0"
        final = tmux("capture-pane", "-p", "-t", session).stdout
    finally:
        tmux("kill-session", "-t", session)
    # While waiting: a spinner line and a row per waited component with its last log line.
    assert seen_live, "the live wait view never showed a log line"
    assert re.search(r"waiting +[\d.]+ s +\d/3 ended", seen_live)
    assert "✔ connect    3/3 hosts" in seen_live and "✔ start      4/4 components" in seen_live
    # When done: one line per phase, then the recap table and the verdict.
    lines = [l.rstrip() for l in final.splitlines() if l.strip()]
    marks = [l.split()[1] for l in lines if l.startswith("✔")]
    assert marks == ["connect", "prepare", "copy", "start", "wait"]
    assert not any("waiting" in l for l in lines)  # the live view collapsed
    assert any(re.match(r"│ h2 +│ yes +│ +1 │ +0 │ +8 B │ +1 │ +1 │ +0 │ ssh -t -F \S+ h2 screen", l)
               for l in lines), final
    assert re.search(r"result: ok \(exit 0\) — 3 host\(s\), 4/4 component\(s\) started", final)
    assert "INFO:" not in final  # INFO lines are the live view's job on a terminal


def test_live_view_draws_copy_progress_with_a_real_total_and_collapses():
    import re as _re

    from rich.console import Console

    from remote_runner.live import LiveView

    screen = io.StringIO()
    view = LiveView(Console(file=screen, force_terminal=True, width=100, color_system=None))
    view.emit(ev.Event(ev.KIND_PHASE_BEGIN, phase="copy", data={"total": 3}))
    view.emit(ev.Event(ev.KIND_COPY_PLANNED, host="h1", data={"files": 2, "bytes": 3 << 20}))
    view.emit(ev.Event(ev.KIND_COPY_PLANNED, host="h2", data={"files": 1, "bytes": 1 << 20}))
    view.emit(ev.Event(ev.KIND_COPY_PROGRESS, host="h1", data={"bytes": 1 << 20}))
    drawn = Console(file=io.StringIO(), width=100, color_system=None)
    with drawn.capture() as capture:
        drawn.print(view._render())
    text = capture.get()
    assert "1.0 MiB/4.0 MiB, 3 files, 1 host(s) comparing" in text  # h3 has not compared yet
    assert _re.search(r"h1 +2 files +1\.0 MiB/3\.0 MiB", text)
    assert _re.search(r"h2 +1 file +0 B/1\.0 MiB", text)
    view.emit(ev.Event(ev.KIND_COPY_DONE, host="h1", data={"copied": 2, "unchanged": 1,
                                                           "bytes": 3 << 20}))
    view.emit(ev.Event(ev.KIND_COPY_DONE, host="h2", data={"copied": 1, "unchanged": 0,
                                                           "bytes": 1 << 20}))
    view.emit(ev.Event(ev.KIND_PHASE_END, phase="copy", data={"ok": True, "seconds": 1.25}))
    assert screen.getvalue().splitlines() == [
        "✔ copy       3 files, 4.0 MiB to 2 hosts, 1 unchanged  1.2 s"]
    with drawn.capture() as capture:
        drawn.print(view._render())
    assert capture.get().strip() == ""  # nothing left of the phase's view
