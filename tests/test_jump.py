"""One connection per bastion: targets behind the same ProxyJump share one login to it."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from remote_runner import jump
from remote_runner.lab.netns import unused_address
from remote_runner.ssh import SSHOptions, connect_all
from tests.conftest import ssh
from tests.test_ssh import host_block, lab_entry

TARGETS = ("h2", "h3", "h4", "h9")


def _our_ssh_sockets() -> dict:
    """Established TCP connections of this process to port 22, by remote address."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", "( dport = :22 )"],
                         capture_output=True, text=True, check=True).stdout
    counts: dict = {}
    for line in out.splitlines():
        if f"pid={os.getpid()}," not in line:
            continue
        fields = line.split()
        local, remote = fields[-3], fields[-2]
        counts.setdefault(remote.rsplit(":", 1)[0], []).append(local.rsplit(":", 1)[1])
    return counts


def _config(lab, tmp_path, targets: int, hops: str) -> str:
    known = lab_entry(lab, "h1")["userknownhostsfile"]
    text = host_block(lab, "h1", known) + host_block(lab, "h2", known, ProxyJump="h1")
    for n in range(1, targets + 1):
        target = TARGETS[n % len(TARGETS)]
        text += host_block(lab, target, known, ProxyJump=hops).replace(
            f"Host {target}\n", f"Host t{n:02d}\n", 1)
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return str(path)


def test_fifty_targets_behind_one_bastion_make_one_login_to_it(lab, foreign_host, tmp_path):
    config = _config(lab, tmp_path, 50, "h1")
    assert "Host t50\n" in open(config).read()
    bastion = lab_entry(lab, "h1")["hostname"]
    connections = connect_all([f"t{n:02d}" for n in range(1, 51)],
                              SSHOptions(ssh_config_file=config, forks=16))
    try:
        # Every target is a real login on its own host, reached through the bastion ...
        for name, connection in list(connections.items())[:8]:
            assert connection.run("echo $SSH_CONNECTION").stdout.split()[0].decode() == bastion
        sockets = _our_ssh_sockets()
        # ... and this process holds exactly one TCP connection to port 22: the bastion's.
        assert list(sockets) == [bastion] and len(sockets[bastion]) == 1, sockets
        # The bastion sees one SSH session from us (its sshd's side of that socket).
        port = sockets[bastion][0]
        seen = ssh(lab, "h1", "ss -tnH state established '( sport = :22 )'").stdout
        ours = [line for line in seen.splitlines() if re.search(rf":{port}\s*$", line.strip())]
        assert len(ours) == 1, seen
        assert jump.SHARED.open_count() == 1
    finally:
        for connection in connections.values():
            connection.close()
    assert jump.SHARED.open_count() == 0
    assert _our_ssh_sockets() == {}


def test_multi_hop_targets_share_every_hop(lab, foreign_host, tmp_path):
    config = _config(lab, tmp_path, 12, "h1,h2")
    bastion = lab_entry(lab, "h1")["hostname"]
    second = lab_entry(lab, "h2")["hostname"]
    connections = connect_all([f"t{n:02d}" for n in range(1, 13)],
                              SSHOptions(ssh_config_file=config, forks=8))
    try:
        for connection in connections.values():
            assert connection.run("echo $SSH_CONNECTION").stdout.split()[0].decode() == second
        sockets = _our_ssh_sockets()
        assert list(sockets) == [bastion] and len(sockets[bastion]) == 1, sockets
        assert jump.SHARED.open_count() == 2  # h1, and h2 through h1
    finally:
        for connection in connections.values():
            connection.close()
    assert jump.SHARED.open_count() == 0


def test_a_dead_bastion_fails_every_target_behind_it_clearly(lab, tmp_path):
    known = lab_entry(lab, "h1")["userknownhostsfile"]
    text = host_block(lab, "h1", known).replace("Host h1\n", "Host deadgw\n", 1)
    text = re.sub(r"HostName \S+", f"HostName {unused_address()}", text)
    for n in (1, 2):
        text += host_block(lab, "h2", known, ProxyJump="deadgw").replace(
            "Host h2\n", f"Host t{n:02d}\n", 1)
    config = tmp_path / "ssh_config"
    config.write_text(text)
    with pytest.raises(Exception) as info:
        connect_all(["t01", "t02"], SSHOptions(ssh_config_file=str(config), connect_timeout=3,
                                               retries=0))
    message = str(info.value)
    assert "could not connect to 2 host(s)" in message
    assert message.count("through ProxyJump host deadgw") == 2
    assert jump.SHARED.open_count() == 0
