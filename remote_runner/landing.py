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


def landing_of(host: str, options: "SSHOptions", timeout: float) -> Landing:
    """Return where *host* lands, from ssh_config and a name lookup bounded by *timeout*."""
    from remote_runner.ssh import Connection

    connection = Connection(host, options)  # reads ssh_config only; nothing is contacted
    via = str(connection.config.get("proxyjump") or connection.config.get("proxycommand") or "")
    addresses = (connection.hostname.lower(),) if via else _resolve(connection.hostname,
                                                                   connection.port, timeout)
    return Landing(connection.username, addresses, connection.port, via)


def _resolve(hostname: str, port: int, timeout: float) -> Tuple[str, ...]:
    """Return the sorted addresses of *hostname*, or the name itself if it does not resolve."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resolve")
    future = pool.submit(socket.getaddrinfo, hostname, port, 0, socket.SOCK_STREAM)
    done, _ = wait([future], timeout=timeout)
    pool.shutdown(wait=False)
    if not done or future.exception() is not None:
        return (hostname.lower(),)
    return tuple(sorted({info[4][0] for info in future.result()}))


def group_hosts(hosts: Sequence[str], options: "SSHOptions",
                timeout: float = 10.0) -> Dict[str, str]:
    """Map every name in *hosts* to the first name (in order) that lands on the same login."""
    unique = list(dict.fromkeys(hosts))
    if len(unique) < 2:
        return {host: host for host in unique}
    with ThreadPoolExecutor(max_workers=min(16, len(unique)), thread_name_prefix="landing") as pool:
        landings = dict(zip(unique, pool.map(lambda h: landing_of(h, options, timeout), unique)))
    first: Dict[Landing, str] = {}
    mapping: Dict[str, str] = {}
    for host in unique:
        canonical = first.setdefault(landings[host], host)
        mapping[host] = canonical
        if canonical != host:
            LOG.info("%s and %s reach the same login (%s): one connection and one screen "
                     "session", canonical, host, landings[host])
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

