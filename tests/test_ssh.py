"""The SSH layer against real lab hosts (plus a few pure unit checks).

Each host-key and auth test writes its own ssh_config and known_hosts in a
temp dir, derived from the lab's ssh_config, so the lab's files are never
touched. HOME points at an empty temp dir and ssh-agent is hidden, so the
developer's own keys and config cannot make a test pass by accident.
"""

from __future__ import annotations

import hashlib
import getpass
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from typing import Dict, List

import paramiko
import pytest

from remote_runner import hostkeys
from remote_runner.tcp import QuickAckSocket
from remote_runner.errors import (
    AuthError, CommandTimeout, ConfigError, HostError, HostKeyError, RemoteCommandError,
    UnreachableError,
)
from remote_runner.ssh import (
    ConnectAllError, Connection, RunResult, SSHOptions, connect_all, load_ssh_config, parse_host,
    resolve_password,
)
from tests.conftest import ssh


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Hide the developer's ~/.ssh and ssh-agent from every test."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("REMOTE_RUNNER_PASSWORD", raising=False)
    return home


def lab_entry(lab, name: str) -> paramiko.SSHConfigDict:
    """Return the lab's ssh_config settings for host *name*."""
    return paramiko.SSHConfig.from_path(lab.ssh_config).lookup(name)


def host_block(lab, name: str, known_hosts: str, **extra: str) -> str:
    """Return an ssh_config block for lab host *name* with our own known_hosts file."""
    entry = lab_entry(lab, name)
    settings = {
        "HostName": entry["hostname"],
        "User": "root",
        "IdentityFile": entry["identityfile"][0],
        "IdentitiesOnly": "yes",
        "UserKnownHostsFile": known_hosts,
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes",
    }
    settings.update(extra)
    lines = [f"Host {name}"] + [f"    {k} {v}" for k, v in settings.items() if v != ""]
    return "\n".join(lines) + "\n"


def lab_known_line(lab, name: str) -> List[str]:
    """Return [type, key] of the lab's recorded host key for *name*."""
    path = lab_entry(lab, name)["userknownhostsfile"]
    for line in open(path).read().splitlines():
        fields = line.split()
        if name in fields[0].split(","):
            return fields[1:3]
    raise AssertionError(f"{name} not in {path}")


def lab_options(lab, **kwargs) -> SSHOptions:
    """Options using the lab's own ssh_config."""
    return SSHOptions(ssh_config_file=lab.ssh_config, **kwargs)


@pytest.fixture
def h1(lab):
    """A connection to lab host h1, closed afterwards."""
    connection = Connection("h1", lab_options(lab)).connect()
    yield connection
    connection.close()


# --------------------------------------------------------------------------- running commands


def test_connect_via_alias_resolves_config(lab, h1):
    assert (h1.alias, h1.hostname, h1.port, h1.username) == (
        "h1", lab_entry(lab, "h1")["hostname"], 22, "root")
    assert h1.is_alive()
    assert h1.run(["id", "-un"]).stdout == b"root\n"
    assert h1.run("hostname").stdout.strip() != b""


def test_tricky_argv_comes_back_literally(h1):
    words = ["it's", '"double"', "$HOME", "a;b", "`id`", "$(id)", "*", "ünïcødé ✓", "two  spaces",
             "back\\slash", "-n", ""]
    result = h1.run(["printf", "%s\\n"] + words)
    assert result.stdout.decode("utf-8").split("\n")[:-1] == words
    assert result.exit_status == 0 and result.stderr == b""


def test_string_command_goes_to_the_shell(h1):
    assert h1.run("echo $((6 * 7)); echo two >&2").stdout == b"42\n"
    assert h1.run("echo two >&2").stderr == b"two\n"


def test_exit_status_and_check(h1):
    assert h1.run("exit 7", check=False).exit_status == 7
    with pytest.raises(RemoteCommandError) as info:
        h1.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert info.value.exit_status == 3 and info.value.host == "h1"
    assert "boom" in str(info.value)


def test_a_long_script_is_named_briefly_and_the_reason_stays_visible(h1):
    script = "cd / || exit 1\n: " + " ".join(f"./f{i:04d}.dat" for i in range(1000))
    with pytest.raises(RemoteCommandError) as info:
        h1.run(script + "\necho the-reason >&2; exit 4")
    text = str(info.value)
    assert "the-reason" in text and "f0999" not in text and len(text) < 600, text
    assert "cd / || exit 1 … (" in text


def test_commands_that_exit_before_reading_their_stdin_never_break_the_connection(h1):
    """An EOF sent after the server closed the channel makes OpenSSH drop the whole connection."""
    from concurrent.futures import ThreadPoolExecutor
    for data in (b"x" * 20000, None):  # data still being sent, or only the EOF
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(lambda i: h1.run(["sh", "-c", f"exit {i % 3}"], stdin=data,
                                                      check=False).exit_status, range(400)))
        assert statuses == [i % 3 for i in range(400)]
    assert h1.is_alive() and h1.run("echo still here").stdout == b"still here\n"


def test_big_output_on_both_streams_does_not_deadlock(h1):
    size = 11 * 1024 * 1024
    command = (f"head -c {size} /dev/zero | tr '\\0' o; "
               f"head -c {size} /dev/zero | tr '\\0' e >&2; echo tail")
    result = h1.run(command, timeout=300)
    assert result.stdout == b"o" * size + b"tail\n"
    assert result.stderr == b"e" * size


def test_a_host_that_prints_without_end_is_cut_off_and_the_connection_survives(h1, monkeypatch):
    from remote_runner import channelio
    from remote_runner.errors import OutputTooLarge
    monkeypatch.setattr(channelio, "MAX_OUTPUT", 1 << 20)  # 256 MiB in use: 1 MiB here
    with pytest.raises(OutputTooLarge) as info:  # at once, not at the (long) timeout
        h1.run("cat /dev/zero", timeout=3600)
    assert info.value.host == "h1" and "cat /dev/zero" in str(info.value)
    assert h1.run(["echo", "still here"]).stdout == b"still here\n"


def test_an_sftp_server_that_stalls_ends_a_request_with_an_error_not_a_hang(h1, monkeypatch):
    """An sftp-server stopped on the host (as one stuck on a hung NFS home): the next request
    fails once the channel has been idle IDLE_TIMEOUT, while the connection lives on."""
    import socket
    from remote_runner import channelio
    monkeypatch.setattr(channelio, "IDLE_TIMEOUT", 2.0)
    sftp = h1.open_sftp()
    # the sftp-server of this session: the newest of this user's on h1 (the test started it)
    pid = h1.run("pgrep -n -f 'internal-sftp|sftp-server'").stdout.decode().strip()
    assert pid.isdigit()
    h1.run(["kill", "-STOP", pid])
    try:
        started = time.monotonic()
        with pytest.raises((socket.timeout, OSError, EOFError)):
            sftp.stat("/")
        assert time.monotonic() - started < 60
        assert h1.run(["echo", "alive"]).stdout == b"alive\n"
    finally:
        h1.run(["kill", "-CONT", pid], check=False)
        h1.run(["kill", pid], check=False)
        sftp.close()


def test_stdin_is_fed_and_closed(h1):
    data = os.urandom(3 * 1024 * 1024)
    result = h1.run(["sha1sum"], stdin=data, timeout=120)
    assert result.stdout.split()[0].decode() == hashlib.sha1(data).hexdigest()
    # without stdin the remote side sees EOF at once instead of waiting forever
    assert h1.run(["cat"], timeout=60).stdout == b""


def test_env_is_exported_quoted(h1):
    result = h1.run('printf "%s|%s" "$A" "$B"', env={"A": "x y'z", "B": "$HOME;"})
    assert result.stdout == b"x y'z|$HOME;"
    with pytest.raises(ConfigError):
        h1.run("true", env={"BAD NAME": "1"})


def test_timeout_raises_and_connection_survives(h1):
    marker = f"rr-timeout-{uuid.uuid4().hex[:8]}"
    with pytest.raises(CommandTimeout) as info:
        h1.run(["sh", "-c", f"sleep 300; echo {marker}"], timeout=1)
    assert info.value.host == "h1" and info.value.seconds == 1
    assert h1.run(["echo", "still here"]).stdout == b"still here\n"
    pattern = "[r]" + marker[1:]  # does not match the pkill command line itself
    h1.run(f"pkill -f {pattern} || true")


def test_exec_channel_streams(h1):
    channel = h1.exec_channel("cat; echo done >&2; exit 4")
    channel.sendall(b"ping\n")
    channel.shutdown_write()
    assert channel.makefile("rb").read() == b"ping\n"
    assert channel.recv_exit_status() == 4
    assert channel.makefile_stderr("rb").read() == b"done\n"
    channel.close()


def test_a_command_is_sent_without_waiting_and_a_refused_one_closes_its_channel(h1):
    from remote_runner.channelio import start_command
    channel = h1.exec_channel("cat")  # data sent right behind the request reaches the command
    channel.sendall(b"right behind\n")
    channel.shutdown_write()
    assert channel.makefile("rb").read() == b"right behind\n" and channel.recv_exit_status() == 0
    channel.close()
    refused = h1._open_session()
    start_command(refused, "sleep 5")
    start_command(refused, "echo never")  # the host refuses a second command on one channel
    assert refused.makefile("rb").read() == b""  # ...which ends the channel: no output
    assert refused.recv_exit_status() == -1  # and no exit status
    refused.close()


def test_pty_channel(h1):
    channel = h1.exec_channel("tty", get_pty=True, width=100, height=30)
    assert channel.makefile("rb").read().startswith(b"/dev/pts/")
    assert channel.recv_exit_status() == 0
    channel.close()


def test_one_connection_many_threads(h1):
    results: Dict[int, RunResult] = {}

    def worker(index: int) -> None:
        results[index] = h1.run(["echo", str(index)])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i}\n".encode() for i in range(8)}


def test_sftp_is_created_once(h1):
    first = h1.sftp()
    assert h1.sftp() is first
    assert "etc" in first.listdir("/")


def test_close_is_idempotent_and_context_manager(lab):
    with Connection("h2", lab_options(lab)) as connection:
        assert connection.run(["echo", "lazy"]).stdout == b"lazy\n"  # connects on first use
        transport = connection.transport
    assert not transport.is_active()
    connection.close()
    assert not connection.is_alive()
    with pytest.raises(HostError):
        connection.run("true")


def test_the_connection_sends_each_message_at_once(lab):
    """TCP_NODELAY and quick ACKs (see remote_runner.tcp): no message of ours or of
    sshd's waits for the other side's delayed ACK (about 40 ms on Linux)."""
    import socket
    with Connection("h2", lab_options(lab)) as connection:
        connection.connect()
        sock = connection.transport.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert connection.run(["echo", "fast"]).stdout == b"fast\n"
        # every read is acknowledged at once (sshd's next message need not wait for it)
        assert isinstance(sock, QuickAckSocket)
        # ... and the wrapper is the socket for everything else paramiko asks of it
        assert sock.getpeername() == sock._sock.getpeername()


def test_a_quick_ack_socket_reads_and_passes_everything_else_through():
    import socket
    left, right = socket.socketpair()
    try:
        wrapped = QuickAckSocket(left)  # not TCP: the ACK request fails quietly
        right.sendall(b"hello")
        assert wrapped.recv(5) == b"hello"
        wrapped.sendall(b"back")
        assert right.recv(4) == b"back" and wrapped.fileno() == left.fileno()
    finally:
        left.close()
        right.close()


def test_the_local_host_name_is_asked_of_dns_only_for_a_value_that_uses_it(tmp_path, monkeypatch):
    # paramiko computes %l (a reverse DNS lookup) for every IdentityFile, User... it
    # expands: with a resolver that does not answer, seconds per value before any packet.
    asked: List[str] = []

    def fqdn(*_args: object) -> str:
        asked.append("fqdn")
        return "far.example"

    monkeypatch.setattr(socket, "getfqdn", fqdn)
    config = tmp_path / "ssh_config"
    config.write_text("Host plain\n  IdentityFile ~/.ssh/id_%h_%r\n  User bob\n  Port 2222\n"
                      "Host shared\n  ControlPath /tmp/cm-%l-%h-%p\n")
    plain = load_ssh_config(str(config)).lookup("plain")
    assert plain["identityfile"] == [os.path.expanduser("~/.ssh/id_plain_bob")]
    assert asked == []
    shared = load_ssh_config(str(config)).lookup("shared")
    assert shared["controlpath"] == "/tmp/cm-far.example-shared-22"
    assert asked == ["fqdn"]


def test_a_big_ssh_config_is_read_as_paramiko_reads_it_without_asking_for_the_user(
        tmp_path, monkeypatch):
    """Literal Host names are compared as they are and blocks without Match ask nothing; what
    a lookup gives is paramiko's own answer, wildcards, negations and Match included."""
    text = "".join(f"Host h{i} 10.0.0.{i}\n  HostName 10.0.0.{i}\n  Port {2000 + i}\n"
                   for i in range(1, 200))
    text += ("Host *.example.com !bad.example.com\n  User ex\nHost web? db[12]\n  User pat\n"
             "Host !h3 h*\n  IdentityFile ~/.ssh/h_%h\nMatch host h7\n  User matched\n"
             "Host *\n  ServerAliveInterval 5\n")
    config = tmp_path / "ssh_config"
    config.write_text(text)
    stock = paramiko.SSHConfig.from_text(text)
    names = ["h1", "h3", "h7", "h199", "h200", "x.example.com", "bad.example.com", "web1",
             "web12", "db2", "db3", "H1", "10.0.0.5"]
    expected = {name: stock.lookup(name) for name in names}
    asked = []
    real = getpass.getuser
    monkeypatch.setattr(getpass, "getuser", lambda: asked.append(1) or real())
    ours = load_ssh_config(str(config))
    assert {name: ours.lookup(name) for name in names} == expected
    # the user name is asked for the Match block and the final expansion, not once per block
    # (paramiko itself asks ~200 times per lookup here)
    assert 0 < len(asked) <= 4 * len(names)
    asked.clear()
    stock.lookup("h1")
    assert len(asked) > 150


def test_explicit_user_wins_over_ssh_config(lab):
    with Connection("h1", lab_options(lab, user="rrtest")) as by_option:
        assert by_option.username == "rrtest"
        assert by_option.run(["id", "-un"]).stdout == b"rrtest\n"
    with Connection("rrtest@h1", lab_options(lab, user="root")) as by_spec:
        assert by_spec.run(["id", "-un"]).stdout == b"rrtest\n"


# --------------------------------------------------------------------------- host keys


def test_unknown_host_key_is_refused_naming_the_flag(lab, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h1", str(known)))
    with pytest.raises(HostKeyError) as info:
        Connection("h1", SSHOptions(ssh_config_file=str(config))).connect()
    assert "--accept-new-host-keys" in str(info.value)
    assert info.value.host == "h1"
    assert known.read_text() == ""


def test_accept_new_appends_one_line_then_plain_connect_works(lab, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("# my own comment\n")
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h1", str(known)))
    hostname = lab_entry(lab, "h1")["hostname"]
    with Connection("h1", SSHOptions(ssh_config_file=str(config), accept_new_host_keys=True)) as c:
        assert c.run(["true"]).exit_status == 0
    lines = known.read_text().splitlines()
    assert lines[0] == "# my own comment"
    assert lines[1:] == [f"{hostname} {' '.join(lab_known_line(lab, 'h1'))}"]
    with Connection("h1", SSHOptions(ssh_config_file=str(config))) as again:
        assert again.run(["true"]).exit_status == 0
    assert len(known.read_text().splitlines()) == 2


def test_strict_host_key_checking_accept_new_in_config(lab, tmp_path):
    known = tmp_path / "known_hosts"
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h2", str(known), StrictHostKeyChecking="accept-new"))
    with Connection("h2", SSHOptions(ssh_config_file=str(config))) as connection:
        connection.connect()
    assert len(known.read_text().splitlines()) == 1


def test_strict_host_key_checking_no_acts_as_accept_new(lab, tmp_path, caplog):
    known = tmp_path / "known_hosts"
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h3", str(known), StrictHostKeyChecking="no"))
    with Connection("h3", SSHOptions(ssh_config_file=str(config))) as connection:
        connection.connect()
    assert len(known.read_text().splitlines()) == 1
    assert "treated as accept-new" in caplog.text
    known.write_text(known.read_text().replace(lab_known_line(lab, "h3")[1],
                                               lab_known_line(lab, "h2")[1]))
    with pytest.raises(HostKeyError, match="CHANGED"):
        Connection("h3", SSHOptions(ssh_config_file=str(config))).connect()


def test_changed_host_key_is_refused_even_with_accept_new(lab, tmp_path):
    hostname = lab_entry(lab, "h1")["hostname"]
    wrong = " ".join(lab_known_line(lab, "h2"))
    known = tmp_path / "known_hosts"
    known.write_text(f"{hostname} {wrong}\n")
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h1", str(known)))
    for accept in (False, True):
        with pytest.raises(HostKeyError) as info:
            Connection("h1", SSHOptions(ssh_config_file=str(config),
                                        accept_new_host_keys=accept)).connect()
        message = str(info.value)
        assert "CHANGED" in message and "ssh-keygen" in message and "-R" in message
        assert f"{known}:1" in message
    assert known.read_text() == f"{hostname} {wrong}\n"


def test_hashed_known_hosts_entry_is_accepted(lab, tmp_path):
    hostname = lab_entry(lab, "h3")["hostname"]
    known = tmp_path / "known_hosts"
    known.write_text(f"{paramiko.HostKeys.hash_host(hostname)} {' '.join(lab_known_line(lab, 'h3'))}\n")
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h3", str(known)))
    with Connection("h3", SSHOptions(ssh_config_file=str(config))) as connection:
        assert connection.run(["true"]).exit_status == 0


# --------------------------------------------------------------------------- authentication


def _new_key(path) -> str:
    """Create an unencrypted ed25519 key pair at *path* with ssh-keygen; return the public line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return open(f"{path}.pub").read().strip()


def _raw_transport(lab, name="h1") -> paramiko.Transport:
    """A paramiko transport to lab host *name*, key exchange done, not authenticated."""
    import socket
    entry = lab_entry(lab, name)
    transport = paramiko.Transport(socket.create_connection((entry["hostname"], int(entry.get("port", 22)))))
    transport.start_client(timeout=30)
    return transport


def test_a_key_is_offered_in_one_round_trip_and_a_rejected_one_leaves_the_next_its_chance(lab, tmp_path):
    """The signed request goes right behind the service request, before the accept comes back."""
    from paramiko.common import MSG_USERAUTH_REQUEST
    from remote_runner import sshauth
    transport = _raw_transport(lab)
    sent: List[int] = []
    accepts: List[List[int]] = []  # what had been sent when each accept arrived
    send = transport._send_message
    transport._send_message = lambda m: sent.append(m.asbytes()[0]) or send(m)
    real = sshauth.OneTripAuth._parse_service_accept

    def accept(self, m):
        accepts.append(list(sent))
        real(self, m)

    try:
        sshauth.OneTripAuth._parse_service_accept = accept
        _new_key(tmp_path / "stranger")
        stranger = paramiko.PKey.from_path(str(tmp_path / "stranger"))
        with pytest.raises(paramiko.AuthenticationException):
            sshauth.auth_publickey(transport, "root", stranger)
        assert transport.is_active() and not transport.is_authenticated()
        key = paramiko.PKey.from_path(lab_entry(lab, "h1")["identityfile"][0])
        handler = sshauth.auth_publickey(transport, "root", key)
        assert handler.sent_early and transport.is_authenticated()
        assert len(accepts) == 2 and all(MSG_USERAUTH_REQUEST in before for before in accepts)
        assert sent.count(MSG_USERAUTH_REQUEST) == 2  # one request per key, none sent twice
        channel = transport.open_session()
        channel.exec_command("id -un")
        assert channel.makefile("rb").read() == b"root\n"
    finally:
        sshauth.OneTripAuth._parse_service_accept = real
        transport.close()


def test_an_rsa_key_waits_for_the_accept_until_the_server_named_its_signature_algorithms():
    from remote_runner import sshauth

    class Transport:
        server_extensions: Dict[str, bytes] = {}

    transport = Transport()
    handler = sshauth.OneTripAuth(transport)
    handler.auth_method = "publickey"
    handler.private_key = paramiko.RSAKey.generate(1024)
    assert not handler._may_send_early()
    transport.server_extensions = {"server-sig-algs": b"rsa-sha2-256,ssh-ed25519"}
    assert handler._may_send_early()
    transport.server_extensions = {}
    handler.private_key = paramiko.ECDSAKey.generate()  # its algorithm is its type: no wait
    assert handler._may_send_early()
    handler.auth_method = "password"
    assert not handler._may_send_early()


def test_unauthorized_key_gives_auth_error_naming_host(lab, tmp_path):
    key = tmp_path / "stranger"
    _new_key(key)
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h1", lab_entry(lab, "h1")["userknownhostsfile"],
                                 IdentityFile=str(key)))
    with pytest.raises(AuthError) as info:
        Connection("h1", SSHOptions(ssh_config_file=str(config))).connect()
    message = str(info.value)
    assert info.value.host == "h1" and "h1" in message
    assert "rejected" in message and "--user" in message


def test_no_credentials_at_all_gives_auth_error(lab, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h1", lab_entry(lab, "h1")["userknownhostsfile"],
                                 IdentityFile=""))
    with pytest.raises(AuthError) as info:
        Connection("h1", SSHOptions(ssh_config_file=str(config))).connect()
    assert "password: none given" in str(info.value)


@pytest.fixture
def rrtest_key(lab, tmp_path):
    """An encrypted key authorized for rrtest on h1 (removed afterwards)."""
    passphrase = f"pass-{uuid.uuid4().hex[:8]}"
    key = tmp_path / "enc_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", key.name + uuid.uuid4().hex,
                    "-f", str(key)], check=True)
    public = open(f"{key}.pub").read().strip()
    comment = public.split()[-1]
    ssh(lab, "h1", "install -d -m 700 -o rrtest -g rrtest /home/rrtest/.ssh && "
                   f"echo '{public}' >> /home/rrtest/.ssh/authorized_keys && "
                   "chown rrtest: /home/rrtest/.ssh/authorized_keys && "
                   "chmod 600 /home/rrtest/.ssh/authorized_keys")
    yield key, passphrase
    ssh(lab, "h1", f"sed -i '/ {comment}$/d' /home/rrtest/.ssh/authorized_keys")


def test_encrypted_key_uses_password_as_passphrase(lab, tmp_path, rrtest_key):
    key, passphrase = rrtest_key
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h1", lab_entry(lab, "h1")["userknownhostsfile"],
                                 IdentityFile=str(key), User="rrtest"))
    with Connection("h1", SSHOptions(ssh_config_file=str(config), password=passphrase)) as c:
        assert c.run(["id", "-un"]).stdout == b"rrtest\n"
    with pytest.raises(AuthError) as info:
        Connection("h1", SSHOptions(ssh_config_file=str(config))).connect()
    assert "encrypted" in str(info.value)
    with pytest.raises(AuthError) as info:
        Connection("h1", SSHOptions(ssh_config_file=str(config), password="not-it")).connect()
    assert str(key) in str(info.value) and "not-it" not in str(info.value)


def test_password_option_does_not_spoil_an_unencrypted_key(lab):
    """SPAR's -p is the login password: an unencrypted IdentityFile must still work with it."""
    options = lab_options(lab)
    options.password = "a-login-password-not-a-passphrase"
    with Connection("h1", options) as connection:
        assert connection.run(["id", "-un"]).stdout == b"root\n"


def test_default_key_in_home_is_used(lab, tmp_path, isolated_home):
    ssh_dir = isolated_home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "id_ed25519").write_bytes(open(lab_entry(lab, "h2")["identityfile"][0], "rb").read())
    (ssh_dir / "id_ed25519").chmod(0o600)
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h2", lab_entry(lab, "h2")["userknownhostsfile"],
                                 IdentityFile="", IdentitiesOnly="no"))
    with Connection("h2", SSHOptions(ssh_config_file=str(config))) as connection:
        assert connection.run(["true"]).exit_status == 0


@pytest.fixture
def agent(tmp_path, monkeypatch):
    """A private ssh-agent (unix socket) for this test, stopped by PID afterwards."""
    sock = tmp_path / "agent.sock"
    process = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), "ssh-agent did not start"
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield sock
    finally:
        process.terminate()
        process.wait(30)


def test_agent_key_is_used_first(lab, tmp_path, agent):
    key = tmp_path / "agent_key"
    key.write_bytes(open(lab_entry(lab, "h1")["identityfile"][0], "rb").read())
    key.chmod(0o600)
    subprocess.run(["ssh-add", "-q", str(key)], check=True, capture_output=True)
    public = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], check=True, capture_output=True,
                            text=True).stdout
    key.unlink()  # only the agent holds the private key now
    known = lab_entry(lab, "h1")["userknownhostsfile"]
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h1", known, IdentityFile="", IdentitiesOnly="no"))
    with Connection("h1", SSHOptions(ssh_config_file=str(config))) as connection:
        assert connection.run(["id", "-un"]).stdout == b"root\n"
    config.write_text(host_block(lab, "h1", known, IdentityFile="", IdentitiesOnly="yes"))
    with pytest.raises(AuthError):  # IdentitiesOnly and no IdentityFile: the agent is not asked
        Connection("h1", SSHOptions(ssh_config_file=str(config))).connect()
    (tmp_path / "agent_key.pub").write_text(public)  # IdentityFile names the agent's key
    config.write_text(host_block(lab, "h1", known, IdentityFile=str(key), IdentitiesOnly="yes"))
    with Connection("h1", SSHOptions(ssh_config_file=str(config))) as connection:
        assert connection.run(["true"]).exit_status == 0


def test_password_auth_and_password_never_leaks(lab, tmp_path, caplog):
    probe = ssh(lab, "h1", "sshd -T 2>/dev/null | grep -i '^passwordauthentication'", check=False)
    if "yes" not in probe.stdout:
        pytest.skip("lab sshd does not allow PasswordAuthentication")
    password = f"Pw-{uuid.uuid4().hex}"
    ssh(lab, "h1", f"echo rrtest:{password} | chpasswd")
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h1", lab_entry(lab, "h1")["userknownhostsfile"],
                                 IdentityFile="", User="rrtest"))
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="paramiko")  # an earlier in-process CLI quietened it
    options = SSHOptions(ssh_config_file=str(config), password=password)
    with Connection("h1", options) as connection:
        assert connection.run(["id", "-un"]).stdout == b"rrtest\n"
        assert password not in repr(connection)
    with pytest.raises(AuthError) as info:
        Connection("h1", SSHOptions(ssh_config_file=str(config), password="wrong-" + password)).connect()
    assert "password: rejected" in str(info.value)
    assert password not in repr(options) and "***" in repr(options)
    assert password not in str(info.value)
    assert password not in caplog.text
    assert "Authentication (password) successful" in caplog.text  # the log really was captured


# --------------------------------------------------------------------------- reachability


def _lab_unused_address(lab) -> str:
    """Return an address in the lab network that no host uses (host part 250)."""
    prefix = lab_entry(lab, "h1")["hostname"].rsplit(".", 1)[0]
    return f"{prefix}.250"


def test_unreachable_address_fails_within_timeout(lab, tmp_path):
    options = SSHOptions(ssh_config_file=str(tmp_path / "empty"), connect_timeout=2)
    (tmp_path / "empty").write_text("")
    started = time.monotonic()
    with pytest.raises(UnreachableError) as info:
        Connection(_lab_unused_address(lab), options).connect()
    assert time.monotonic() - started < 60  # bounded by the 2 s timeout, generous for slow hosts
    assert _lab_unused_address(lab) in str(info.value)


def test_closed_port_is_unreachable(tmp_path):
    (tmp_path / "empty").write_text("")
    with socket_on_free_port() as port:
        pass  # the port is closed again now
    with pytest.raises(UnreachableError) as info:
        Connection(f"127.0.0.1:{port}", SSHOptions(ssh_config_file=str(tmp_path / "empty"))).connect()
    assert "127.0.0.1" in str(info.value)


class socket_on_free_port:
    """Find a free local TCP port (bind, then release; never listens)."""

    def __enter__(self) -> int:
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_killed_server_side_gives_host_error(lab):
    connection = Connection("h3", lab_options(lab)).connect()
    try:
        with pytest.raises(HostError) as info:
            connection.run("kill -9 $PPID; sleep 60", timeout=120)
        assert not isinstance(info.value, CommandTimeout)
        assert "lost" in str(info.value)
        assert not connection.is_alive()
        with pytest.raises(HostError):
            connection.run("true")
    finally:
        connection.close()


def test_silent_server_is_detected_by_keepalive(lab):
    connection = Connection("h2", lab_options(lab, keepalive=1)).connect()
    server_pid = connection.run("echo $PPID").stdout.strip().decode()
    ssh(lab, "h2", f"kill -STOP {server_pid}")
    try:
        with pytest.raises(HostError) as info:
            connection.run("sleep 1", timeout=300)
        assert not isinstance(info.value, CommandTimeout)
        assert "did not answer" in str(info.value)
    finally:
        ssh(lab, "h2", f"kill -9 {server_pid}", check=False)
        connection.close()


# --------------------------------------------------------------------------- proxies


def _client_address(connection: Connection) -> str:
    """Return the address the server sees the SSH client at."""
    return connection.run("echo $SSH_CONNECTION").stdout.split()[0].decode()


def test_proxyjump_through_h1_to_h2(lab, tmp_path):
    known = lab_entry(lab, "h1")["userknownhostsfile"]
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h1", known) + host_block(lab, "h2", known, ProxyJump="h1"))
    with Connection("h2", SSHOptions(ssh_config_file=str(config))) as connection:
        assert _client_address(connection) == lab_entry(lab, "h1")["hostname"]
        assert connection.run(["echo", "via"]).stdout == b"via\n"
        jump = connection._jump
        assert jump is not None and jump.is_alive()
    assert not jump.is_alive()


def test_multi_hop_proxyjump(lab, tmp_path):
    known = lab_entry(lab, "h1")["userknownhostsfile"]
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h1", known) + host_block(lab, "h2", known)
                      + host_block(lab, "h3", known, ProxyJump="h1,h2"))
    with Connection("h3", SSHOptions(ssh_config_file=str(config))) as connection:
        assert _client_address(connection) == lab_entry(lab, "h2")["hostname"]


def test_proxyjump_host_key_is_verified_too(lab, tmp_path):
    known = tmp_path / "known_hosts"
    h2_name = lab_entry(lab, "h2")["hostname"]
    known.write_text(f"{h2_name} {' '.join(lab_known_line(lab, 'h2'))}\n")  # h1 unknown
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h1", str(known)) + host_block(lab, "h2", str(known), ProxyJump="h1"))
    with pytest.raises(HostKeyError) as info:
        Connection("h2", SSHOptions(ssh_config_file=str(config))).connect()
    assert "ProxyJump host h1" in str(info.value) and info.value.host == "h2"


def test_proxyjump_loop_is_a_config_error(lab, tmp_path):
    known = lab_entry(lab, "h1")["userknownhostsfile"]
    config = tmp_path / "ssh_config"
    config.write_text(host_block(lab, "h1", known, ProxyJump="h2")
                      + host_block(lab, "h2", known, ProxyJump="h1"))
    with pytest.raises(ConfigError) as info:
        Connection("h1", SSHOptions(ssh_config_file=str(config))).connect()
    assert "loop" in str(info.value)


def test_proxycommand(lab, tmp_path):
    known = lab_entry(lab, "h1")["userknownhostsfile"]
    config = tmp_path / "ssh_config"
    proxy = f"ssh -F {lab.ssh_config} -o BatchMode=yes -W %h:%p h1"
    config.write_text(host_block(lab, "h2", known, ProxyCommand=proxy))
    with Connection("h2", SSHOptions(ssh_config_file=str(config))) as connection:
        assert _client_address(connection) == lab_entry(lab, "h1")["hostname"]
        process = connection._proxy.process
    assert process.poll() is not None  # the proxy process was ended and reaped


def test_host_key_alias_is_looked_up_bare_whatever_the_port(lab, tmp_path):
    """HostKeyAlias names the key as OpenSSH does: no ``[alias]:port`` form, even off port 22."""
    known = tmp_path / "known_hosts"
    known.write_text("lab-second " + " ".join(lab_known_line(lab, "h2")) + "\n")
    config = tmp_path / "ssh_config"
    # The port only names the key here: the proxy command goes to port 22 itself.
    config.write_text(host_block(lab, "h2", str(known), Port="2222", HostKeyAlias="lab-second",
                                 ProxyCommand=f"ssh -F {lab.ssh_config} -o BatchMode=yes "
                                              "-W %h:22 h1"))
    with Connection("h2", SSHOptions(ssh_config_file=str(config))) as connection:
        assert connection.run(["hostname"]).stdout.strip() == b"h2"
    # the system client, the witness, agrees on the same file
    witness = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", "h2", "hostname"],
                             capture_output=True, text=True, timeout=60)
    assert witness.stdout.strip() == "h2", witness.stderr


# --------------------------------------------------------------------------- many hosts


def test_connect_all_success(lab):
    connections = connect_all(["h1", "h2", "h3", "h1"], lab_options(lab, forks=2))
    try:
        assert list(connections) == ["h1", "h2", "h3"]
        assert all(c.is_alive() for c in connections.values())
        assert connections["h3"].run(["echo", "3"]).stdout == b"3\n"
    finally:
        for connection in connections.values():
            connection.close()


def test_connect_all_accept_new_appends_one_line_per_host(lab, tmp_path):
    known = tmp_path / "known_hosts"
    config = tmp_path / "ssh_config"
    config.write_text("".join(host_block(lab, name, str(known)) for name in ("h1", "h2", "h3")))
    options = SSHOptions(ssh_config_file=str(config), accept_new_host_keys=True, forks=3)
    connections = connect_all(["h1", "h2", "h3"], options)
    for connection in connections.values():
        connection.close()
    lines = sorted(known.read_text().splitlines())
    assert lines == sorted(f"{lab_entry(lab, n)['hostname']} {' '.join(lab_known_line(lab, n))}"
                           for n in ("h1", "h2", "h3"))


def test_connect_all_reports_every_failed_host_and_closes_the_rest(lab, tmp_path, monkeypatch):
    closed: List[str] = []
    real_close = Connection.close

    def spy_close(self):
        closed.append(self.alias)
        real_close(self)

    monkeypatch.setattr(Connection, "close", spy_close)
    with socket_on_free_port() as port:
        pass
    bad_port = f"127.0.0.1:{port}"
    nowhere = _lab_unused_address(lab)
    options = lab_options(lab, connect_timeout=2)
    with pytest.raises(ConnectAllError) as info:
        connect_all(["h1", bad_port, "h2", nowhere], options)
    error = info.value
    assert isinstance(error, HostError)
    assert list(error.failures) == [bad_port, nowhere]
    assert all(isinstance(e, UnreachableError) for e in error.failures.values())
    message = str(error)
    assert "127.0.0.1" in message and nowhere in message and "2 host(s)" in message
    assert sorted(closed) == ["h1", "h2"]


# --------------------------------------------------------------------------- pure units


def test_parse_host_forms():
    assert parse_host("h1") == (None, "h1", None)
    assert parse_host("bob@h1:2222") == ("bob", "h1", 2222)
    assert parse_host("[::1]:2200") == (None, "::1", 2200)
    assert parse_host("fe80::1") == (None, "fe80::1", None)
    for bad in ("h1:notaport", "h1:70000", "@h1", ""):
        with pytest.raises(ConfigError):
            parse_host(bad)


def test_precedence_spec_then_option_then_config(tmp_path):
    config = tmp_path / "cfg"
    config.write_text("Host web\n  HostName 192.0.2.7\n  User confuser\n  Port 2022\n"
                      "  ConnectTimeout 4\n  ServerAliveInterval 7\n")
    plain = Connection("web", SSHOptions(ssh_config_file=str(config)))
    assert (plain.hostname, plain.username, plain.port) == ("192.0.2.7", "confuser", 2022)
    assert (plain.connect_timeout, plain.keepalive) == (4, 7)
    option = Connection("web", SSHOptions(ssh_config_file=str(config), user="optuser", port=2200))
    assert (option.username, option.port) == ("optuser", 2200)
    spec = Connection("specuser@web:2300", SSHOptions(ssh_config_file=str(config), user="optuser",
                                                     port=2200))
    assert (spec.username, spec.port) == ("specuser", 2300)
    other = Connection("elsewhere", SSHOptions(ssh_config_file=str(config)))
    assert other.hostname == "elsewhere" and other.port == 22 and other.username


def test_include_is_expanded(tmp_path):
    extra = tmp_path / "conf.d"
    extra.mkdir()
    (extra / "a.conf").write_text("Host inc\n  HostName 192.0.2.9\n")
    main = tmp_path / "cfg"
    main.write_text(f"Host outer\n  User first\n  Include {extra}/*.conf\n  Port 2201\n")
    config = load_ssh_config(str(main))
    assert config.lookup("inc")["hostname"] == "192.0.2.9"
    assert config.lookup("outer")["port"] == "2201"  # the Host block continues after Include


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        Connection("h1", SSHOptions(ssh_config_file=str(tmp_path / "nope")))
    assert "nope" in str(info.value)


def test_resolve_password_order(monkeypatch):
    assert resolve_password("cli", ask=True) == "cli"
    monkeypatch.setenv("REMOTE_RUNNER_PASSWORD", "env")
    assert resolve_password(None, ask=True) == "env"
    monkeypatch.delenv("REMOTE_RUNNER_PASSWORD")
    assert resolve_password(None, ask=False) is None
    monkeypatch.setattr("getpass.getpass", lambda prompt: "typed")
    assert resolve_password(None, ask=True) == "typed"


def test_known_hosts_names_and_patterns(tmp_path):
    key = paramiko.RSAKey.generate(1024)
    other = paramiko.RSAKey.generate(1024)
    assert hostkeys.known_hosts_name("h", 22) == "h"
    assert hostkeys.known_hosts_name("h", 2222) == "[h]:2222"
    path = tmp_path / "kh"
    hostkeys.append(str(path), "[10.0.0.5]:2222", key)
    hostkeys.append(str(path), "hashed.example", key, hash_name=True)
    path.write_text(path.read_text() + f"*.wild.example,!bad.wild.example ssh-rsa {key.get_base64()}\n")
    known = hostkeys.KnownHosts.load([str(path)], [])
    for name in ("[10.0.0.5]:2222", "hashed.example", "a.wild.example"):
        hostkeys.verify("x", name, key, known, accept_new=False)
    for name in ("10.0.0.5", "[10.0.0.5]:22", "bad.wild.example"):
        with pytest.raises(HostKeyError, match="unknown"):
            hostkeys.verify("x", name, key, known, accept_new=False)
    with pytest.raises(HostKeyError, match="CHANGED"):
        hostkeys.verify("x", "hashed.example", other, known, accept_new=True)
    assert "hashed.example" not in path.read_text()


def test_a_known_hosts_file_is_parsed_once_while_it_stays_the_same(tmp_path, monkeypatch):
    """A run connecting to many hosts reads the file once; a line added since (an accepted
    key) is seen at once; a wildcard line still matches as a pattern, a plain one as a name."""
    monkeypatch.setattr(hostkeys, "_SETTLED_NS", 0)
    key = paramiko.RSAKey.generate(1024)
    path = tmp_path / "kh"
    hostkeys.append(str(path), "a.example", key)
    assert [e.patterns for e in hostkeys.read_known_hosts(str(path))] == ["a.example"]
    parsed = []
    real = hostkeys._parse_known_hosts
    monkeypatch.setattr(hostkeys, "_parse_known_hosts", lambda p, lines: parsed.append(p) or real(p, lines))
    assert [e.patterns for e in hostkeys.read_known_hosts(str(path))] == ["a.example"] and not parsed
    hostkeys.append(str(path), "*.b.example", key)
    entries = hostkeys.read_known_hosts(str(path))
    assert [e.patterns for e in entries] == ["a.example", "*.b.example"] and len(parsed) == 1
    assert [e.matches("x.b.example") for e in entries] == [False, True]
    assert [e.matches("a.example") for e in entries] == [True, False]
    assert not any(e.matches("a.examplex") or e.matches("a?example") for e in entries)


class _PacketChannel:
    """Takes at most one packet per ``send``, as a paramiko channel does; closed after *limit* bytes."""

    out_max_packet_size = 32768

    def __init__(self, limit: int = 1 << 30) -> None:
        self.got: List[bytes] = []
        self.limit = limit

    def send(self, data) -> int:
        if sum(map(len, self.got)) >= self.limit:
            return 0
        self.got.append(bytes(data))
        return len(data)


def test_bulk_data_goes_one_packet_at_a_time_and_a_closed_channel_raises():
    """(paramiko's own sendall copies what is left after every packet: a 1 MiB frame is 16 MiB of copies.)"""
    from remote_runner.channelio import send_all_or_raise
    data = os.urandom(100_000)
    channel = _PacketChannel()
    send_all_or_raise(channel, data)
    assert b"".join(channel.got) == data and max(map(len, channel.got)) <= 32768
    send_all_or_raise(channel, b"")  # nothing to send is not a closed channel
    with pytest.raises(OSError):
        send_all_or_raise(_PacketChannel(limit=40_000), data)
