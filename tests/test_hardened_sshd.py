"""Hosts whose sshd is set up tighter than OpenSSH's defaults: few sessions per connection
(``MaxSessions``), no SFTP subsystem, a bastion that forwards nothing. A run, a restart's copy
and a fetch still go through, or say exactly which setting stops them."""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.conftest import experiment, ssh
from tests.test_classic_cli import cli


def sshd_setting(lab, host: str, sed: str) -> None:
    """Edit *host*'s own sshd_config with *sed* and have its sshd read it again."""
    ssh(lab, host, f"sed -i {sed} /etc/remote-runner-lab/sshd_config && kill -HUP $(pgrep -o -f 'sshd -D') "
                   "&& sleep 0.3")


@pytest.fixture
def few_sessions(lab):
    """h3's sshd allows *n* sessions per connection (``set(n)``); its own setting (200) comes back after."""
    def limit(n: int) -> None:
        sshd_setting(lab, "h3", f"'s/^MaxSessions .*/MaxSessions {n}/'")
    yield limit
    limit(200)


@pytest.mark.lab
def test_a_copy_fits_in_the_sessions_a_hardened_sshd_allows(lab, few_sessions, tmp_path, monkeypatch, capsys):
    """Streams, bundles and the session lock need more sessions than ``MaxSessions 2``: each
    refused one waits for one of ours to end; with none ever ending, the error says why."""
    from remote_runner import channelio
    from remote_runner.cli import classic as classic_cli
    data = tmp_path / "data"
    (data / "small").mkdir(parents=True)
    for i in range(4):  # streamed, up to 4 at once
        (data / f"big{i}.bin").write_bytes(os.urandom(4 << 20))
    for i in range(2500):  # two bundles
        (data / "small" / f"f{i:04d}").write_text(f"file {i}\n")
    files = {str(path): str(path.relative_to(data)) for path in data.rglob("*") if path.is_file()}
    config = experiment(tmp_path, {"name": "sessions", "host": "h3", "executable": "/bin/true",
                                   "base_dir": "/tmp/sessions-test", "files": files})
    argv = ["-c", config, "-F", lab.ssh_config, "--screen", "sessions"]
    try:
        few_sessions(2)
        run = cli(*argv)
        assert run.returncode == 0, run.stderr
        sums = ssh(lab, "h3", "cd /tmp/sessions-test && find . -type f | wc -l && cat small/f2499 && "
                              "sha1sum big*.bin").stdout.split()
        assert sums[:3] == ["2504", "file", "2499"]
        assert sums[3::2] == [hashlib.sha1((data / f"big{i}.bin").read_bytes()).hexdigest() for i in range(4)]
        ssh(lab, "h3", "rm -rf /tmp/sessions-test")
        few_sessions(1)  # the session lock's channel takes the only one, for the whole run
        monkeypatch.setattr(channelio, "SESSION_WAIT", 1.0)
        assert classic_cli.main(argv + ["-q"]) == 4  # a copy error
        said = capsys.readouterr().err
        assert "the host refused a session while" in said and "MaxSessions" in said, said
    finally:
        ssh(lab, "h3", "rm -rf /tmp/sessions-test; rm -rf ~/.remote-runner/sessions", check=False)



@pytest.fixture
def no_sftp(lab):
    """h3's sshd without its SFTP subsystem (back after the test)."""
    sshd_setting(lab, "h3", "'s/^Subsystem/#Subsystem/'")
    yield "h3"
    sshd_setting(lab, "h3", "'s/^#Subsystem/Subsystem/'")


@pytest.mark.lab
def test_a_run_and_a_fetch_need_no_sftp_subsystem(lab, no_sftp, tmp_path):
    """Files past the bundles' size that went over SFTP are streamed; results are read with cat."""
    sizes = {"small.bin": 5000, "mid.bin": 500_000, "big.bin": 3_000_000}  # bundled, SFTP's, streamed
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(os.urandom(size))
    config = experiment(tmp_path, {"name": "nosftp", "host": "h3", "executable": "/bin/sh",
                                   "args": ["-c", "mkdir -p out && cat mid.bin big.bin > out/both.bin"],
                                   "base_dir": "/tmp/nosftp-test", "files": {name: name for name in sizes},
                                   "results": ["out/*"], "wait": True})
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}  # this test's own run records
    try:
        run = cli("-c", config, "-F", lab.ssh_config, "--screen", "nosftp", "--fetch", env=env)
        assert run.returncode == 0, run.stderr
        sums = ssh(lab, "h3", "cd /tmp/nosftp-test && sha1sum big.bin mid.bin small.bin").stdout.split()[::2]
        assert sums == [hashlib.sha1((tmp_path / name).read_bytes()).hexdigest() for name in sorted(sizes)]
        fetched = list((tmp_path / "state").rglob("both.bin"))
        assert len(fetched) == 1, run.stderr
        assert fetched[0].read_bytes() == (tmp_path / "mid.bin").read_bytes() + (tmp_path / "big.bin").read_bytes()
        assert "reading the files with cat" in run.stderr
    finally:
        ssh(lab, "h3", "rm -rf /tmp/nosftp-test ~/.remote-runner/nosftp", check=False)


@pytest.mark.lab
def test_a_jump_host_that_forbids_forwarding_is_named_as_such(lab, tmp_path):
    ssh(lab, "h1", "echo 'AllowTcpForwarding no' >> /etc/remote-runner-lab/sshd_config && "
                   "kill -HUP $(pgrep -o -f 'sshd -D') && sleep 0.3")
    try:
        address = ssh(lab, "h2", "hostname -I").stdout.split()[0]
        config = tmp_path / "ssh_config"
        config.write_text(open(lab.ssh_config).read() + f"\nHost behind\n  HostName {address}\n  ProxyJump h1\n")
        config_file = experiment(tmp_path, {"name": "x", "host": "behind", "executable": "/bin/true"})
        run = cli("-c", config_file, "-F", str(config), "--screen", "jump")
        assert run.returncode == 3, run.stderr
        assert "jump host h1 refuses to forward connections to" in run.stderr, run.stderr
        assert "AllowTcpForwarding" in run.stderr and "HostName/Port" not in run.stderr
    finally:
        ssh(lab, "h1", "sed -i '/^AllowTcpForwarding/d' /etc/remote-runner-lab/sshd_config && "
                       "kill -HUP $(pgrep -o -f 'sshd -D') && sleep 0.3", check=False)
