"""Counting what a run asks of each host: exec channels, SFTP sessions and SFTP requests.

The counts are what make "nothing changed costs one round trip per host" a
checkable claim, so they are proven against real hosts: a script is one exec,
an SFTP listing is one session and its requests, and a whole run reports its
counts per host in ``-v`` lines and in ``--json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jsonschema
import pytest

from remote_runner.schemas import RUN_SCHEMA
from remote_runner.shell import RemoteShell
from remote_runner.ssh import Connection, SSHOptions
from remote_runner.traffic import Traffic, describe
from tests.conftest import quit_screen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "remote_runner.py")


def test_describe_names_each_count_with_its_plural():
    assert describe({"execs": 1, "steps": 1, "sftp_sessions": 0, "sftp_requests": 2}) == \
        "1 exec, 1 step, 0 sftp sessions, 2 sftp requests"
    counts = Traffic()
    counts.count("execs", 3)
    counts.count("sftp_sessions")
    counts.count("steps", 2)
    assert counts.snapshot() == {"execs": 3, "steps": 2, "sftp_sessions": 1, "sftp_requests": 0}


def test_a_connection_counts_its_execs_and_sftp_use(lab):
    with Connection("h1", SSHOptions(ssh_config_file=lab.ssh_config)) as connection:
        connection.connect()
        assert connection.traffic.snapshot() == {"execs": 0, "steps": 0, "sftp_sessions": 0,
                                                 "sftp_requests": 0}
        shell = RemoteShell(connection, "h1")
        assert shell.script("echo one; echo two\n", timeout=60).stdout == "one\ntwo\n"
        connection.run(["true"])
        assert connection.traffic.execs == 2
        sftp = connection.sftp()
        sftp.listdir("/")  # opendir, readdir until EOF, close: at least three requests
        assert connection.sftp() is sftp
        lane = connection.open_sftp()
        lane.stat("/")
        lane.close()
        counts = connection.traffic.snapshot()
        assert counts["execs"] == 2 and counts["sftp_sessions"] == 2
        assert counts["sftp_requests"] >= 4


def test_a_run_reports_its_counts_per_host_in_verbose_lines_and_json(lab, screen_name, tmp_path):
    state = f"/tmp/{screen_name}-state"
    config = tmp_path / "experiment.py"
    config.write_text(textwrap.dedent(f"""
        for host in ('h1', 'h2'):
            c = Component()
            c.name = 'noop-' + host
            c.host = host
            c.executable = '/bin/true'
            c.base_dir = '/tmp/{screen_name}-base'
            c.start_index = 0
            config.add_component(c)
    """))
    try:
        proc = subprocess.run([sys.executable, SCRIPT, "-c", str(config), "-F", lab.ssh_config,
                               "--screen", screen_name, "--remote-done-dir", state, "-v",
                               "--no-progress", "--json"],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        document = json.loads(proc.stdout)
        jsonschema.validate(document, RUN_SCHEMA)
        for row in document["hosts"]:
            # the lock (which also makes the directories), then one start script for the one
            # start_index (launchers, replacing the old session, windows, health) on its shell
            assert row["execs"] == 1 and row["steps"] == 1, row
            assert row["sftp_sessions"] == 0, row  # nothing to copy: no SFTP at all
            line = f"{row['host']}: {describe(row)}"
            assert line in proc.stderr, proc.stderr
    finally:
        for host in ("h1", "h2"):
            quit_screen(lab, host, screen_name, state, f"/tmp/{screen_name}-base")


@pytest.mark.parametrize("counts", [{"execs": 0, "sftp_sessions": 0, "sftp_requests": 0}])
def test_schema_accepts_hosts_without_a_connection(counts):
    row = {"host": "localhost", "connected": None, "error": None, "session": None,
           "state_dir": None, "files_copied": 0, "files_unchanged": 0, "bytes_copied": 0,
           "started": 0, "ready": 0, "failed": 0, "execs": None, "sftp_sessions": None,
           "sftp_requests": None}
    schema = RUN_SCHEMA["properties"]["hosts"]["items"]
    jsonschema.validate(row, schema)
    jsonschema.validate({**row, **counts}, schema)
