"""Network plumbing for lab hosts: one bridge, one namespace and veth pair per host.

Every address the lab uses lives on a private /24 that the lab itself creates
(the bridge holds ``.1``, host ``hN`` holds ``.(10+N)``), so test traffic never
leaves this machine. All names carry the ``rrlab`` prefix, which is how
``lab down`` finds what an earlier (possibly crashed) ``lab up`` left behind.
"""

from __future__ import annotations

import subprocess
from typing import List, Sequence

from remote_runner.errors import LabError

BRIDGE = "rrlab0"
NETNS_PREFIX = "rrlab-"
NETWORK = "10.213.0"
BRIDGE_ADDRESS = f"{NETWORK}.1"
MAX_HOSTS = 200


def host_address(index: int) -> str:
    """Return the address of host number *index* (1-based)."""
    if not 1 <= index <= MAX_HOSTS:
        raise LabError(f"lab host index {index} out of range 1..{MAX_HOSTS}")
    return f"{NETWORK}.{10 + index}"


def unused_address(number: int = 1) -> str:
    """Return an address on the lab's network that no lab host ever holds (for tests of
    unreachable hosts): above the last host's, so it stays dead with every host up."""
    if not 1 <= number <= 254 - 10 - MAX_HOSTS:
        raise LabError(f"only {254 - 10 - MAX_HOSTS} unused lab addresses, not {number}")
    return f"{NETWORK}.{10 + MAX_HOSTS + number}"


def netns_name(host: str) -> str:
    return NETNS_PREFIX + host


def _ip(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def list_netns() -> List[str]:
    """Return the lab's network namespaces that exist now."""
    proc = _ip(["netns", "list"], check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(NETNS_PREFIX))


def netns_pids(name: str) -> List[int]:
    """Return the PIDs of every process inside namespace *name*."""
    proc = _ip(["netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def ensure_bridge() -> None:
    """Create the lab bridge with its address, if it is not there yet."""
    if _ip(["link", "show", BRIDGE], check=False).returncode != 0:
        _ip(["link", "add", BRIDGE, "type", "bridge"])
    addrs = _ip(["-o", "addr", "show", "dev", BRIDGE]).stdout
    if f" {BRIDGE_ADDRESS}/" not in addrs:
        _ip(["addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE])
    _ip(["link", "set", BRIDGE, "up"])


def create_host_netns(host: str, index: int) -> None:
    """(Re)create the namespace of *host* with its veth on the lab bridge."""
    name = netns_name(host)
    if name in list_netns():
        delete_host_netns(host)
    outside = ("rrl" + host)[:15]
    _ip(["link", "del", outside], check=False)
    _ip(["netns", "add", name])
    _ip(["link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", name])
    _ip(["link", "set", outside, "master", BRIDGE, "up"])
    _ip(["-n", name, "link", "set", "lo", "up"])
    _ip(["-n", name, "addr", "add", f"{host_address(index)}/24", "dev", "eth0"])
    _ip(["-n", name, "link", "set", "eth0", "up"])
    # A host started again gets a new veth (new MAC) behind the same address: forget
    # the old neighbour entry, or this machine keeps sending to the dead MAC for ~30 s.
    _ip(["neigh", "flush", "to", host_address(index)], check=False)


def delete_host_netns(host: str) -> None:
    """Delete the namespace of *host*; its veth pair goes with it."""
    _ip(["netns", "del", netns_name(host)], check=False)
    _ip(["link", "del", ("rrl" + host)[:15]], check=False)


def delete_bridge() -> None:
    _ip(["link", "del", BRIDGE], check=False)
