"""The benchmark's hosts: lab hosts, each behind a delay proxy per link delay.

One :class:`Testbed` brings up the lab hosts it needs (``Lab().up(n)``, which
is idempotent, never takes hosts down and keeps every running host's release, so
the shared Debian 11 ``h9`` stays what the test suite expects), starts one :class:`DelayProxy` per
(host, non-zero delay) and writes one ssh_config per delay in which the aliases
``h1..hN`` reach the hosts through those proxies (at 0 ms: directly). Every tool then gets the
same alias and a ``-F`` path: the only thing that varies is the link.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional, Sequence

from bench.proxy import ProxySet
from bench.sshconf import Endpoint, read_host_keys, write_ssh_config

logger = logging.getLogger(__name__)


class Testbed:
    """Lab hosts with delay proxies and per-delay ssh_configs."""

    def __init__(self, delays: Sequence[float], host_count: int, work_dir: Optional[str] = None) -> None:
        from remote_runner.lab import Lab

        self.delays = list(delays)
        self.lab = Lab()
        #: The proxies' ssh_configs; a directory made here goes with :meth:`close`.
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="rr-bench-")
        self._own_dir = work_dir is None
        self.proxies = ProxySet()
        self._configs: Dict[float, str] = {}
        self.host_names: List[str] = []
        self.grow(host_count)

    def grow(self, host_count: int) -> None:
        """Make sure hosts h1..h<host_count> are up and reachable at every delay."""
        if host_count <= len(self.host_names):
            return
        logger.info("bringing up %d lab hosts", host_count)
        hosts = [h for h in self.lab.up(host_count) if h.index <= host_count]
        keys = read_host_keys(self.lab.known_hosts)
        for delay in self.delays:
            endpoints = []
            for host in hosts:
                if delay == 0:  # the ideal link: straight to the host's sshd
                    endpoints.append(Endpoint(host.name, 22, keys[host.name], host.address))
                    continue
                name = f"{host.name}@{delay:g}"
                proxy = self.proxies.proxies.get(name) or self.proxies.add(name, (host.address, 22), delay)
                endpoints.append(Endpoint(host.name, proxy.port, keys[host.name]))
            self._configs[delay] = write_ssh_config(self.work_dir, endpoints, self.lab.client_key,
                                                    name=f"ssh_config.{delay:g}ms")
        self.host_names = [h.name for h in hosts]

    def ssh_config(self, delay: float) -> str:
        """Return the ssh_config path whose aliases go through *delay* ms proxies."""
        return self._configs[delay]

    def hosts(self, count: int) -> List[str]:
        """Return the first *count* host aliases."""
        self.grow(count)
        return self.host_names[:count]

    def ssh(self, delay: float, host: str, command: str, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run *command* on *host* with OpenSSH over the *delay* link."""
        return subprocess.run(["ssh", "-F", self.ssh_config(delay), "-o", "BatchMode=yes", host, command],
                              capture_output=True, text=True, timeout=timeout, check=check)

    def close(self) -> None:
        """Stop the proxies and remove the ssh_configs made for them (the lab hosts stay up for others)."""
        self.proxies.close()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
