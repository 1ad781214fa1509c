"""Connecting to many hosts at once: bounded, retried, all-or-nothing unless told otherwise.

A run needs every host before anything starts (SPAR's rule: a half-started experiment is
worse than none), so connecting is its own step: every host in parallel, at most ``--forks``
at a time, each retried as :mod:`remote_runner.failpolicy` says, and one error naming every
host that failed. ``--max-fail`` relaxes the rule to a number of hosts that may stay away.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Dict, Iterable, Optional, Tuple

from remote_runner.errors import EXIT_CONFIG, ConfigError, HostError, RunnerError
from remote_runner.ssh import Connection, SSHOptions
from remote_runner.sshconfig import parse_host

log = logging.getLogger("remote_runner.ssh")


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
