"""Where a host name really lands: two names for one login are one host.

SPAR configs name hosts by whatever is at hand: an IP address from a host
info file, an ssh_config alias, a ``TBD`` placeholder that ssh_config points
at a real machine. Two such names can reach the same login (same address,
port and user). Treated as two hosts, they get two connections and two screen
sessions *of the same name* on one machine, whose state files and windows
then trample each other. So, before anything is touched, every remote name is
reduced to its :class:`Landing` — ssh_config's HostName, Port and User
applied, the address resolved — and names with the same landing are grouped:
they share one connection and one screen session, under the first name the
config used. Components that then have the same name on that host are a
config error naming both config lines.

A name behind ProxyJump/ProxyCommand is not resolved here (its address means
something only on the far side): it lands at its jump route plus HostName.
A name that does not resolve keeps its HostName; connecting reports it.
"""

from __future__ import annotations

import logging
import socket
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, Sequence, Tuple

from remote_runner.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import ComponentSpec
    from remote_runner.ssh import SSHOptions

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Landing:
    """The login a host name reaches: user, address(es), port and any proxy route."""

    user: str
    addresses: Tuple[str, ...]
    port: int
    via: str = ""

    def __str__(self) -> str:
        route = f" via {self.via}" if self.via else ""
        return f"{self.user}@{self.addresses[0]}:{self.port}{route}"


def _route(host: str, options: "SSHOptions") -> Tuple[str, str, int, str]:
    """Return (user, HostName, port, proxy route) for *host* from ssh_config; nothing is contacted."""
    from remote_runner.ssh import Connection

    connection = Connection(host, options)
    via = str(connection.config.get("proxyjump") or connection.config.get("proxycommand") or "")
    return connection.username, connection.hostname, connection.port, via


def landings(hosts: Sequence[str], options: "SSHOptions", timeout: float) -> Dict[str, Landing]:
    """Return where each of *hosts* lands; all name lookups together take at most *timeout*."""
    routes = {host: _route(host, options) for host in hosts}
    direct = sorted({(name, port) for _, name, port, via in routes.values() if not via})
    resolved: Dict[Tuple[str, int], Tuple[str, ...]] = {}
    if direct:
        pool = ThreadPoolExecutor(max_workers=min(32, len(direct)), thread_name_prefix="resolve")
        futures = {key: pool.submit(socket.getaddrinfo, key[0], key[1], 0, socket.SOCK_STREAM)
                   for key in direct}
        wait(list(futures.values()), timeout=timeout)
        pool.shutdown(wait=False)
        for key, future in futures.items():
            if future.done() and future.exception() is None:
                resolved[key] = tuple(sorted({info[4][0] for info in future.result()}))
    result = {}
    for host, (user, name, port, via) in routes.items():
        addresses = resolved.get((name, port)) or (name.lower(),)
        result[host] = Landing(user, addresses, port, via)
    return result


def group_hosts(hosts: Sequence[str], options: "SSHOptions",
                timeout: float = 10.0) -> Dict[str, str]:
    """Map every name in *hosts* to the first name (in order) that lands on the same login."""
    unique = list(dict.fromkeys(hosts))
    if len(unique) < 2:
        return {host: host for host in unique}
    found = landings(unique, options, timeout)
    first: Dict[Landing, str] = {}
    mapping: Dict[str, str] = {}
    for host in unique:
        canonical = first.setdefault(found[host], host)
        mapping[host] = canonical
        if canonical != host:
            LOG.info("%s and %s reach the same login (%s): one connection and one screen "
                     "session", canonical, host, found[host])
    return mapping


def check_names(specs: Iterable["ComponentSpec"], mapping: Dict[str, str]) -> None:
    """Refuse two components of one name on names that land on the same login."""
    seen: Dict[Tuple[str, str], "ComponentSpec"] = {}
    for spec in specs:
        key = (mapping.get(spec.host, spec.host), spec.name)
        other = seen.setdefault(key, spec)
        if other is spec or other.host == spec.host:
            continue
        raise ConfigError(
            f"component {spec.name!r} on {spec.host!r} (added at {spec.origin}) and component "
            f"{other.name!r} on {other.host!r} (added at {other.origin}) would share one screen "
            f"session: {spec.host!r} and {other.host!r} reach the same login; give them "
            f"different names", file=spec.origin.file, line=spec.origin.line,
            component=spec.name, field="name")

