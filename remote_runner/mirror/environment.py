"""What a command takes along to the host: its environment, umask, the trees it names, whose cache.

Why apart: these are decisions about this machine's state (which variables
cannot work elsewhere, which files authenticate the connection and are never
served, which trees files-only mode mounts), made before any link exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from typing import Any, Dict, List, Mapping, Optional, Sequence

from remote_runner.mirror import protocol as P

#: Shares the session's logger: its messages and debug switch are the session's.
LOG = logging.getLogger("remote_runner.mirror.session")

#: Variables naming local sockets or sessions that cannot work on another host.
DROPPED_ENV = (
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_CLIENT", "SSH_CONNECTION", "SSH_TTY", "DISPLAY",
    "WAYLAND_DISPLAY", "XAUTHORITY", "XDG_RUNTIME_DIR", "XDG_SESSION_ID", "DBUS_SESSION_BUS_ADDRESS",
    "SESSION_MANAGER", "GPG_AGENT_INFO", "TMUX", "TMUX_PANE", "STY", "WINDOW", "KRB5CCNAME",
)


def filtered_environment(forward: Sequence[str] = (), base: Optional[Mapping[bytes, bytes]] = None,
                         extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Return the local environment (wire-encoded) minus what cannot work remotely."""
    env = dict(os.environb if base is None else base)
    keep = {name.encode() for name in forward}
    for name in DROPPED_ENV:
        if name.encode() not in keep:
            env.pop(name.encode(), None)
    out = {P.name_to_wire(k): P.name_to_wire(v) for k, v in env.items()}
    for key, value in (extra or {}).items():
        out[key] = str(value)
    return out


def current_umask() -> int:
    """Read the process umask without changing it for long."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_origin() -> str:
    """Name this machine and user for the host's file cache (copies from two origins never mix)."""
    machine = b""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, "rb") as handle:
                machine = handle.read().strip()
            break
        except OSError:
            continue
    seed = b"%s|%s|%d" % (machine, platform.node().encode(), os.getuid())
    return hashlib.sha1(seed).hexdigest()[:20]


def connection_secrets(conn: Any) -> List[str]:
    """The files this connection authenticates with (keys, known_hosts, ssh_config): never served."""
    config = getattr(conn, "config", None) or {}
    found = list(config.get("identityfile") or [])
    for key in ("userknownhostsfile", "globalknownhostsfile"):
        found += str(config.get(key) or "").split()
    options = getattr(conn, "options", None)
    found.append(getattr(options, "ssh_config_file", None) or "")
    return [path for path in found if path and path != "/dev/null"]


def files_only_exports(argv: Sequence[str], cwd: str) -> List[bytes]:
    """Local trees to mount in files-only mode: the cwd and paths named on the command line."""
    candidates = [os.fsencode(cwd)]
    for arg in list(argv)[1:]:
        if not arg or arg.startswith("-") and not os.path.exists(os.path.join(cwd, arg)):
            continue
        path = os.path.normpath(os.path.join(os.fsencode(cwd), os.fsencode(arg)))
        if os.path.isdir(path):
            candidates.append(path)
        elif os.path.lexists(path):
            candidates.append(os.path.dirname(path))
        elif os.path.isabs(arg) and os.path.isdir(os.path.dirname(path)):
            candidates.append(os.path.dirname(path))
    exports: List[bytes] = []
    for path in sorted(set(candidates), key=len):
        if path == b"/":
            LOG.warning("files-only: not mounting the local / over the host's root")
            continue
        if any(path == e or path.startswith(e + b"/") for e in exports):
            continue
        exports.append(path)
    return exports
