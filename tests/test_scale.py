"""Bounded resources: threads grow with open connections only (one each), not with run length."""

from __future__ import annotations

import os
import threading
from collections import Counter

from remote_runner import keepalive
from remote_runner.ssh import SSHOptions, connect_all
from tests.test_jump import _config


def test_sixty_four_hosts_cost_one_thread_each(lab, tmp_path):
    """64 targets (behind one bastion, so one socket): paramiko's transport thread per
    connection, one keepalive monitor for all, and no connect workers left over."""
    config = _config(lab, tmp_path, 64, "h1")
    before = set(threading.enumerate())
    fds_before = len(os.listdir("/proc/self/fd"))  # (what earlier tests in this process hold)
    connections = connect_all([f"t{n:02d}" for n in range(1, 65)],
                              SSHOptions(ssh_config_file=config, forks=16, keepalive=2))
    try:
        assert len(connections) == 64
        for connection in connections.values():  # every one is usable
            assert connection.run(["true"]).exit_status == 0
        new = [t for t in threading.enumerate() if t not in before]
        kinds = Counter("transport" if type(t).__name__ == "Transport" else t.name.split("-")[1]
                        if t.name.startswith("ssh-") else t.name for t in new)
        # 64 targets + the bastion; the monitor; probes live one round trip each.
        assert kinds["transport"] == 65, kinds
        assert kinds["keepalive"] <= 1 and keepalive.MONITOR.count() >= 65, kinds
        assert kinds["connect"] == 0, kinds
        assert len(new) <= 65 + 1 + kinds["probe"], kinds
        # channels share the bastion's socket: 65 connections, a handful of descriptors
        assert len(os.listdir("/proc/self/fd")) - fds_before < 16
    finally:
        for connection in connections.values():
            connection.close()


# --------------------------------------------------------------------------- output that scales

def _summary(hosts: int):
    from remote_runner import recap
    outcomes, components = [], []
    for n in range(hosts):
        host = f"node{n:03d}"
        down = n in (7, 19)
        row = recap.HostOutcome(host, connected=not down, error="no route" if down else None,
                                files_copied=0 if down else 1, started=0 if down else 1,
                                ready=0 if down else 1, failed=1 if n == 3 else 0,
                                seconds=None if down else 1.0 + n / 100)
        outcomes.append(row)
        outcome = "skipped" if down else "failed" if n == 3 else "running"
        components.append(recap.ComponentOutcome(host, "probe", 1, False, False, outcome=outcome))
    return recap.RunSummary(run_id=None, config_file="x.py", screen="runner", ok=False,
                            exit_code=8, error="partial", started_at="", finished_at="",
                            seconds=3.0, hosts=outcomes, components=components)


def test_recap_of_many_hosts_gives_counts_problems_and_slowest():
    from remote_runner import recap
    text = recap.render_text(_summary(200))
    lines = text.splitlines()
    assert "200 hosts: 198 connected, 2 unreachable; files: 198 copied" in text
    assert "components: 1 failed, 197 running, 2 skipped" in text
    table = [line.split()[0] for line in lines if line.startswith("node")]
    # the two unreachable and the failed one first, then the five slowest; nothing else
    assert table == ["node003", "node007", "node019", "node199", "node198", "node197",
                     "node196", "node195"]
    assert len(lines) < 20
    assert "unreachable: node007, node019" in lines[-1]


def test_recap_of_few_hosts_lists_every_host():
    from remote_runner import recap
    text = recap.render_text(_summary(12))
    assert sum(1 for line in text.splitlines() if line.startswith("node")) == 12
    assert "12 hosts:" not in text


def test_plain_lines_leave_per_host_info_to_the_recap_with_many_hosts(caplog):
    import logging
    from remote_runner import events as ev
    reporter = ev.LogReporter(host_min_level=logging.WARNING)
    with caplog.at_level(logging.INFO, logger="remote_runner.events"):
        reporter.emit(ev.Event(ev.KIND_HOST_CONNECTED, "connected", host="node001"))
        reporter.emit(ev.Event(ev.KIND_PHASE_END, "connected to 200 host(s)", phase="connect"))
        reporter.emit(ev.Event(ev.KIND_NOTE, "unreachable, skipping", host="node007",
                               level=logging.WARNING))
    assert [r.getMessage() for r in caplog.records] == [
        "connected to 200 host(s)", "node007: unreachable, skipping"]


# --------------------------------------------------------------------------- the lab at scale

def test_bringing_up_more_lab_hosts_keeps_each_hosts_release():
    """``Lab().up(200)`` (the bench) must not turn the shared Debian 11 h9 into an overlay."""
    from remote_runner.lab import LabHost, wanted_release
    running = {"h9": LabHost("h9", 9, "10.213.0.19", 1, "bullseye"),
               "h1": LabHost("h1", 1, "10.213.0.11", 2, None)}
    state = {"h9": {"release": "bullseye"}, "h5": {"release": "bookworm"}}
    assert wanted_release("h9", {}, running, state) == "bullseye"
    assert wanted_release("h1", {}, running, state) is None
    assert wanted_release("h5", {}, running, state) == "bookworm"  # crashed: back as it was
    assert wanted_release("h7", {}, running, state) is None  # new: an overlay
    assert wanted_release("h9", {"h9": "trixie"}, running, state) == "trixie"  # asked for


def test_unused_lab_addresses_lie_beyond_every_host():
    from remote_runner.lab import netns
    last = netns.host_address(netns.MAX_HOSTS)
    dead = [netns.unused_address(n) for n in (1, 2, 3)]
    assert all(int(a.rsplit(".", 1)[1]) > int(last.rsplit(".", 1)[1]) for a in dead)
    assert all(int(a.rsplit(".", 1)[1]) < 255 for a in dead) and len(set(dead)) == 3


# --------------------------------------------------------------------------- bench: scale rows

def test_sampler_sees_a_processs_threads_memory_and_files():
    import subprocess
    import sys
    from bench.procstat import Peaks, Sampler
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, threading\n"
         "ev = threading.Event()\n"
         "ts = [threading.Thread(target=ev.wait) for _ in range(7)]\n"
         "[t.start() for t in ts]\n"
         "blob = bytearray(64 << 20)\n"
         "files = [open('/dev/null') for _ in range(20)]\n"
         "print('ready', flush=True); sys.stdin.read(); ev.set()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    peaks = Peaks()
    sampler = Sampler(child.pid, peaks, interval=3600)  # one sample at start, then on demand
    try:
        assert child.stdout.readline() == "ready\n"
        sampler.sample()
    finally:
        child.communicate("", timeout=60)
        sampler.stop()
    assert peaks.threads >= 8 and peaks.fds >= 23
    assert peaks.rss_kib >= 64 * 1024
    assert peaks.describe().startswith(f"peak {peaks.threads} threads, ")
    sampler.sample()  # the process is gone: nothing changes, nothing raises
    assert peaks.samples >= 2


def test_host_counts_the_lab_cannot_hold_become_skipped_rows(tmp_path):
    from bench.context import Context
    from bench.scenarios import scale

    class SmallLab:
        def hosts(self, count):
            from remote_runner.errors import LabError
            raise LabError(f"lab host index {count} out of range")

    ctx = Context(SmallLab(), [10.0], 1, False, str(tmp_path))
    rows = scale.case_rows(ctx, 10.0, 400, 1, "small.dat", peers=True)
    assert [r.tool for r in rows] == ["remote_runner", scale.PSSH, scale.LOOP]
    assert all(r.skipped.startswith("lab cannot hold 400 hosts: ") and r.median is None
               for r in rows)
    assert rows[0].case == "400 hosts: connect + copy + start"


def test_scale_notes_give_seconds_per_host_and_per_added_host():
    from bench.results import Measurement
    from bench.scenarios.scale import per_host_notes
    rows = [Measurement("scale", f"{n} hosts: connect + start", "t", 10.0, runs=[s])
            for n, s in ((16, 2.0), (200, 6.6))]
    rows.append(Measurement("scale", "1,000 components on 200 hosts: connect + start", "t", 10.0,
                            runs=[9.0], note="peak 9 threads"))
    per_host_notes(rows)
    assert rows[0].note == "0.125 s per host"
    assert rows[1].note == "0.033 s per host; 0.025 s per host added after 16"
    assert rows[2].note == "peak 9 threads"


def test_our_rows_note_the_runs_phases_from_its_json(tmp_path):
    import sys
    from bench.procstat import Peaks
    from bench.scenarios.scale import ours_note, ours_step

    class Ctx:
        step_timeout = 60
    doc = ('{"phases": [{"name": "connect", "seconds": 1.5}, {"name": "copy", "seconds": 0.25},'
           ' {"name": "start", "seconds": 2}, {"name": "wait", "seconds": 0}]}')
    peaks, phases = Peaks(), {}
    ours_step(Ctx(), [sys.executable, "-c", f"print({doc!r})"], peaks, phases)()
    assert phases == {"connect": 1.5, "copy": 0.25, "start": 2.0, "wait": 0.0}
    note = ours_note(peaks, phases)
    assert note.endswith("last run: connect 1.50 s, copy 0.25 s, start 2.00 s")
    assert note.startswith("peak ") == (peaks.samples > 0)  # watched while it ran
