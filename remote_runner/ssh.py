"""One SSH connection per host, shared by the runner and the mirror.

The original tool opened paramiko clients with ``AutoAddPolicy``, no
known_hosts, no ssh_config, no timeouts and the password on argv. Users of a
tool like this expect it to behave like ``ssh``: the aliases, users, ports,
keys, jump hosts and known_hosts files they already configured must just
work, a bad host must fail fast with a message that says what to do, and a
dead network must never hang a run. This module is that layer:

* :class:`SSHOptions` holds the runner-wide settings (what the command line
  gives); the per-host truth comes from ssh_config, read by
  :mod:`remote_runner.sshconfig` (``-F FILE`` or ``~/.ssh/config`` plus
  ``/etc/ssh/ssh_config``, with ``Include``). Precedence: ``user@host:port``
  in the host name, then an explicit ``--user``/``--port``, then ssh_config,
  then the defaults. ``ConnectTimeout`` and ``ServerAliveInterval`` from
  ssh_config win over the option defaults because they are per-host facts.
* Host keys are verified by :mod:`remote_runner.hostkeys`; authentication
  (agent, key files, password) is :mod:`remote_runner.sshauth`.
* ``ProxyJump`` (multi-hop) is a chain of our own connections, each hop
  opening a ``direct-tcpip`` channel on a jump connection shared by every
  target behind it (:mod:`remote_runner.jump`); ``ProxyCommand`` runs
  through ``sh``.
* :mod:`remote_runner.keepalive` asks the server for a reply every
  ``ServerAliveInterval`` seconds and closes the transport after
  ``ServerAliveCountMax`` unanswered intervals, so blocked reads end with
  :class:`HostError` instead of hanging.
* Many hosts at once (bounded, retried, ``--max-fail``): :mod:`remote_runner.fleet`.

A :class:`Connection` is thread-safe: many threads may run commands or open
channels on it at once (paramiko multiplexes them on one transport).
"""

from __future__ import annotations

import logging
import re
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import paramiko

from remote_runner import ciphers, hostkeys, jump, keepalive, tcp
from remote_runner.loginshell import for_login_shell
from remote_runner.traffic import Traffic, open_sftp
from remote_runner.failpolicy import DEFAULT_FORKS
from remote_runner.names import check_name
from remote_runner.proxycommand import ProxyCommand
from remote_runner.errors import (
    AuthError, CommandTimeout, ConfigError, HostError, HostKeyError,
    ConnectionLost, NoSFTP, OutputTooLarge, RemoteCommandError, RunnerError, UnreachableError,
    brief_command,
)
from remote_runner.channelio import (  # noqa: F401 - RunResult: public here
    RunResult, _collect, _draining, open_session, start_command)
from remote_runner.sshauth import (  # noqa: F401 - PASSWORD_ENV, resolve_password: public here
    PASSWORD_ENV, Authentication, resolve_password,
)
from remote_runner.sshconfig import (  # noqa: F401 - imported from here by other modules
    SYSTEM_CONFIG, USER_CONFIG, _local_user, _port, config_paths, load_ssh_config, parse_host,
)

#: The reason code of a channel the server will not open by policy (RFC 4254, 5.1).
OPEN_ADMINISTRATIVELY_PROHIBITED = 1

log = logging.getLogger(__name__)

USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(repr=False)
class SSHOptions:
    """Runner-wide SSH settings; ssh_config supplies the per-host ones."""

    ssh_config_file: Optional[str] = None
    user: Optional[str] = None
    port: Optional[int] = None
    password: Optional[str] = None
    accept_new_host_keys: bool = False
    connect_timeout: float = 10.0
    keepalive: int = 15
    forks: int = DEFAULT_FORKS
    #: extra connection attempts for a host that is unreachable or drops the handshake
    retries: int = 2

    def __repr__(self) -> str:
        return (f"SSHOptions(ssh_config_file={self.ssh_config_file!r}, user={self.user!r}, "
                f"port={self.port!r}, password={'***' if self.password else None}, "
                f"accept_new_host_keys={self.accept_new_host_keys!r}, "
                f"connect_timeout={self.connect_timeout!r}, keepalive={self.keepalive!r}, "
                f"forks={self.forks!r}, retries={self.retries!r})")


# --------------------------------------------------------------------------- connection


class Connection(Authentication):
    """One authenticated SSH transport to one host, reused for every command and channel."""

    def __init__(self, host: str, options: SSHOptions, *, _via: Optional[List[str]] = None,
                 _chain: Tuple[str, ...] = ()) -> None:
        self.spec = host
        self.options = options
        spec_user, self.alias, spec_port = parse_host(host)
        self._config_files = config_paths(options.ssh_config_file)
        self.config = load_ssh_config(options.ssh_config_file).lookup(self.alias)
        where = ", ".join(self._config_files) or None
        self.hostname: str = self.config.get("hostname", self.alias)
        port = spec_port or options.port or self.config.get("port") or 22
        self.port: int = _port(port, f"host {self.alias}", where)
        self.username: str = check_name(
            spec_user or options.user or self.config.get("user") or _local_user(), "user")
        self.connect_timeout = self._number("connecttimeout", options.connect_timeout)
        self.keepalive = self._number("serveraliveinterval", options.keepalive)
        self._alive_count_max = int(self._number("serveralivecountmax", 3))
        self._via = _via
        self._chain = _chain + (self.alias,)
        self._lock = threading.RLock()
        self._sftp_lock = threading.Lock()
        self._transport: Optional[paramiko.Transport] = None
        self._sftp: Optional[paramiko.SFTPClient] = None
        self._jump: Optional[Connection] = None
        self._proxy: Optional[ProxyCommand] = None
        self._watchdog: Optional[keepalive.Watch] = None
        self._closed = False
        #: exec channels, SFTP sessions and requests this connection made (see traffic.py)
        self.traffic = Traffic()

    def __repr__(self) -> str:
        return f"Connection({self.username}@{self.alias} -> {self.hostname}:{self.port})"

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _flag(self, key: str) -> bool:
        """Return ssh_config yes/no *key* as a bool (absent = no)."""
        return str(self.config.get(key, "no")).lower() in ("yes", "true")

    def _number(self, key: str, default: float) -> float:
        """Return ssh_config *key* as a number, else *default*."""
        value = self.config.get(key)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"host {self.alias}: {key} is not a number: {value!r}",
                              file=", ".join(self._config_files), field=key) from None

    # ---------------------------------------------------------------- route (nothing contacted)

    @property
    def jumps(self) -> List[str]:
        """Return the ProxyJump hops ssh_config gives for this host (first hop first)."""
        return list(self._via) if self._via is not None else _jump_list(self.config.get("proxyjump"))

    @property
    def proxy_command(self) -> Optional[str]:
        """Return the ProxyCommand for this host, if any (unused when there are jumps)."""
        return None if self.jumps else (self.config.get("proxycommand") or None)

    def host_key_known(self) -> bool:
        """Tell whether a known_hosts file already holds a key for this host (read locally)."""
        name = (self.config.get("hostkeyalias")
                or hostkeys.known_hosts_name(self.hostname, self.port))
        return bool(self._known_hosts().for_name(name))

    # ---------------------------------------------------------------- connect

    def connect(self) -> "Connection":
        """Open, verify and authenticate the transport (no-op when already connected)."""
        with self._lock:
            if self._transport is not None and self._transport.is_active():
                return self
            self._teardown()
            self._closed = False
            try:
                self._open()
            except RunnerError:
                self._teardown()
                raise
            except Exception as exc:
                self._teardown()
                raise HostError(self.alias, f"unexpected error while connecting: {exc!r}") from exc
            log.debug("%s: connected (%s@%s:%d)", self.alias, self.username, self.hostname,
                      self.port)
            return self

    def _open(self) -> None:
        """Build the transport: socket or jump, handshake, host key, auth, watchdog."""
        sock = self._open_socket()
        transport = paramiko.Transport(sock)
        # paramiko's own log lines then name the host (logger paramiko.transport.host.<alias>).
        transport.set_log_channel("paramiko.transport.host." + self.alias)
        self._transport = transport
        for attr in ("banner_timeout", "auth_timeout", "handshake_timeout"):
            setattr(transport, attr, self.connect_timeout)
        known = self._known_hosts()
        # As OpenSSH does: a HostKeyAlias is looked up bare, whatever the port.
        alias = self.config.get("hostkeyalias")
        name = alias or hostkeys.known_hosts_name(self.hostname, self.port)
        security = transport.get_security_options()
        security.key_types = known.preferred_algorithms(name, list(security.key_types))
        # The cheapest cipher and MAC for bulk copies (see ciphers.py), or ssh_config's choice.
        ciphers.choose(security, self.config, ", ".join(self._config_files) or None)
        try:
            transport.start_client(timeout=self.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if self._proxy is not None:
                raise UnreachableError(self.alias, self._proxy.failure(),
                                       "check the ProxyCommand in ssh_config") from None
            raise UnreachableError(self.alias, f"SSH handshake with {self.hostname}:{self.port} "
                                   f"failed: {exc or type(exc).__name__}",
                                   "is an SSH server listening there?") from exc
        hostkeys.verify(self.alias, name, transport.get_remote_server_key(), known,
                        self._accept_new(), self._flag("hashknownhosts"))
        self._authenticate(transport)
        if self.keepalive > 0:
            transport.set_keepalive(int(self.keepalive))
            self._watchdog = keepalive.MONITOR.watch(self.alias, transport, self.keepalive,
                                                     self._alive_count_max)

    def _open_socket(self) -> Union[socket.socket, tcp.QuickAckSocket, paramiko.Channel,
                                    ProxyCommand]:
        """Return a connected byte stream to the SSH server (direct, ProxyJump or ProxyCommand)."""
        jumps = self._via if self._via is not None else _jump_list(self.config.get("proxyjump"))
        if jumps:
            return self._open_via_jump(jumps)
        command = self.config.get("proxycommand")
        if command:
            log.debug("%s: ProxyCommand %s", self.alias, command)
            try:
                self._proxy = ProxyCommand(command)
            except Exception as exc:
                raise UnreachableError(self.alias, f"ProxyCommand failed to start: {exc}") from exc
            return self._proxy
        return self._open_tcp()

    def _open_tcp(self) -> Union[socket.socket, tcp.QuickAckSocket]:
        """Connect a TCP socket within the connect timeout, or raise UnreachableError."""
        target = f"{self.hostname}:{self.port}"
        try:
            sock = socket.create_connection((self.hostname, self.port), timeout=self.connect_timeout)
        except socket.gaierror as exc:
            raise UnreachableError(self.alias, f"cannot resolve {self.hostname}: {exc.strerror}",
                                   "check the name or HostName in ssh_config") from exc
        except socket.timeout as exc:
            raise UnreachableError(self.alias, f"no answer from {target} within "
                                   f"{self.connect_timeout:g} s", "is the host up?") from exc
        except OSError as exc:
            raise UnreachableError(self.alias, f"cannot connect to {target}: "
                                   f"{exc.strerror or exc}", "is the host up and sshd running?") from exc
        return tcp.tune(sock)

    def _open_via_jump(self, jumps: List[str]) -> paramiko.Channel:
        """Connect the last jump host (through the earlier ones) and tunnel to our host."""
        last = jumps[-1]
        jump_alias = parse_host(last)[1]
        if jump_alias in self._chain:
            raise ConfigError(f"ProxyJump loop: {' -> '.join(self._chain + (jump_alias,))}",
                              field="ProxyJump")
        jump_options = SSHOptions(
            ssh_config_file=self.options.ssh_config_file, password=self.options.password,
            accept_new_host_keys=self.options.accept_new_host_keys,
            connect_timeout=self.options.connect_timeout, keepalive=self.options.keepalive)
        try:  # one connection per bastion, shared by every target behind it (see jump.py)
            self._jump = jump.SHARED.acquire(tuple(jumps), jump_options, self._chain)
        except (UnreachableError, HostKeyError, AuthError) as exc:
            raise type(exc)(self.alias, f"through ProxyJump host {exc.host}: {exc.message}",
                            exc.hint) from exc
        try:
            return self._jump.transport.open_channel(
                "direct-tcpip", (self.hostname, self.port), ("127.0.0.1", 0),
                timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if getattr(exc, "code", None) == OPEN_ADMINISTRATIVELY_PROHIBITED:
                raise UnreachableError(self.alias, f"jump host {self._jump.alias} refuses to forward "
                                       f"connections to {self.hostname}:{self.port} (administratively "
                                       "prohibited)", "its sshd's AllowTcpForwarding or PermitOpen forbids "
                                       "it: ask its admin, or reach this host another way") from exc
            raise UnreachableError(self.alias, f"jump host {self._jump.alias} cannot reach "
                                   f"{self.hostname}:{self.port}: {exc}",
                                   "check HostName/Port for this host") from exc

    def _known_hosts(self) -> hostkeys.KnownHosts:
        """Load the known_hosts files ssh_config names (or the OpenSSH defaults)."""
        user = hostkeys.split_files(self.config.get("userknownhostsfile"), USER_KNOWN_HOSTS)
        system = hostkeys.split_files(self.config.get("globalknownhostsfile"), GLOBAL_KNOWN_HOSTS)
        return hostkeys.KnownHosts.load(user, system)

    def _accept_new(self) -> bool:
        """Return whether an unknown host key may be recorded (flag or ssh_config)."""
        if self.options.accept_new_host_keys:
            return True
        strict = str(self.config.get("stricthostkeychecking", "ask")).lower()
        if strict in ("no", "off"):
            log.warning("host %s: StrictHostKeyChecking %s is treated as accept-new "
                        "(changed keys are still refused)", self.alias, strict)
            return True
        return strict == "accept-new"

    # ---------------------------------------------------------------- use

    @property
    def transport(self) -> paramiko.Transport:
        """Return the live transport, connecting first if this connection never was."""
        with self._lock:
            if self._transport is None and not self._closed:
                self.connect()
            transport = self._transport
        if transport is None:
            raise HostError(self.alias, "the SSH connection is closed")
        if not transport.is_active():
            reason = self._watchdog.reason if self._watchdog else ""
            raise ConnectionLost(self.alias, f"the SSH connection was lost{reason}",
                                 "check the host and the network, then run again")
        return transport

    def is_alive(self) -> bool:
        """Return True if the transport is up and authenticated."""
        transport = self._transport
        return bool(transport is not None and transport.is_active() and transport.is_authenticated())

    def exec_channel(self, command: str, *, get_pty: bool = False, term: str = "xterm",
                     width: int = 80, height: int = 24) -> paramiko.Channel:
        """Start *command* on a new session channel and return the channel for streaming."""
        channel = self._open_session()
        self.traffic.count("execs")
        try:
            if get_pty:
                channel.get_pty(term=term, width=width, height=height)
                channel.exec_command(for_login_shell(command))
            else:
                start_command(channel, command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            channel.close()
            raise self._lost(f"cannot start `{brief_command(command)}`", exc) from exc
        return channel

    def run(self, argv: Union[List[str], str], *, stdin: Optional[bytes] = None,
            timeout: Optional[float] = 60, check: bool = True,
            env: Optional[Dict[str, str]] = None) -> RunResult:
        """Run a command, feeding *stdin* and collecting all output; raise on failure if *check*."""
        command = argv if isinstance(argv, str) else shlex.join([str(a) for a in argv])
        if env:
            command = _env_prefix(env, self.alias) + command
        deadline = None if timeout is None else time.monotonic() + timeout
        sent = _draining(command) if stdin else command
        channel = self.exec_channel(sent)
        try:
            result = _collect(channel, stdin, deadline)
        except OutputTooLarge as exc:
            raise OutputTooLarge(self.alias, f"command `{brief_command(command)}`") from exc
        finally:
            channel.close()
        if result is None:
            raise CommandTimeout(self.alias, f"command `{brief_command(command)}`", timeout or 0)
        if result.exit_status == -1 and not self._transport_active():
            raise self._lost(f"command `{brief_command(command)}` did not finish", None)
        if check and result.exit_status != 0:
            raise RemoteCommandError(self.alias, command, result.exit_status,
                                     result.stderr.decode("utf-8", "replace"))
        return result

    def sftp(self) -> paramiko.SFTPClient:
        """Return this connection's single SFTP client, opening it on first use."""
        with self._sftp_lock:
            if self._sftp is None or self._sftp.sock.closed:
                self._sftp = self.open_sftp()
            return self._sftp

    def open_sftp(self) -> paramiko.SFTPClient:
        """Start one more SFTP session (a parallel upload lane); the caller closes it."""
        try:
            return open_sftp(self.transport, self.traffic)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            error = self._lost("cannot start the SFTP subsystem", exc)
            if isinstance(error, ConnectionLost):
                raise error from exc
            raise NoSFTP(error.host, error.message, error.hint) from exc

    def close(self) -> None:
        """Close SFTP, the transport and any jump host; safe to call twice."""
        with self._lock:
            self._closed = True
            self._teardown()

    def _teardown(self) -> None:
        """Release everything this connection holds."""
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        with self._sftp_lock:
            if self._sftp is not None:
                _quietly(self._sftp.close)
                self._sftp = None
        if self._transport is not None:
            _quietly(self._transport.close)
            self._transport = None
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None
        if self._jump is not None:
            jump.SHARED.release(self._jump)
            self._jump = None

    def _open_session(self) -> paramiko.Channel:
        """Open a session channel within the connect timeout."""
        transport = self.transport
        try:
            return open_session(transport, self.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise self._lost("cannot open a session channel", exc) from exc

    def _transport_active(self) -> bool:
        """Return whether the transport is still up."""
        transport = self._transport
        return bool(transport is not None and transport.is_active())

    def _lost(self, what: str, exc: Optional[BaseException]) -> HostError:
        """Build the HostError for a failure caused by (or looking like) a lost connection."""
        if self._transport_active():
            return HostError(self.alias, f"{what}: {exc}")
        reason = self._watchdog.reason if self._watchdog else ""
        return ConnectionLost(self.alias, f"{what}: the SSH connection was lost{reason}",
                              "check the host and the network, then run again")


def _jump_list(value: Optional[str]) -> List[str]:
    """Split a ProxyJump value into hops (empty for none)."""
    if not value or value.strip().lower() == "none":
        return []
    return [hop.strip() for hop in value.split(",") if hop.strip()]


def _env_prefix(env: Dict[str, str], host: str) -> str:
    """Return ``export K=V; ...`` for *env*, refusing names a shell cannot take."""
    parts = []
    for name, value in env.items():
        if not _ENV_NAME.match(str(name)):
            raise ConfigError(f"host {host}: bad environment variable name {name!r}", field="env")
        parts.append(f"export {name}={shlex.quote(str(value))}; ")
    return "".join(parts)


def _quietly(action: Callable[[], object]) -> None:
    """Run a cleanup step, logging instead of raising."""
    try:
        action()
    except Exception as exc:  # cleanup must go on
        log.debug("cleanup step failed: %s", exc)


# Names other modules import from here (their homes are below).
from remote_runner.fleet import ConnectAllError, connect_all, connect_some  # noqa: E402,F401
