"""Faults a run must survive without losing anything, on lab hosts.

Each test provokes one fault a user meets (a full disk on a host, ...) through
the real command line and judges the run by its exit status, its messages and
what the system OpenSSH client finds on the host afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import List

import pytest

from tests.conftest import quit_screen, ssh
from tests.test_classic_cli import base_args, cli, write_config


@pytest.fixture
def env(lab, screen_name, tmp_path):
    """A unique screen name, state dir and a 64 KiB tmpfs as base_dir on h2."""
    state = f"/tmp/{screen_name}-state"
    full = f"/tmp/{screen_name}-full"
    ssh(lab, "h2", f"mkdir -p {full} && mount -t tmpfs -o size=64k tmpfs {full} && "
                   f"printf old > {full}/payload")
    yield {"screen": screen_name, "state": state, "tmp": tmp_path, "full": full}
    quit_screen(lab, "h2", screen_name, state)
    ssh(lab, "h2", f"umount {full}; rmdir {full}", check=False)


def test_a_full_disk_fails_the_run_names_the_cause_and_starts_nothing(lab, env):
    tmp = env["tmp"]
    (tmp / "payload").write_bytes(os.urandom(1 << 20))
    config = write_config(tmp, f"""
        c = Component()
        c.name = 'consumer'
        c.host = 'h2'
        c.executable = '/bin/sleep'
        c.args = ['600']
        c.files = {{'payload': 'payload'}}
        c.base_dir = {env["full"]!r}
        c.start_index = 1
        config.add_component(c)
    """)
    result = cli("-c", config, *base_args(lab, env))
    assert result.returncode == 4, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, result.stderr
    assert "h2" in errors[0] and f"{env['full']}/payload" in errors[0]
    assert "No space left on device" in errors[0]
    assert "Traceback" not in result.stderr
    assert ssh(lab, "h2", f"cat {env['full']}/payload").stdout == "old"
    assert ssh(lab, "h2", f"ls -A {env['full']}").stdout == "payload\n"
    assert env["screen"] not in ssh(lab, "h2", "screen -ls", check=False).stdout


def _sessions(lab, host, name):
    from remote_runner import screen as scr
    return scr.parse_sessions(ssh(lab, host, "screen -ls", check=False).stdout, name)


def _h2_settings(lab) -> str:
    """The lab ssh_config's settings for h2 (user, key, known_hosts), without its Host/HostName."""
    block = open(lab.ssh_config).read().split("Host h2 ", 1)[1].split("\nHost ", 1)[0]
    return block.split("\n", 2)[2]


def _good_run(lab, env):
    """Start a 'worker' on h2 under the test's screen name; return h2's session ids."""
    good = write_config(env["tmp"], """
        c = Component()
        c.name = 'worker'
        c.host = 'h2'
        c.executable = '/bin/sleep'
        c.args = ['600']
        c.start_index = 1
        config.add_component(c)
    """, "good.py")
    assert cli("-c", good, *base_args(lab, env)).returncode == 0
    return _sessions(lab, "h2", env["screen"])


def _slow_copy_config(env, size: int, base: str) -> str:
    """A config replacing the 'worker' through slow2, with a *size*-byte payload to copy."""
    (env["tmp"] / "payload").write_bytes(os.urandom(size))
    return write_config(env["tmp"], f"""
        c = Component()
        c.name = 'worker'
        c.host = 'slow2'
        c.executable = '/bin/sleep'
        c.args = ['600']
        c.start_index = 1
        c.files = {{'payload': 'payload'}}
        c.base_dir = {base!r}
        config.add_component(c)
    """, "slow.py")


def test_a_run_that_cannot_copy_leaves_the_last_good_experiment_running(lab, env):
    tmp = env["tmp"]
    body = """
        for h in ('h1', 'h2'):
            c = Component()
            c.name = 'worker'
            c.host = h
            c.executable = '/bin/sleep'
            c.args = ['600']
            c.start_index = 1
            {extra}
            config.add_component(c)
    """
    good = write_config(tmp, body.format(extra="pass"), "good.py")
    assert cli("-c", good, *base_args(lab, env)).returncode == 0
    before = {h: _sessions(lab, h, env["screen"]) for h in ("h1", "h2")}
    assert all(len(ids) == 1 for ids in before.values())
    (tmp / "payload").write_bytes(os.urandom(1 << 20))
    extra = (f"if h == 'h2': c.files = {{'payload': 'payload'}}; c.base_dir = {env['full']!r}")
    bad = write_config(tmp, body.format(extra=extra), "bad.py")
    result = cli("-c", bad, *base_args(lab, env))
    assert result.returncode == 4 and "No space left on device" in result.stderr
    after = {h: _sessions(lab, h, env["screen"]) for h in ("h1", "h2")}
    assert after == before  # neither host's session was replaced
    quit_screen(lab, "h1", env["screen"], env["state"])


class SlowLink:
    """A loopback TCP forwarder to a lab host's sshd that carries about *rate* bytes/s upstream."""

    def __init__(self, target, rate: int) -> None:
        import socket
        import threading

        self.target, self.rate, self.up = target, rate, 0
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.port = self.server.getsockname()[1]
        self.sockets = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, slow: bool) -> None:
        import time
        try:
            while True:
                data = src.recv(16 << 10)
                if not data:
                    break
                if slow:
                    self.up += len(data)
                    time.sleep(len(data) / self.rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self) -> None:
        """Cut the link: every connection through it ends at once (as a killed proxy would)."""
        import socket
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_ctrl_c_during_a_copy_stops_now_and_keeps_the_last_good_run(lab, env, slow2):
    import signal

    link, cfg = slow2
    before = _good_run(lab, env)
    size = 64 << 20  # about 30 s through the link
    base = f"/tmp/{env['screen']}-base"
    proc = _start(_slow_copy_config(env, size, base), cfg, env)
    try:
        assert _until(lambda: link.up >= (4 << 20) or proc.poll() is not None)
        assert link.up >= (4 << 20), f"the upload never started: {proc.communicate()}"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
        sent = link.up
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert sent < size // 2  # it did not wait for the upload to finish
    left = ssh(lab, "h2", f"ls -A {base}", check=False).stdout.split()
    assert "payload" not in left
    # The temporary file is removed, or (when the busy link delays the removal past the
    # one second Ctrl-C allows) named in a warning; the sweep of a later run removes it.
    for name in left:
        assert name.startswith(".payload.rr-") and f"{base}/{name}" in err
    assert _sessions(lab, "h2", env["screen"]) == before
    ssh(lab, "h2", f"rm -rf {base}", check=False)


def test_a_failing_proxycommand_is_named_with_its_own_words_at_once(lab, env):
    tmp = env["tmp"]
    cfg = tmp / "ssh_config"
    cfg.write_text("Host viaproxy\n    HostName 10.213.0.12\n"
                   "    ProxyCommand sh -c 'echo gateway refused us >&2; exit 3'\n"
                   + _h2_settings(lab))
    config = write_config(tmp, """
        c = Component()
        c.name = 'x'
        c.host = 'viaproxy'
        c.executable = '/bin/true'
        c.start_index = 1
        config.add_component(c)
    """)
    result = cli("-c", config, "-F", str(cfg), "--screen", env["screen"], timeout=60)
    assert result.returncode == 3
    assert "Traceback" not in result.stderr and "paramiko" not in result.stderr
    assert "ProxyCommand" in result.stderr and "exited with status 3" in result.stderr
    assert "gateway refused us" in result.stderr and "viaproxy" in result.stderr


@pytest.fixture
def slow2(lab, env):
    """A SlowLink to h2 and an ssh_config naming it ``slow2``; returns (link, config path)."""
    link = SlowLink(("10.213.0.12", 22), rate=2 << 20)
    cfg = env["tmp"] / "slow_ssh_config"
    cfg.write_text(f"Host slow2\n    HostName 127.0.0.1\n    Port {link.port}\n"
                   "    HostKeyAlias 10.213.0.12\n" + _h2_settings(lab))
    yield link, str(cfg)
    link.close()


def _start(config, cfg, env):
    import sys

    from tests.test_classic_cli import REPO, SCRIPT
    return subprocess.Popen([sys.executable, SCRIPT, "-c", config, "-F", cfg, "--screen",
                             env["screen"], "--remote-done-dir", env["state"]],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until(check, seconds=120):
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_a_link_cut_while_waiting_is_reported_and_the_experiment_lives_on(lab, env, slow2):
    link, cfg = slow2
    config = write_config(env["tmp"], """
        c = Component()
        c.name = 'waiter'
        c.host = 'slow2'
        c.executable = '/bin/sleep'
        c.args = ['600']
        c.start_index = 1
        c.wait = True
        config.add_component(c)
    """)
    proc = _start(config, cfg, env)
    try:
        assert _until(lambda: ssh(lab, "h2", f"test -s {env['state']}/latest/waiter.pid",
                                  check=False).returncode == 0 or proc.poll() is not None)
        link.close()
        _out, err = proc.communicate(timeout=180)  # never hangs: the loss is noticed
    finally:
        proc.kill()
    assert proc.returncode == 3, err
    assert "Traceback" not in err and "EOFError" not in err and "sh -s" not in err
    # (the pid file may appear just before the run moves from starting to waiting)
    assert re.search(r"slow2: the SSH connection was lost while (waiting|starting index 1) "
                     r"\(component 'waiter'\)", err), err
    pid = ssh(lab, "h2", f"cat {env['state']}/latest/waiter.pid").stdout.strip()
    assert ssh(lab, "h2", f"kill -0 {pid}", check=False).returncode == 0  # still running there


def test_a_link_cut_while_copying_is_reported_and_nothing_is_replaced(lab, env, slow2):
    link, cfg = slow2
    before = _good_run(lab, env)
    base = f"/tmp/{env['screen']}-base"
    config = _slow_copy_config(env, 64 << 20, base)
    proc = _start(config, cfg, env)
    try:
        assert _until(lambda: link.up > (4 << 20) or proc.poll() is not None)
        link.close()
        _out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode in (3, 4), err
    assert "Traceback" not in err and "EOFError" not in err
    assert "slow2" in err and ("lost" in err or "connection" in err), err
    assert "payload" not in ssh(lab, "h2", f"ls -A {base}", check=False).stdout.split()
    assert _sessions(lab, "h2", env["screen"]) == before
    ssh(lab, "h2", f"rm -rf {base}", check=False)


def _client_ports(pid: int, address: str) -> List[str]:
    """Local TCP ports of process *pid*'s connections to *address*:22 (read with ss)."""
    out = subprocess.run(["ss", "-tnpH", "dst", f"{address}:22"], capture_output=True,
                         text=True).stdout
    return [line.split()[3].rsplit(":", 1)[1] for line in out.splitlines()
            if f"pid={pid}," in line]


def test_sshd_killed_on_the_host_while_waiting_is_reported_at_once(lab, env):
    """The host end of the link dies (its sshd for this connection is killed): no hang, a sentence."""
    config = write_config(env["tmp"], """
        c = Component()
        c.name = 'waiter'
        c.host = 'h3'
        c.executable = '/bin/sleep'
        c.args = ['600']
        c.start_index = 1
        c.wait = True
        config.add_component(c)
    """)
    proc = _start(config, lab.ssh_config, env)
    try:
        assert _until(lambda: ssh(lab, "h3", f"test -s {env['state']}/latest/waiter.pid",
                                  check=False).returncode == 0 or proc.poll() is not None)
        ports = _client_ports(proc.pid, "10.213.0.13")
        assert ports, "the run has no connection to h3"
        # on h3, the sshd processes serving exactly those client ports
        pattern = "|".join(f"10.213.0.1:{p} " for p in ports)
        ssh(lab, "h3", f"ss -tnpH | grep -E '{pattern}' | grep -o 'pid=[0-9]*' | cut -d= -f2 "
                       "| xargs -r kill -9")
        _out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
        quit_screen(lab, "h3", env["screen"], env["state"])
    assert proc.returncode == 3, err
    assert "Traceback" not in err and "EOFError" not in err and "sh -s" not in err
    assert "h3: the SSH connection was lost" in err and "waiter" in err, err
