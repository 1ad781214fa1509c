"""How many hosts may fail, how hard to try each, how many at once: ``--retries N``,
``--max-fail K|P%`` and the default of ``--forks``.

With three hosts, one unreachable host is a reason to stop and look. With three hundred, one is
always down, and a campaign that aborts for it never runs; a login that ``MaxStartups`` refused
a moment ago usually works a second later. Ansible (``max_fail_percentage``) and pyinfra
(``--retry``) users expect both knobs, so the runner has them too:

* **retries** — a connection that fails for a reason that can pass (no route yet, refused, timed
  out, dropped during the handshake) is tried again after an exponential backoff with jitter
  (0.5 s, 1 s, 2 s … at most 8 s), so a burst of logins does not hit a throttled sshd in step.
  Wrong host keys, failed authentication and config mistakes are never retried: trying again
  cannot fix them and can lock an account.
* **max-fail** — how many hosts may stay unreachable (a count ``K`` or a share ``P%`` of the
  hosts). Those hosts are reported and their components skipped; the others run; the run ends
  with :data:`~remote_runner.errors.EXIT_PARTIAL`. Above the limit, nothing starts. The
  default, 0, is SPAR's all-or-nothing.
* **what may be skipped** — ``start_index`` says that later components need earlier ones
  running, and ``wait`` components mark the end of a run. Skipping a host must leave a run that
  still means something, so :func:`lost_prerequisites` refuses (nothing starts, exit 3) when the
  unreachable hosts take away *every* component of a start_index wave that later waves come
  after (the one server all clients talk to), or every ``wait`` component (the run would have
  no end). A wave that keeps at least one component goes ahead, as do later waves: the hosts a
  limit lets go are meant to be interchangeable, like Ansible's ``max_fail_percentage``.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Dict, List, Optional, Sequence, TypeVar

from remote_runner.errors import ConfigError, ConnectionLost, UnreachableError

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import ComponentSpec

#: Hosts handled at once (``-f/--forks``). High enough that a few dozen hosts are one wave
#: (each host's work is mostly waiting on its link), bounded so threads stay few: a pool
#: thread per host being worked on (~8 MiB of virtual stack, little resident) while a phase
#: runs, on top of the transport thread every open connection has anyway.
DEFAULT_FORKS = 64

T = TypeVar("T")

#: Default number of extra connection attempts per host.
DEFAULT_RETRIES = 2
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 8.0


@dataclass(frozen=True)
class FailLimit:
    """At most ``count`` hosts, or ``percent`` % of them, may fail (both None: none may)."""

    count: Optional[int] = None
    percent: Optional[float] = None

    @classmethod
    def parse(cls, text: str) -> "FailLimit":
        """``5`` or ``10%`` (the ``--max-fail`` spelling)."""
        match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$", text or "")
        if not match:
            raise ConfigError(f"--max-fail {text!r}: expected a number of hosts (5) or a share "
                              "of them (10%)")
        number, percent = match.group(1), bool(match.group(2))
        if percent:
            value = float(number)
            if value > 100:
                raise ConfigError(f"--max-fail {text!r}: a share above 100%")
            return cls(percent=value)
        if "." in number:
            raise ConfigError(f"--max-fail {text!r}: a number of hosts is a whole number")
        return cls(count=int(number))

    def allowed(self, hosts: int) -> int:
        """How many of *hosts* may fail (a share rounds down: 10% of 15 hosts is 1)."""
        if self.count is not None:
            return self.count
        if self.percent is not None:
            return int(math.floor(hosts * self.percent / 100.0 + 1e-9))
        return 0

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        return str(self.count or 0)


def retryable(exc: BaseException) -> bool:
    """Whether trying again could help (unreachable or dropped, not refused on purpose)."""
    return isinstance(exc, (UnreachableError, ConnectionLost))


def backoff(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number *attempt* (1-based): doubling, capped, jittered."""
    base = min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** (attempt - 1)))
    return base * (0.5 + rand() / 2)


def with_retries(attempt: Callable[[], T], retries: int,
                 on_retry: Optional[Callable[[int, BaseException, float], None]] = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Call *attempt* until it succeeds, at most ``1 + retries`` times, for retryable errors."""
    tries = 0
    while True:
        try:
            return attempt()
        except Exception as exc:  # noqa: BLE001 - re-raised unless retryable
            tries += 1
            if tries > retries or not retryable(exc):
                raise
            delay = backoff(tries)
            if on_retry is not None:
                on_retry(tries, exc, delay)
            sleep(delay)


def lost_prerequisites(specs: Sequence["ComponentSpec"], group_of: Dict[str, str],
                       skipped: Collection[str]) -> List[str]:
    """Return why the run cannot go ahead without the *skipped* hosts (empty: it can).

    *group_of* maps each host name to the name of its login group (aliases of one login
    are one host, skipped together).
    """
    if not skipped:
        return []

    def gone(spec: "ComponentSpec") -> bool:
        return not spec.is_local and group_of.get(spec.host, spec.host) in skipped

    reasons = []
    waves: Dict[object, List["ComponentSpec"]] = {}
    for spec in specs:
        waves.setdefault(spec.start_index, []).append(spec)
    order = sorted(waves)
    for position, index in enumerate(order):
        later = [i for i in order[position + 1:] if not all(gone(s) for s in waves[i])]
        if later and all(gone(s) for s in waves[index]):
            lost = ", ".join(f"{s.name} on {s.host}" for s in waves[index])
            reasons.append(f"start_index {index:g} loses every component ({lost}), and "
                           f"start_index {later[0]:g} and later would start without it")
    waited = [s for s in specs if s.wait]
    if waited and all(gone(s) for s in waited):
        lost = ", ".join(f"{s.name} on {s.host}" for s in waited)
        reasons.append(f"every component the run waits for is unreachable ({lost}): nothing "
                       "would mark the end of the run")
    return reasons
