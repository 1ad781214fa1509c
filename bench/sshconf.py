"""ssh_config and known_hosts for reaching lab hosts through delay proxies.

Every tool in the benchmark (ours, rsync, scp, sshfs, outrun) is pointed at
the same aliases ``h1..hN``; only the ssh_config differs per link delay. With a
delay, an alias resolves to ``127.0.0.1:<proxy port>``, so OpenSSH is told the
real host name through ``HostKeyAlias`` and strict checking keeps working; at
0 ms it goes straight to the host (a pass-through proxy would only add the
proxy's own CPU cost to a link that is meant to be ideal). OpenSSH and our own
SSH layer look the bare alias up; a client without HostKeyAlias support would
look up ``[127.0.0.1]:<port>``, so the known_hosts line carries both names:
every client verifies the same key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List


@dataclass(frozen=True)
class Endpoint:
    """Where one alias really goes: the proxy port in front of a host."""

    alias: str
    port: int
    key_line: str  # "<type> <base64>" of the host's key
    hostname: str = "127.0.0.1"

    def known_names(self) -> str:
        """Return the comma-separated names a known_hosts line needs for every client."""
        if self.port == 22:
            return f"{self.alias},{self.hostname}"
        return f"{self.alias},[{self.hostname}]:{self.port}"


def read_host_keys(known_hosts: str) -> Dict[str, str]:
    """Return {host name: "<type> <key>"} from a lab known_hosts file."""
    keys: Dict[str, str] = {}
    with open(known_hosts) as handle:
        for line in handle:
            parts = line.split()
            if len(parts) < 3 or line.startswith("#"):
                continue
            for name in parts[0].split(","):
                keys[name] = f"{parts[1]} {parts[2]}"
    return keys


def write_ssh_config(directory: str, endpoints: List[Endpoint], identity_file: str,
                     name: str = "ssh_config") -> str:
    """Write ssh_config and known_hosts for *endpoints* into *directory*; return the config path."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    known = os.path.join(directory, name + ".known_hosts")
    config = os.path.join(directory, name)
    known_lines, config_lines = [], [f"# remote-runner bench: ssh -F {config} h1\n"]
    for ep in endpoints:
        known_lines.append(f"{ep.known_names()} {ep.key_line}\n")
        config_lines.append(
            f"\nHost {ep.alias}\n"
            f"    HostName {ep.hostname}\n"
            f"    Port {ep.port}\n"
            f"    HostKeyAlias {ep.alias}\n"
            f"    User root\n"
            f"    IdentityFile {identity_file}\n"
            f"    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {known}\n"
            f"    GlobalKnownHostsFile /dev/null\n"
            f"    StrictHostKeyChecking yes\n"
            f"    ControlMaster no\n"
            f"    ConnectTimeout 20\n"
            f"    ServerAliveInterval 15\n"
            f"    LogLevel ERROR\n")
    for path, lines in ((known, known_lines), (config, config_lines)):
        with open(path, "w") as handle:
            handle.writelines(lines)
        os.chmod(path, 0o600)
    return config
