"""Grouping host names by the login they reach (no hosts contacted; lab runs in test_spar_compat)."""

from __future__ import annotations

import argparse
import socket
import threading
import textwrap

import pytest

from remote_runner import landing
from remote_runner.loader import load_experiment
from remote_runner.errors import ConfigError
from remote_runner.ssh import SSHOptions

SSH_CONFIG = """
Host TBD server-alias
    HostName 10.9.0.1
    User root
Host 10.9.0.1
    User root
Host other-port
    HostName 10.9.0.1
    User root
    Port 2222
Host other-user
    HostName 10.9.0.1
    User alice
Host behind-a
    HostName 10.9.0.1
    User root
    ProxyJump gw-a
Host behind-b
    HostName 10.9.0.1
    User root
    ProxyJump gw-b
"""


@pytest.fixture
def options(tmp_path):
    path = tmp_path / "ssh_config"
    path.write_text(SSH_CONFIG)
    return SSHOptions(ssh_config_file=str(path))


def test_names_for_one_login_are_one_host(options):
    hosts = ["10.9.0.1", "TBD", "server-alias", "root@10.9.0.1:22", "other-port", "other-user",
             "behind-a", "behind-b"]
    mapping = landing.group_hosts(hosts, options, timeout=5)
    assert mapping == {
        "10.9.0.1": "10.9.0.1", "TBD": "10.9.0.1", "server-alias": "10.9.0.1",
        "root@10.9.0.1:22": "10.9.0.1", "other-port": "other-port", "other-user": "other-user",
        "behind-a": "behind-a", "behind-b": "behind-b",
    }


def test_a_name_that_does_not_resolve_in_time_keeps_its_hostname(options, monkeypatch):
    release = threading.Event()
    real = socket.getaddrinfo

    def slow(host, *args, **kwargs):
        if host == "slow.example":
            release.wait(60)
            raise socket.gaierror("gave up")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    try:
        found = landing.landings(["slow.example", "TBD"], options, timeout=0.5)
    finally:
        release.set()
    assert found["slow.example"].addresses == ("slow.example",)
    assert found["TBD"].addresses == ("10.9.0.1",)


def test_same_name_on_two_names_of_one_login(tmp_path, options):
    path = tmp_path / "config.py"
    path.write_text(textwrap.dedent("""
        for host in ('TBD', 'h-other', 'server-alias'):
            c = Component()
            c.name = 'harness'
            c.host = host
            c.executable = '/bin/true'
            c.start_index = 1
            config.add_component(c)  # <add>
    """))
    exp = load_experiment(str(path), argparse.Namespace(ssh_user="u"))
    mapping = landing.group_hosts([s.host for s in exp.components], options, timeout=5)
    with pytest.raises(ConfigError) as info:
        landing.check_names(exp.components, mapping)
    err = info.value
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "<add>" in text)
    assert (err.file, err.line, err.component, err.field) == (str(path), line, "harness", "name")
    assert "'server-alias' and 'TBD' reach the same login" in str(err)
    assert str(err).count(f"added at {path}:{line}") == 2
