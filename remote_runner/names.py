"""What a host or user name may contain before it goes anywhere near a shell.

ssh_config's ``ProxyCommand`` is run by a local ``sh`` after ``%h``/``%r``/``%n``
are substituted *unquoted* (by OpenSSH and by paramiko alike), so a host name
such as ``a;touch /tmp/x`` from a config, a muddler or an inventory would run
code on this machine. OpenSSH (9.6 and later) refuses such names on the
command line; we refuse the same characters in every host and user name we
are given, before anything is resolved or connected.
"""

from __future__ import annotations

from remote_runner.errors import ConfigError, control_characters

#: Characters OpenSSH refuses in host and user names given to it.
SHELL_META = set("'`\"$\\;&<>|(){}")


def bad_name_reason(name: str) -> str:
    """Return why *name* is not an acceptable host or user name ('' if it is)."""
    if name.startswith("-"):
        return "must not start with '-'"
    controls = control_characters(name)
    if controls:
        return f"contains control character(s) {controls}"
    if any(ch.isspace() for ch in name):
        return "contains white space"
    meta = "".join(sorted(set(name) & SHELL_META))
    if meta:
        return f"contains shell metacharacter(s) {meta!r}"
    return ""


def check_name(name: str, what: str = "host") -> str:
    """Return *name*, or raise ConfigError saying why it cannot be a host/user name."""
    reason = bad_name_reason(name)
    if reason:
        raise ConfigError(f"{what} name {name!r} {reason}", field=what)
    return name
