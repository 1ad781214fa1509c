"""The lab itself: real hosts, separate filesystems, local-only paths hidden."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from remote_runner import lab as lab_module
from remote_runner.errors import LabError
from tests.conftest import ssh

pytestmark = pytest.mark.lab


def test_each_host_runs_commands_over_ssh_and_has_its_own_name(lab):
    names = [h.name for h in lab.hosts]
    assert names[:3] == ["h1", "h2", "h3"]
    for host in lab.hosts[:3]:
        out = ssh(lab, host.name, "hostname; ip -o -4 addr show dev eth0").stdout.split("\n", 1)
        assert out[0] == host.name
        assert f" {host.address}/24 " in out[1]


def test_filesystems_are_separate_from_each_other_and_from_local(lab):
    token = uuid.uuid4().hex
    for path in (f"/tmp/lab-{token}", f"/etc/lab-{token}", f"/usr/local/lab-{token}"):
        ssh(lab, "h1", f"echo {token} > {path}")
        assert ssh(lab, "h1", f"cat {path}").stdout.strip() == token
        for other in ("h2", "h3"):
            assert ssh(lab, other, f"test -e {path}", check=False).returncode == 1
        assert not os.path.exists(path)


def test_local_only_paths_are_absent_on_hosts(lab, tmp_path):
    marker = os.path.join(lab_module.LOCAL_ONLY, f"marker-{uuid.uuid4().hex}")
    with open(marker, "w") as handle:
        handle.write("local\n")
    try:
        package_dir = os.path.dirname(os.path.abspath(lab_module.__file__))
        for host in ("h1", "h2", "h3"):
            for path in (lab_module.LOCAL_ONLY, marker, package_dir, lab.dir):
                result = ssh(lab, host, f"test -e {path}", check=False)
                assert result.returncode == 1, f"{path} visible on {host}"
    finally:
        os.remove(marker)


def test_hosts_have_the_tools_the_product_needs(lab):
    out = ssh(lab, "h2", "command -v screen openssl python3; test -r /dev/fuse -a -w /dev/fuse && echo fuse-ok").stdout
    assert out.split() == ["/usr/bin/screen", "/usr/bin/openssl", "/usr/bin/python3", "fuse-ok"]


def test_test_user_logs_in_with_a_private_home(lab):
    out = ssh(lab, "h3", "id -un; echo $HOME; touch ~/f && ls -ld ~ | cut -d' ' -f3", user="rrtest").stdout.split()
    assert out == ["rrtest", "/home/rrtest", "rrtest"]


def test_ssh_config_names_every_host_with_strict_host_keys(lab):
    with open(lab.ssh_config) as handle:
        text = handle.read()
    for host in lab.hosts:
        assert f"Host {host.name} {host.address}\n" in text
    assert "StrictHostKeyChecking yes" in text
    proc = subprocess.run([sys.executable, "-m", "remote_runner", "lab", "ssh-config"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == lab.ssh_config


def test_status_reports_running_hosts(lab):
    rows = {r["host"]: r for r in lab.status()}
    for host in lab.hosts[:3]:
        assert rows[host.name]["state"] == "up"
        assert rows[host.name]["address"] == host.address


def test_lab_refuses_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="needs root"):
        lab_module.Lab("/nonexistent").up(1)


def test_hidden_paths_drop_nested_entries(tmp_path):
    hidden = lab_module._hidden_paths(str(tmp_path))
    for path in hidden:
        assert not any(path.startswith(other + "/") for other in hidden)
    assert os.path.realpath(str(tmp_path)) in hidden


def test_foreign_host_is_another_release_without_local_files(lab, foreign_host):
    out = ssh(lab, foreign_host, "cat /etc/debian_version; python3 -c 'import sys; print(sys.version_info[:2])'; "
                                 "test -e /usr/bin/ffmpeg && echo has-ffmpeg; command -v screen openssl").stdout.split("\n")
    assert out[0].startswith("11.")
    assert out[1] == "(3, 9)"
    assert "has-ffmpeg" not in out
    assert out[2:4] == ["/usr/bin/screen", "/usr/bin/openssl"]
    local_marker = os.path.join(lab_module.LOCAL_ONLY, "..")
    assert ssh(lab, foreign_host, f"test -e {os.path.realpath(local_marker)}/remote-runner-local-only",
               check=False).returncode == 1
    host = next(h for h in lab.hosts if h.name == foreign_host)
    assert host.release == "bullseye"


def test_a_crashed_host_comes_back_reachable_at_once(lab):
    """A host started again behind the same address is reachable right away (no stale ARP)."""
    import signal
    import time

    (h3,) = [h for h in lab.running_hosts() if h.name == "h3"]
    os.kill(h3.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "h3" in {h.name for h in lab.running_hosts()} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "h3" not in {h.name for h in lab.running_hosts()}
    lab.up(3)  # raises if h3's sshd cannot be reached within its wait
    assert ssh(lab, "h3", "hostname").stdout.strip() == "h3"
