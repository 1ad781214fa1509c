"""The benchmark harness itself works (nothing here times anything or asserts on speed).

* the delay proxy forwards bytes both ways, in order, and applies the
  configured delay in its own accounting;
* the ssh_config it writes is what OpenSSH resolves (``ssh -G``);
* the results table is well formed (ratios, skipped rows);
* a repeated step that fails or is slow is recorded, not fatal;
* one tiny scenario run end to end on lab hosts writes a well-formed table.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from bench.measure import BenchError, repeat, repeat_in_turns, run
from bench.proxy import ProxySet
from bench.results import OURS, PEER, REFERENCE, Measurement, Report
from bench.sshconf import Endpoint, read_host_keys, write_ssh_config
from tests.conftest import ssh

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EchoServer:
    """A loopback TCP server that sends back whatever it receives (one thread per client)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def _round_trip(port: int, payload: bytes) -> bytes:
    """Send *payload* through 127.0.0.1:*port*, half-close, and return everything that comes back."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        sender = threading.Thread(target=lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        while True:
            data = conn.recv(65536)
            if not data:
                break
            received += data
        sender.join()
    return bytes(received)


@pytest.mark.parametrize("delay_ms", [0, 25])
def test_proxy_forwards_both_ways_in_order_and_applies_the_delay(delay_ms: float) -> None:
    echo = EchoServer()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    try:
        with ProxySet() as proxies:
            proxy = proxies.add("echo", ("127.0.0.1", echo.port), delay_ms)
            assert proxy.port != echo.port
            back = _round_trip(proxy.port, payload)
            second = _round_trip(proxy.port, b"second connection")
            stats = proxy.stats
    finally:
        echo.close()
    assert back == payload  # every byte, in order, both directions
    assert second == b"second connection"
    assert stats.connections == 2
    assert stats.bytes_up == len(payload) + len(b"second connection")
    assert stats.bytes_down == stats.bytes_up
    assert stats.chunks >= 4
    assert stats.min_hold_ms is not None and stats.min_hold_ms >= delay_ms


def test_a_client_reset_ends_the_proxys_connection_to_the_target() -> None:
    """A client that exits with bytes unread sends a reset, not an EOF: the target still hears the end."""
    ended = threading.Event()

    class Sink(EchoServer):
        @staticmethod
        def _echo(conn: socket.socket) -> None:
            with conn:
                conn.sendall(b"x" * 65536)  # more than the client will read
                while conn.recv(65536):
                    pass
                ended.set()

    sink = Sink()
    try:
        with ProxySet() as proxies:
            proxy = proxies.add("sink", ("127.0.0.1", sink.port), 5)
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
            client.sendall(b"hello")
            client.recv(10)
            time.sleep(0.2)  # the rest of the sink's bytes are waiting, unread, here
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # a reset
            assert ended.wait(10), "the proxy kept its connection to the target open"
    finally:
        sink.close()


def test_proxy_refuses_a_negative_delay() -> None:
    with ProxySet() as proxies, pytest.raises(ValueError, match="delay"):
        proxies.add("bad", ("127.0.0.1", 9), -1)


def test_proxy_closes_the_client_when_the_target_is_down() -> None:
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    dead_port = spare.getsockname()[1]
    spare.close()  # nothing listens there now
    with ProxySet() as proxies:
        proxy = proxies.add("dead", ("127.0.0.1", dead_port), 0)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as conn:
            conn.settimeout(30)
            assert conn.recv(10) == b""


def test_ssh_config_resolves_aliases_to_the_proxies(tmp_path) -> None:
    lab_known = tmp_path / "lab_known_hosts"
    lab_known.write_text("h1,10.213.0.11 ssh-ed25519 AAAAkey1\nh2,10.213.0.12 ssh-ed25519 AAAAkey2\n")
    keys = read_host_keys(str(lab_known))
    assert keys["h2"] == "ssh-ed25519 AAAAkey2" and keys["10.213.0.11"] == "ssh-ed25519 AAAAkey1"
    cfg = write_ssh_config(str(tmp_path / "out"), [Endpoint("h1", 22, keys["h1"], "10.213.0.11"),
                                                   Endpoint("h2", 40002, keys["h2"])],
                           "/nonexistent/id_ed25519", name="cfg")
    resolved = subprocess.run(["ssh", "-G", "-F", cfg, "h2"], capture_output=True, text=True, check=True).stdout
    options = dict(line.split(" ", 1) for line in resolved.splitlines() if " " in line)
    assert options["hostname"] == "127.0.0.1"
    assert options["port"] == "40002"
    assert options["hostkeyalias"] == "h2"
    assert options["stricthostkeychecking"] in ("true", "yes")
    direct = subprocess.run(["ssh", "-G", "-F", cfg, "h1"], capture_output=True, text=True, check=True).stdout
    assert "hostname 10.213.0.11\n" in direct and "port 22\n" in direct
    known = open(cfg + ".known_hosts").read()
    assert "h1,10.213.0.11 ssh-ed25519 AAAAkey1\n" in known
    # OpenSSH and our SSH layer (HostKeyAlias) and plain clients ([127.0.0.1]:port) find one key.
    assert "h2,[127.0.0.1]:40002 ssh-ed25519 AAAAkey2\n" in known
    assert oct(os.stat(cfg).st_mode & 0o777) == "0o600"


def test_report_ratios_against_the_best_peer_and_lists_skips(tmp_path) -> None:
    report = Report("2026-01-01 00:00:00", {"cpu": "test"}, {"reps": 3})
    report.add([
        Measurement("deploy", "cold", "ours", 10, OURS, [2.0, 1.0, 3.0]),
        Measurement("deploy", "cold", "rsync", 10, PEER, [4.0, 4.0, 5.0]),
        Measurement("deploy", "cold", "scp", 10, PEER, [40.0]),
        Measurement("deploy", "cold", "local", 10, REFERENCE, [0.1]),
        Measurement("deploy", "cold", "rsync", 0, PEER, [1.0]),
        Measurement("deploy", "warm", "scp", 10, PEER, skipped="no change detection"),
    ])
    ours = report.measurements[0]
    assert ours.median == 2.0
    assert report.best_peer(ours.group).tool == "rsync"
    assert report.ratio(ours) == pytest.approx(0.5)
    assert report.ratio(report.measurements[3]) == pytest.approx(0.025)  # reference rows are never "best peer"
    md = report.to_markdown()
    assert "| cold | 10 | **ours** | 2.00 | 2.00, 1.00, 3.00 | 0.500 |  |" in md
    assert "| warm | 10 | scp | - | - | - | skipped: no change detection |" in md
    assert "- deploy / warm / scp @ 10 ms: no change detection" in md
    md_path, json_path = report.write(str(tmp_path))
    data = json.load(open(json_path))
    assert data["measurements"][0]["runs"] == [2.0, 1.0, 3.0]
    assert data["measurements"][0]["ratio_vs_best_peer"] == pytest.approx(0.5)
    assert open(os.path.join(str(tmp_path), "latest.md")).read() == open(md_path).read()


def test_repeat_records_failures_and_stops_repeating_slow_steps() -> None:
    calls = []
    m = repeat(Measurement("s", "c", "t", 0), lambda: calls.append(1), 3, prepare=lambda: calls.append(0))
    assert len(m.runs) == 3 and calls == [0, 1, 0, 1, 0, 1] and not m.skipped

    def boom() -> None:
        run([sys.executable, "-c", "import sys; sys.stderr.write('broken tool\\n'); sys.exit(3)"])

    failed = repeat(Measurement("s", "c", "t", 0), boom, 3)
    assert failed.runs == [] and "exited 3" in failed.skipped and "broken tool" in failed.skipped

    slow = repeat(Measurement("s", "c", "t", 0), lambda: None, 3, slow_after=-1.0)
    assert len(slow.runs) == 1 and "not repeated" in slow.note


def test_tools_are_timed_in_turns_and_one_that_fails_or_is_slow_leaves_the_turns() -> None:
    calls = []

    def step(name):
        return lambda: calls.append(name)

    def broken() -> None:
        calls.append("broken")
        raise BenchError("broken tool")
    rows = repeat_in_turns([(Measurement("s", "c", "ours", 0), step("ours"), lambda: calls.append("prep")),
                            (Measurement("s", "c", "peer", 0), step("peer"), None),
                            (Measurement("s", "c", "bad", 0), broken, None)], 3)
    assert calls == ["prep", "ours", "peer", "broken", "prep", "ours", "peer", "prep", "ours", "peer"]
    assert [len(m.runs) for m in rows] == [3, 3, 0] and "broken tool" in rows[2].skipped
    calls.clear()
    slow, quick = repeat_in_turns([(Measurement("s", "c", "slow", 0), step("slow"), None),
                                   (Measurement("s", "c", "quick", 0), step("quick"), None)], 3, slow_after=-1.0)
    assert calls == ["slow", "quick"] and "not repeated" in slow.note and len(quick.runs) == 1


def test_run_kills_a_step_that_overstays_its_timeout() -> None:
    with pytest.raises(BenchError, match="did not finish"):
        run([sys.executable, "-c", "import time; time.sleep(600)"], timeout=0.5)


@pytest.mark.lab
def test_tiny_bench_run_on_lab_hosts_writes_a_well_formed_table(lab, tmp_path) -> None:
    out = tmp_path / "results"
    scratch = set(Path(tempfile.gettempdir()).glob("rr-bench-*"))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "startup", "--delays", "0,5",
         "--no-install", "--out", str(out), "--work-dir", str(tmp_path / "work"), "-l", "WARNING"],
        cwd=CHECKOUT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    md = (out / "latest.md").read_text()
    data = json.loads((out / "latest.json").read_text())
    assert md.startswith("# remote_runner benchmark, ")
    assert "| case | delay (ms each way) | tool | median (s) | runs (s) | x best peer | note |" in md
    rows = data["measurements"]
    peers = [r for r in rows if r["tool"].startswith("ssh + screen")]
    assert sorted((r["case"], r["delay_ms"]) for r in peers) == [
        ("160 components", 0), ("160 components", 5), ("40 components", 0), ("40 components", 5)]
    for r in peers:  # the peer really ran, once per delay, through the proxies
        assert r["skipped"] == "" and len(r["runs"]) == 1 and r["runs"][0] > 0
        assert r["ratio_vs_best_peer"] == pytest.approx(1.0)
    ours = [r for r in rows if r["role"] == OURS]
    # two delays, each case run with the default settle and with --settle 0
    assert sorted((r["case"], r["tool"]) for r in ours) == sorted(
        [(case, tool) for case in ("40 components", "160 components",
                                   "rerun, unchanged, 40 components")
         for tool in ("remote_runner", "remote_runner --settle 0")] * 2)
    for r in ours:  # ours either ran (and says how many commands each host got) or says why not
        assert (r["skipped"] != "") != (len(r["runs"]) == 1)
        assert r["skipped"] or " execs" in r["note"]
    assert all(f"| {r['case']} | {r['delay_ms']:g} | " in md for r in rows)
    assert "## Skipped" in md and "## Machine" in md
    # The proxies' ssh_configs went with the run (no directory left in /tmp per run).
    assert set(Path(tempfile.gettempdir()).glob("rr-bench-*")) <= scratch
    # Nothing the run started is left on the hosts: no session, no window process.
    prefix = data["settings"]["screen sessions"].rstrip("*")
    assert prefix.startswith("rrbench-") and len(prefix) > len("rrbench-")
    for host in ("h1", "h2", "h3", "h4"):
        left = ssh(lab, host, f"screen -ls | grep -c {prefix} ; ps -eo args= | grep -c '^/bin/sh .*/{prefix}'",
                   check=False).stdout.split()
        assert left == ["0", "0"], (host, left)


def test_our_rows_note_the_exec_and_sftp_counts_of_a_json_run_result():
    from bench.ours import traffic_note
    row = {"execs": 4, "steps": 2, "sftp_sessions": 1, "sftp_requests": 9}
    same = json.dumps({"hosts": [{"host": "h1", **row}, {"host": "h2", **row}]}).encode()
    assert traffic_note(same) == "each host: 4 execs, 2 steps, 1 sftp sessions, 9 sftp requests"
    other = json.dumps({"hosts": [{"host": "h2", **row}, {"host": "h1", **row, "execs": 2}]})
    assert traffic_note(other.encode()) == ("h1: 2 execs, 2 steps, 1 sftp sessions, 9 sftp requests; "
                                            "h2: 4 execs, 2 steps, 1 sftp sessions, 9 sftp requests")
    older = json.dumps({"hosts": [{"host": "h1", "execs": 3, "sftp_sessions": 0, "sftp_requests": 0}]})
    assert traffic_note(older.encode()) == "each host: 3 execs, 0 steps, 0 sftp sessions, 0 sftp requests"
    assert traffic_note(b"not json") == ""
    assert traffic_note(json.dumps({"hosts": [{"host": "h1", "execs": None}]}).encode()) == ""


def test_a_suite_row_counts_a_run_whatever_its_tests_said_but_not_a_suite_that_never_ran():
    """The test-suite rows time a suite whose tests fail (exits it names) and fail a suite
    that did not run at all; an interpreter without the suite's module gives a skipped row
    naming it, not a 16 ms "run" of ``No module named pytest``."""
    from bench.scenarios.mirror_programs import CPYTHON_RAN, PYTEST_RAN, missing_module, ran

    def status(command, codes):
        return subprocess.run(["/bin/sh", "-c", ran(command, codes)]).returncode

    assert [status(f"sh -c 'exit {code}'", CPYTHON_RAN) for code in (0, 1, 2, 3, 4, 127)] == [0, 1, 0, 0, 4, 127]
    assert [status(f"sh -c 'exit {code}'", PYTEST_RAN) for code in (0, 1, 2, 5)] == [0, 0, 2, 5]
    # a missing module exits 1 as failed tests do: counted as run, hence the look for it first
    assert status(f"{sys.executable} -c 'import no_such_module_here'", PYTEST_RAN) == 0
    assert missing_module(sys.executable, "json", "-") is None
    said = missing_module(sys.executable, "no_such_module_here", "pip install it")
    assert said is not None and "no module no_such_module_here" in said and "pip install it" in said
    assert missing_module("/nonexistent/python3", "json", "-") is not None
