"""One SSH connection per bastion, shared by every target behind it.

500 VMs behind one jump host used to mean 500 logins *to the jump host*: each target opened its
own connection to the bastion and tunnelled through it. sshd throttles that (``MaxStartups``
drops unauthenticated connections beyond 10 by default), so big runs failed at random, and each
login cost the bastion a process. OpenSSH users solve it with ``ControlMaster``; ClusterShell
with gateway trees. Here the bastion's connection is shared: every target whose ProxyJump chain
is the same asks this pool for the jump connection, and each opens its own ``direct-tcpip``
channel on that one transport (SSH multiplexes channels; a channel costs the bastion nothing
but a forwarded socket). Multi-hop chains share at every level: ``a,b`` reuses the connection
to ``b``, which itself reuses the one to ``a``.

The pool counts users: the jump connection closes when the last target behind it closes. A
dead jump connection is reopened by the next target that needs it (``Connection.connect`` is a
no-op on a live transport), so a retry after a bastion hiccup works. The key holds every
setting the jump connection is built from, so two runs with different ssh_configs or
passwords in one process never share.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.ssh import Connection, SSHOptions

#: (hops, ssh_config file, password, accept new keys, connect timeout, keepalive)
Key = Tuple[Tuple[str, ...], Optional[str], Optional[str], bool, float, int]


@dataclass
class _Entry:
    connection: "Connection"
    users: int = 0


@dataclass
class JumpPool:
    """Shared, reference-counted connections to jump hosts, keyed by their route."""

    _entries: Dict[Key, _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def key(hops: Tuple[str, ...], options: "SSHOptions") -> Key:
        return (hops, options.ssh_config_file, options.password, options.accept_new_host_keys,
                options.connect_timeout, options.keepalive)

    def acquire(self, hops: Tuple[str, ...], options: "SSHOptions",
                chain: Tuple[str, ...]) -> "Connection":
        """Return the connected connection to ``hops[-1]`` (through ``hops[:-1]``), shared.

        The caller must :meth:`release` it once when done; if connecting fails, the error
        propagates and nothing needs releasing.
        """
        from remote_runner.ssh import Connection

        key = self.key(hops, options)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(Connection(hops[-1], options, _via=list(hops[:-1]) or None,
                                          _chain=chain))
                self._entries[key] = entry
            entry.users += 1
        # Outside the pool lock: the first caller connects, the others wait on the
        # connection's own lock and then find it live.
        try:
            entry.connection.connect()
        except BaseException:
            self.release(entry.connection)
            raise
        return entry.connection

    def release(self, connection: "Connection") -> None:
        """One target behind *connection* is done; close it after the last."""
        closing: Optional["Connection"] = None
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.connection is connection:
                    entry.users -= 1
                    if entry.users <= 0:
                        del self._entries[key]
                        closing = connection
                    break
            else:
                closing = connection  # not pooled (already dropped): just close it
        if closing is not None:
            closing.close()

    def open_count(self) -> int:
        """How many jump connections the pool holds (for tests and diagnostics)."""
        with self._lock:
            return len(self._entries)


#: The pool every Connection uses unless told otherwise.
SHARED = JumpPool()
