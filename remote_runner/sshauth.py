"""Authentication as OpenSSH does it: agent, key files, then the password.

Users expect the keys and agent that work for ``ssh`` to work here, in the same order:
ssh-agent keys (only those matching ``IdentityFile`` with ``IdentitiesOnly``), then the
``IdentityFile`` entries and the default key files (the password also unlocks an encrypted
key, as SPAR's single ``-p`` did), then the password, also as keyboard-interactive. A failure
names everything that was tried and what to change. :class:`Authentication` is mixed into
:class:`remote_runner.ssh.Connection`, whose ``alias``, ``username``, ``hostname``, ``config``,
``options`` and ``_flag`` it uses; keeping it here keeps the connection module about the
connection.

A key is offered in one round trip, not two: paramiko asks for the ``ssh-userauth``
service and sends the signed request only once the server has said yes, which it always
does, and OpenSSH's server reads the request that follows in the same flight as it would
one sent later (see :class:`OneTripAuth`). Every connection thus costs one round trip
less: 20 ms of a 10 ms-each-way link, and as much again per ProxyJump hop.
"""

from __future__ import annotations

import getpass
import os
import threading
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import paramiko
from paramiko.auth_handler import AuthHandler
from paramiko.message import Message

from remote_runner import hostkeys
from remote_runner.errors import AuthError, UnreachableError

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.ssh import SSHOptions

#: Environment variable the CLI reads the SSH password from.
PASSWORD_ENV = "REMOTE_RUNNER_PASSWORD"
#: Key files tried after the ssh_config IdentityFile entries (OpenSSH order).
DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
#: Key types whose signature algorithm depends on the server's ``server-sig-algs``.
_RSA_TYPES = ("ssh-rsa", "ssh-rsa-cert-v01@openssh.com")


class OneTripAuth(AuthHandler):
    """paramiko's client authentication, with the request sent right behind the service request.

    The request is built by paramiko's own code (its handler for the service
    accept, given the accept it will get), so it is the request paramiko would
    have sent a round trip later; the real accept then only confirms it. An RSA
    key waits for the accept as before while the server's ``server-sig-algs``
    (which choose its signature algorithm) have not arrived yet.
    """

    #: Whether the request went out with the service request.
    sent_early = False

    def _request_auth(self) -> None:
        # Decided before the service request goes: its accept may be read (on
        # paramiko's thread) before this thread has signed and sent the request.
        self.sent_early = self._may_send_early()
        super()._request_auth()
        if self.sent_early:
            accept = Message()
            accept.add_string("ssh-userauth")
            accept.rewind()
            super()._parse_service_accept(accept)

    def _may_send_early(self) -> bool:
        if self.auth_method != "publickey":
            return False
        try:  # (paramiko internals: another release may lack them, and then it waits)
            key_type, _ = self._get_key_type_and_bits(self.private_key)
            named = self.transport.server_extensions.get("server-sig-algs")
        except AttributeError:
            return False
        return key_type not in _RSA_TYPES or bool(named)

    def _parse_service_accept(self, m: Message) -> None:
        if not self.sent_early:
            super()._parse_service_accept(m)


def auth_publickey(transport: paramiko.Transport, username: str, key: paramiko.PKey) -> OneTripAuth:
    """Authenticate with *key* as ``Transport.auth_publickey`` does, in one round trip.

    Raises what paramiko raises (``AuthenticationException`` and its kin,
    ``SSHException`` without a session). Returns the handler, for its :attr:`~OneTripAuth.sent_early`.
    """
    if not transport.is_active() or not getattr(transport, "initial_kex_done", True):
        raise paramiko.SSHException("No existing session")
    done = threading.Event()
    handler = transport.auth_handler = OneTripAuth(transport)
    handler.auth_publickey(username, key, done)
    handler.wait_for_response(done)
    return handler


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


class Authentication:
    """The authentication half of a connection (see the module docstring)."""

    alias: str
    username: str
    hostname: str
    config: Any
    options: "SSHOptions"

    def _flag(self, key: str) -> bool:  # pragma: no cover - provided by Connection
        raise NotImplementedError


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
            auth_publickey(transport, self.username, key)
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
