"""One SSH connection per host, shared by the runner and the mirror.

The original tool opened paramiko clients with ``AutoAddPolicy``, no
known_hosts, no ssh_config, no timeouts and the password on argv. Users of a
tool like this expect it to behave like ``ssh``: the aliases, users, ports,
keys, jump hosts and known_hosts files they already configured must just
work, a bad host must fail fast with a message that says what to do, and a
dead network must never hang a run. This module is that layer:

* :class:`SSHOptions` holds the runner-wide settings (what the command line
  gives); the per-host truth comes from ssh_config (``-F FILE`` or
  ``~/.ssh/config`` plus ``/etc/ssh/ssh_config``, with ``Include``).
  Precedence: ``user@host:port`` in the host name, then an explicit
  ``--user``/``--port``, then ssh_config, then the defaults.
  ``ConnectTimeout`` and ``ServerAliveInterval`` from ssh_config win over the
  option defaults because they are per-host facts.
* Host keys are verified by :mod:`remote_runner.hostkeys`.
* Authentication follows OpenSSH: agent, then key files (``IdentityFile``,
  then ``~/.ssh/id_ed25519``, ``id_ecdsa``, ``id_rsa``; the password unlocks
  an encrypted key), then the password (also as keyboard-interactive).
* ``ProxyJump`` (multi-hop) is a chain of our own connections, each hop
  opening a ``direct-tcpip`` channel; ``ProxyCommand`` runs through ``sh``.
* A watchdog asks the server for a reply every ``ServerAliveInterval``
  seconds and closes the transport after ``ServerAliveCountMax`` unanswered
  intervals, so blocked reads end with :class:`HostError` instead of hanging.

A :class:`Connection` is thread-safe: many threads may run commands or open
channels on it at once (paramiko multiplexes them on one transport).
"""

from __future__ import annotations

import contextvars
import getpass
import glob
import logging
import os
import pwd
import re
import shlex
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import paramiko

from remote_runner import hostkeys, jump, keepalive
from remote_runner.names import check_name
from remote_runner.proxycommand import ProxyCommand
from remote_runner.errors import (
    EXIT_CONFIG, AuthError, CommandTimeout, ConfigError, HostError, HostKeyError,
    ConnectionLost, RemoteCommandError, RunnerError, UnreachableError, brief_command,
)

log = logging.getLogger(__name__)

#: Environment variable the CLI reads the SSH password from.
PASSWORD_ENV = "REMOTE_RUNNER_PASSWORD"
#: Key files tried after the ssh_config IdentityFile entries (OpenSSH order).
DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
USER_CONFIG = "~/.ssh/config"
SYSTEM_CONFIG = "/etc/ssh/ssh_config"
USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
_MAX_INCLUDE_DEPTH = 16
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
    forks: int = 10
    #: extra connection attempts for a host that is unreachable or drops the handshake
    retries: int = 2

    def __repr__(self) -> str:
        return (f"SSHOptions(ssh_config_file={self.ssh_config_file!r}, user={self.user!r}, "
                f"port={self.port!r}, password={'***' if self.password else None}, "
                f"accept_new_host_keys={self.accept_new_host_keys!r}, "
                f"connect_timeout={self.connect_timeout!r}, keepalive={self.keepalive!r}, "
                f"forks={self.forks!r}, retries={self.retries!r})")


@dataclass
class RunResult:
    """What a finished remote command produced."""

    exit_status: int
    stdout: bytes
    stderr: bytes


def resolve_password(cli_value: Optional[str], ask: bool) -> Optional[str]:
    """Return the password from the command line, else $REMOTE_RUNNER_PASSWORD, else a prompt if *ask*."""
    if cli_value is not None:
        return cli_value
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env is not None:
        return from_env
    if ask:
        return getpass.getpass("SSH password: ")
    return None


# --------------------------------------------------------------------------- ssh_config

_config_cache: Dict[Tuple, paramiko.SSHConfig] = {}
_config_lock = threading.Lock()


def config_paths(ssh_config_file: Optional[str]) -> List[str]:
    """Return the ssh_config files to read, like ``ssh [-F FILE]``."""
    if ssh_config_file is not None:
        path = os.path.expanduser(ssh_config_file)
        if not os.path.isfile(path):
            raise ConfigError("ssh_config file not found", file=path, field="ssh_config_file")
        return [path]
    candidates = [os.path.expanduser(USER_CONFIG), SYSTEM_CONFIG]
    return [p for p in candidates if os.path.isfile(p)]


def load_ssh_config(ssh_config_file: Optional[str]) -> paramiko.SSHConfig:
    """Parse (once per file version) the ssh_config that ``ssh [-F FILE]`` would read."""
    paths = config_paths(ssh_config_file)
    key = tuple((p, os.stat(p).st_mtime_ns) for p in paths)
    with _config_lock:
        cached = _config_cache.get(key)
        if cached is not None:
            return cached
        text = "".join(_expand_includes(p, _include_base(p), 0) + "\n" for p in paths)
        try:
            config = paramiko.SSHConfig.from_text(text)
        except Exception as exc:  # paramiko raises ConfigParseError and friends
            raise ConfigError(f"cannot parse ssh_config: {exc}", file=", ".join(paths)) from exc
        _config_cache[key] = config
        return config


def _include_base(path: str) -> str:
    """Return the directory relative Include paths start from (as OpenSSH does)."""
    if os.path.abspath(path) == SYSTEM_CONFIG:
        return "/etc/ssh"
    return os.path.expanduser("~/.ssh")


def _expand_includes(path: str, base: str, depth: int) -> str:
    """Return the text of *path* with every ``Include`` replaced by the files it names."""
    if depth > _MAX_INCLUDE_DEPTH:
        raise ConfigError("Include nested too deeply (a loop?)", file=path)
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read ssh_config: {exc.strerror}", file=path) from exc
    out: List[str] = []
    block = ""
    for number, line in enumerate(lines, 1):
        words = line.strip().split(None, 1)
        keyword = words[0].lower().rstrip("=") if words else ""
        if keyword in ("host", "match"):
            block = line
        if keyword != "include":
            out.append(line)
            continue
        arg = words[1].lstrip("= ") if len(words) > 1 else ""
        try:
            patterns = shlex.split(arg)
        except ValueError as exc:
            raise ConfigError(f"bad Include line: {exc}", file=path, line=number) from exc
        for pattern in patterns:
            pattern = os.path.expanduser(pattern)
            if not os.path.isabs(pattern):
                pattern = os.path.join(base, pattern)
            for included in sorted(glob.glob(pattern)):
                if os.path.isfile(included):
                    out.append(_expand_includes(included, base, depth + 1))
        if block:
            out.append(block)  # the included file may have opened other blocks
    return "\n".join(out)


def parse_host(host: str) -> Tuple[Optional[str], str, Optional[int]]:
    """Split ``[user@]alias[:port]`` (IPv6 as ``[addr]:port``) into its parts."""
    user: Optional[str] = None
    rest = host.strip()
    if rest.startswith("ssh://"):
        rest = rest[len("ssh://"):]
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
    port: Optional[int] = None
    port_text = ""
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ConfigError(f"bad host {host!r}: missing ']'", field="host")
        alias, tail = rest[1:end], rest[end + 1:]
        if tail.startswith(":"):
            port_text = tail[1:]
        elif tail:
            raise ConfigError(f"bad host {host!r}", field="host")
    elif rest.count(":") == 1:
        alias, port_text = rest.split(":")
    else:
        alias = rest
    if port_text:
        port = _port(port_text, f"host {host!r}")
    if not alias or (user is not None and not user):
        raise ConfigError(f"bad host {host!r}: expected [user@]host[:port]", field="host")
    check_name(alias, "host")
    if user is not None:
        check_name(user, "user")
    return user, alias, port


def _port(text: Union[str, int], where: str, file: Optional[str] = None) -> int:
    """Return *text* as a TCP port or raise ConfigError naming *where*."""
    try:
        port = int(text)
    except (TypeError, ValueError):
        port = -1
    if not 0 < port < 65536:
        raise ConfigError(f"{where}: bad port {text!r}", file=file, field="port")
    return port


def _local_user() -> str:
    """Return the local login name (what ssh uses when nothing else says)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return pwd.getpwuid(os.getuid()).pw_name


# --------------------------------------------------------------------------- connection


class Connection:
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

    def _open_socket(self) -> Union[socket.socket, paramiko.Channel, ProxyCommand]:
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

    def _open_tcp(self) -> socket.socket:
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
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock

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

    # ---------------------------------------------------------------- auth

    def _authenticate(self, transport: paramiko.Transport) -> None:
        """Try agent keys, key files, then the password; raise AuthError naming what was tried."""
        tried: List[str] = []
        identities_only = self._flag("identitiesonly")
        agent_off = str(self.config.get("identityagent", "")).lower() == "none"
        files = self._identity_files(identities_only)
        only = _public_blobs(files) if identities_only else None
        if not agent_off and self._try_agent(transport, tried, only):
            return
        for path in filter(os.path.isfile, files):
            key = self._load_key(path, tried)
            if key is not None and self._try_key(transport, key, path, tried):
                return
        if self._try_password(transport, tried):
            return
        if not transport.is_active():
            raise UnreachableError(self.alias, "the connection closed during authentication")
        raise AuthError(
            self.alias,
            f"authentication failed as {self.username}@{self.hostname} "
            f"(tried: {'; '.join(tried) or 'nothing'})",
            "check the user (--user or User in ssh_config), IdentityFile and ssh-agent, "
            f"or give a password (-p or ${PASSWORD_ENV})")

    def _try_agent(self, transport: paramiko.Transport, tried: List[str],
                   only: Optional[set] = None) -> bool:
        """Offer the ssh-agent's keys (with *only*: just those blobs); return True once authenticated."""
        if not os.environ.get("SSH_AUTH_SOCK") or only == set():
            return False
        try:
            agent = paramiko.Agent()
        except (paramiko.SSHException, OSError) as exc:
            tried.append(f"ssh-agent: unavailable ({exc})")
            return False
        try:
            keys = agent.get_keys()
            if not keys:
                tried.append("ssh-agent: no keys")
            for key in keys:
                if only is not None and key.get_base64() not in only:
                    continue
                if self._try_key(transport, key, f"agent key {hostkeys.fingerprint(key)}", tried):
                    return True
        finally:
            agent.close()
        return False

    def _identity_files(self, identities_only: bool) -> List[str]:
        """Return IdentityFile entries, then (unless IdentitiesOnly) the default key files."""
        paths = [os.path.expanduser(p) for p in self.config.get("identityfile", [])]
        if not identities_only:
            paths += [os.path.expanduser(p) for p in DEFAULT_KEYS]
        return [p for i, p in enumerate(paths) if p not in paths[:i]]

    def _load_key(self, path: str, tried: List[str]) -> Optional[paramiko.PKey]:
        """Load a private key file (the password unlocks an encrypted one) or note why not."""
        password = self.options.password
        passphrases = [password.encode("utf-8"), None] if password else [None]
        for passphrase in passphrases:
            try:
                return paramiko.PKey.from_path(path, passphrase)
            except (paramiko.PasswordRequiredException, TypeError):
                # paramiko 5 lets cryptography's TypeError through both for a
                # missing passphrase and for one given to an unencrypted key
                # (SPAR's -p is the login password too): try without it next.
                continue
            except (paramiko.SSHException, OSError, ValueError) as exc:
                tried.append(f"{path}: unusable ({exc})")
                return None
        tried.append(f"{path}: encrypted, give the passphrase with -p")
        return None

    def _try_key(self, transport: paramiko.Transport, key: paramiko.PKey, label: str,
                 tried: List[str]) -> bool:
        """Offer one key; return True once authenticated."""
        try:
            transport.auth_publickey(self.username, key)
        except paramiko.BadAuthenticationType as exc:
            tried.append(f"{label}: server allows only {', '.join(exc.allowed_types)}")
            return False
        except paramiko.AuthenticationException:
            tried.append(f"{label}: rejected")
            return False
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise UnreachableError(self.alias, f"connection lost during authentication: {exc}") from exc
        return transport.is_authenticated()

    def _try_password(self, transport: paramiko.Transport, tried: List[str]) -> bool:
        """Try the password, then keyboard-interactive with it; return True once authenticated."""
        password = self.options.password
        if not password:
            tried.append("password: none given")
            return False
        try:
            transport.auth_password(self.username, password)
            return transport.is_authenticated()
        except paramiko.BadAuthenticationType as exc:
            if "keyboard-interactive" not in exc.allowed_types:
                tried.append(f"password: server allows only {', '.join(exc.allowed_types)}")
                return False
        except paramiko.AuthenticationException:
            tried.append("password: rejected")
            return False
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise UnreachableError(self.alias, f"connection lost during authentication: {exc}") from exc

        def answer(title: str, instructions: str, prompts: List[Tuple[str, bool]]) -> List[str]:
            return [password for _ in prompts]

        try:
            transport.auth_interactive(self.username, answer)
        except paramiko.AuthenticationException:
            tried.append("keyboard-interactive password: rejected")
            return False
        return transport.is_authenticated()

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
        try:
            if get_pty:
                channel.get_pty(term=term, width=width, height=height)
            channel.exec_command(command)
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
                try:
                    self._sftp = paramiko.SFTPClient.from_transport(self.transport)
                except (paramiko.SSHException, EOFError, OSError) as exc:
                    raise self._lost("cannot start the SFTP subsystem", exc) from exc
            return self._sftp

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
            return transport.open_session(timeout=self.connect_timeout)
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


def _public_blobs(paths: List[str]) -> set:
    """Return the base64 public-key blobs of the ``.pub`` files next to *paths* (IdentitiesOnly)."""
    blobs = set()
    for path in paths:
        try:
            with open(path + ".pub", encoding="utf-8") as handle:
                fields = handle.read().split()
        except OSError:
            continue
        if len(fields) >= 2:
            blobs.add(fields[1])
    return blobs


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


def _collect(channel: paramiko.Channel, stdin: Optional[bytes],
             deadline: Optional[float]) -> Optional[RunResult]:
    """Feed stdin and drain stdout/stderr concurrently; return None on timeout."""
    out: List[bytes] = []
    err: List[bytes] = []
    feeder = _Feeder(channel, stdin)
    drains = [
        threading.Thread(target=_drain, args=(channel.recv, out), daemon=True),
        threading.Thread(target=_drain, args=(channel.recv_stderr, err), daemon=True),
    ]
    for thread in drains + [feeder]:
        thread.start()
    for thread in drains:
        thread.join(_remaining(deadline))
        if thread.is_alive():
            break
    finished = not any(t.is_alive() for t in drains) and channel.status_event.wait(
        _remaining(deadline))
    if not finished:
        channel.close()
        for thread in drains + [feeder]:
            thread.join(5)
        return None
    return RunResult(channel.exit_status, b"".join(out), b"".join(err))


def _draining(command: str) -> str:
    """*command*, then read what is left of stdin, keeping the command's exit status.

    A command that exits without reading all the input we send lets the
    server close the channel while paramiko may still send data on it (it
    checks for a close, then sends outside its lock); OpenSSH answers data
    for a freed channel by dropping the whole connection. Draining stdin on
    the host keeps every channel open until our EOF.
    """
    return "sh -c " + shlex.quote("{ " + command + "\n}; s=$?; cat >/dev/null; exit $s")


def _remaining(deadline: Optional[float]) -> Optional[float]:
    """Return seconds left until *deadline* (None = forever, never negative)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _drain(read: Callable[[int], bytes], sink: List[bytes]) -> None:
    """Read a channel stream into *sink* until EOF or close."""
    while True:
        try:
            data = read(1 << 16)
        except (OSError, EOFError, paramiko.SSHException):
            return
        if not data:
            return
        sink.append(data)


class _Feeder(threading.Thread):
    """Send a command's stdin, then EOF, so a command reading stdin never waits forever.

    A command may exit before reading all its input (``tar`` stops at the
    end-of-archive blocks, a script may ``exit``). The server then closes the
    channel, paramiko answers with its own close at once, and an EOF sent
    after that refers to a channel OpenSSH has freed: it drops the whole
    connection, and every other command on it fails. paramiko's
    ``shutdown_write`` checks nothing of this and sends outside the channel
    lock, so EOF is sent here while holding that lock (the one paramiko takes
    to mark the channel closed): either it goes out before the close, or the
    channel is seen closed and nothing is sent. Data cannot be guarded so
    (paramiko waits for window space inside that lock): :func:`_draining`
    keeps such a channel open until our EOF instead.
    """

    def __init__(self, channel: paramiko.Channel, stdin: Optional[bytes]) -> None:
        super().__init__(daemon=True, name="ssh-stdin")
        self.channel = channel
        self.stdin = stdin
        # Log lines of this thread name the host of the thread that started it.
        self._context = contextvars.copy_context()

    def run(self) -> None:
        self._context.run(self._feed)

    def _feed(self) -> None:
        try:
            if self.stdin:
                self.channel.sendall(self.stdin)
            self._send_eof()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.debug("stdin not fully sent: %s", exc or type(exc).__name__)

    def _send_eof(self) -> None:
        channel = self.channel
        if not hasattr(channel, "_send_eof"):  # another paramiko: its own shutdown
            channel.shutdown_write()
            return
        with channel.lock:
            if channel.closed:
                return
            message = channel._send_eof()
            if message is not None:
                channel.transport._send_user_message(message)


def _quietly(action: Callable[[], object]) -> None:
    """Run a cleanup step, logging instead of raising."""
    try:
        action()
    except Exception as exc:  # cleanup must go on
        log.debug("cleanup step failed: %s", exc)


# --------------------------------------------------------------------------- many hosts


class ConnectAllError(HostError):
    """One or more hosts could not be connected; ``failures`` maps host to its error."""

    def __init__(self, failures: Dict[str, BaseException]) -> None:
        self.failures = dict(failures)
        if self.failures and all(isinstance(e, ConfigError) for e in self.failures.values()):
            self.exit_code = EXIT_CONFIG
        super().__init__(", ".join(self.failures), "connection failed")

    def __str__(self) -> str:
        lines = [str(exc) if isinstance(exc, HostError) else f"host {host}: {exc}"
                 for host, exc in self.failures.items()]
        return (f"could not connect to {len(lines)} host(s):\n  " + "\n  ".join(lines))


def connect_all(hosts: Iterable[str], options: SSHOptions,
                on_result: Optional[Callable[[str, Optional[BaseException]], None]] = None
                ) -> Dict[str, Connection]:
    """Connect to every host in parallel (at most ``options.forks`` at once), all or nothing.

    *on_result(host, error)* is called as each host's attempt ends (error None on success),
    so a progress display can count hosts while the others are still connecting.
    """
    return connect_some(hosts, options, 0, on_result)[0]


def connect_some(hosts: Iterable[str], options: SSHOptions, allowed_failures: int,
                 on_result: Optional[Callable[[str, Optional[BaseException]], None]] = None
                 ) -> Tuple[Dict[str, Connection], Dict[str, BaseException]]:
    """Connect to every host; up to *allowed_failures* hosts may stay unreachable.

    Each host is tried ``1 + options.retries`` times (see :mod:`remote_runner.failpolicy`).
    Returns the connections and the failures. More failures than allowed, a config mistake
    among them, or no host at all connected: every connection is closed and
    :class:`ConnectAllError` names each failed host.
    """
    unique = list(dict.fromkeys(hosts))
    connections: Dict[str, Connection] = {}
    failures: Dict[str, BaseException] = {}
    if not unique:
        return connections, failures
    pool = ThreadPoolExecutor(max_workers=max(1, min(options.forks, len(unique))),
                              thread_name_prefix="ssh-connect")
    try:
        futures = {pool.submit(_connect_retrying, host, options): host for host in unique}
        for future in as_completed(futures):
            host = futures[future]
            try:
                connections[host] = future.result()
            except Exception as exc:
                failures[host] = exc
            if on_result is not None:
                on_result(host, failures.get(host))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for connection in connections.values():
            connection.close()
        raise
    pool.shutdown(wait=True)
    fatal = any(isinstance(e, ConfigError) for e in failures.values())
    if failures and (fatal or len(failures) > allowed_failures or not connections):
        for connection in connections.values():
            connection.close()
        raise ConnectAllError({h: failures[h] for h in unique if h in failures})
    return ({host: connections[host] for host in unique if host in connections},
            {host: failures[host] for host in unique if host in failures})


def _connect_retrying(host: str, options: SSHOptions) -> Connection:
    """Connect one host, retrying what can pass (unreachable, dropped) with backoff."""
    from remote_runner.failpolicy import with_retries

    def again(attempt: int, exc: BaseException, delay: float) -> None:
        reason = exc.message if isinstance(exc, HostError) else str(exc)
        log.info("%s: %s; retry %d of %d in %.1f s", host, reason, attempt, options.retries,
                 delay)

    return with_retries(lambda: _connect_one(host, options), options.retries, again)


def _connect_one(host: str, options: SSHOptions) -> Connection:
    """Connect one host, turning unexpected errors into HostError."""
    from remote_runner.events import host_context
    try:
        with host_context(parse_host(host)[1]):
            return Connection(host, options).connect()
    except RunnerError:
        raise
    except Exception as exc:
        raise HostError(host, f"unexpected error while connecting: {exc!r}") from exc
