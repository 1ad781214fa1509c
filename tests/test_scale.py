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
        assert len(os.listdir("/proc/self/fd")) < 64  # channels share the bastion's socket
    finally:
        for connection in connections.values():
            connection.close()
