"""ssh_config and host names: what ``ssh [-F FILE] [user@]host[:port]`` would read and mean.

Users already describe their hosts in ssh_config (aliases, users, ports, keys, jump hosts,
``Include`` files); the runner must read the same files the same way ``ssh`` does, before any
host is contacted: the plan, the landing check (two names for one login) and every connection
start here. Parsing is cached per file version because hundreds of hosts look up one file.
``Include`` is expanded here (paramiko does not) relative to ``~/.ssh`` or ``/etc/ssh`` as
OpenSSH does, with a depth limit against loops.
"""

from __future__ import annotations

import fnmatch
import getpass
import glob
import os
import pwd
import shlex
import threading
from typing import Dict, List, Optional, Tuple, Union

import paramiko

from remote_runner.errors import ConfigError
from remote_runner.names import check_name

USER_CONFIG = "~/.ssh/config"
SYSTEM_CONFIG = "/etc/ssh/ssh_config"
_MAX_INCLUDE_DEPTH = 16


_config_cache: Dict[Tuple, paramiko.SSHConfig] = {}
_config_lock = threading.Lock()

#: Per thread: whether the value being expanded uses ``%l`` (see :class:`SSHConfig`).
_expanding = threading.local()


class _FqdnWhenUsed(paramiko.config.LazyFqdn):
    """paramiko's stand-in for ``%l``: asks DNS only for a value of ours that uses it."""

    def __str__(self) -> str:
        if getattr(_expanding, "no_fqdn", False):
            return "%l"  # the value holds no "%l": replacing it with itself changes nothing
        return super().__str__()


class SSHConfig(paramiko.SSHConfig):
    """paramiko's ssh_config, with the local host's full name looked up only where ``%l`` is used.

    paramiko expands the tokens of every IdentityFile, ControlPath, User...
    of every host looked up, and computes every token it knows for each, ``%l``
    included: the local host's fully qualified name, from a reverse DNS lookup
    (``socket.getfqdn``). Where the local name does not resolve quickly (a
    laptop offline, a container whose hostname no resolver knows), each of
    those waits for the resolver's timeout, seconds a value, before the first
    packet, for a token almost no ssh_config uses. Here ``%l`` costs nothing
    unless the value holds it (and then it is what OpenSSH would give).
    """

    def _tokenize(self, config, target_hostname, key, value):  # type: ignore[no-untyped-def]
        _expanding.no_fqdn = "%l" not in value
        try:
            return super()._tokenize(config, target_hostname, key, value)
        finally:
            _expanding.no_fqdn = False

    # A lookup walks every block of the file. paramiko matches each Host pattern with
    # fnmatch (a regex compiled per pattern, in every process) and, for each block that
    # did not match, asks the local user name of the password database for its Match
    # criteria even when the block has none: with 200 literal hosts in one file, a run
    # of four hosts spent ~10 ms of its start there, before any host was contacted.
    # A pattern without wildcards is compared as it is (fnmatch on POSIX is
    # case-sensitive, so that is the same answer), and a block without Match is no match.

    def _pattern_matches(self, patterns, target):  # type: ignore[no-untyped-def]
        if hasattr(patterns, "split"):
            patterns = patterns.split(",")
        match = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            body = pattern[1:] if negated else pattern
            hit = body == target if _WILDCARDS.isdisjoint(body) else fnmatch.fnmatchcase(target, body)
            if hit and negated:
                return False
            match = match or hit
        return match

    def _does_match(self, match_list, *args):  # type: ignore[no-untyped-def]
        if not match_list:
            return []  # (what paramiko answers for no criteria, without its user lookup)
        return super()._does_match(match_list, *args)


#: What makes an ssh_config pattern more than a literal name (fnmatch's special characters).
_WILDCARDS = frozenset("*?[")


# paramiko's expansion makes its stand-in by this module-level name (from paramiko 2.7 on).
paramiko.config.LazyFqdn = _FqdnWhenUsed  # type: ignore[misc]


def config_paths(ssh_config_file: Optional[str]) -> List[str]:
    """Return the ssh_config files to read, like ``ssh [-F FILE]``."""
    if ssh_config_file is not None:
        path = os.path.expanduser(ssh_config_file)
        if not os.path.isfile(path):
            raise ConfigError("ssh_config file not found", file=path, field="ssh_config_file")
        return [path]
    candidates = [os.path.expanduser(USER_CONFIG), SYSTEM_CONFIG]
    return [p for p in candidates if os.path.isfile(p)]


def load_ssh_config(ssh_config_file: Optional[str]) -> paramiko.SSHConfig:
    """Parse (once per file version) the ssh_config that ``ssh [-F FILE]`` would read."""
    paths = config_paths(ssh_config_file)
    key = tuple((p, os.stat(p).st_mtime_ns) for p in paths)
    with _config_lock:
        cached = _config_cache.get(key)
        if cached is not None:
            return cached
        text = "".join(_expand_includes(p, _include_base(p), 0) + "\n" for p in paths)
        try:
            config = SSHConfig.from_text(text)
        except Exception as exc:  # paramiko raises ConfigParseError and friends
            raise ConfigError(f"cannot parse ssh_config: {exc}", file=", ".join(paths)) from exc
        _config_cache[key] = config
        return config


def _include_base(path: str) -> str:
    """Return the directory relative Include paths start from (as OpenSSH does)."""
    if os.path.abspath(path) == SYSTEM_CONFIG:
        return "/etc/ssh"
    return os.path.expanduser("~/.ssh")


def _expand_includes(path: str, base: str, depth: int) -> str:
    """Return the text of *path* with every ``Include`` replaced by the files it names."""
    if depth > _MAX_INCLUDE_DEPTH:
        raise ConfigError("Include nested too deeply (a loop?)", file=path)
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read ssh_config: {exc.strerror}", file=path) from exc
    out: List[str] = []
    block = ""
    for number, line in enumerate(lines, 1):
        words = line.strip().split(None, 1)
        keyword = words[0].lower().rstrip("=") if words else ""
        if keyword in ("host", "match"):
            block = line
        if keyword != "include":
            out.append(line)
            continue
        arg = words[1].lstrip("= ") if len(words) > 1 else ""
        try:
            patterns = shlex.split(arg)
        except ValueError as exc:
            raise ConfigError(f"bad Include line: {exc}", file=path, line=number) from exc
        for pattern in patterns:
            pattern = os.path.expanduser(pattern)
            if not os.path.isabs(pattern):
                pattern = os.path.join(base, pattern)
            for included in sorted(glob.glob(pattern)):
                if os.path.isfile(included):
                    out.append(_expand_includes(included, base, depth + 1))
        if block:
            out.append(block)  # the included file may have opened other blocks
    return "\n".join(out)


def parse_host(host: str) -> Tuple[Optional[str], str, Optional[int]]:
    """Split ``[user@]alias[:port]`` (IPv6 as ``[addr]:port``) into its parts."""
    user: Optional[str] = None
    rest = host.strip()
    if rest.startswith("ssh://"):
        rest = rest[len("ssh://"):]
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
    port: Optional[int] = None
    port_text = ""
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ConfigError(f"bad host {host!r}: missing ']'", field="host")
        alias, tail = rest[1:end], rest[end + 1:]
        if tail.startswith(":"):
            port_text = tail[1:]
        elif tail:
            raise ConfigError(f"bad host {host!r}", field="host")
    elif rest.count(":") == 1:
        alias, port_text = rest.split(":")
    else:
        alias = rest
    if port_text:
        port = _port(port_text, f"host {host!r}")
    if not alias or (user is not None and not user):
        raise ConfigError(f"bad host {host!r}: expected [user@]host[:port]", field="host")
    check_name(alias, "host")
    if user is not None:
        check_name(user, "user")
    return user, alias, port


def _port(text: Union[str, int], where: str, file: Optional[str] = None) -> int:
    """Return *text* as a TCP port or raise ConfigError naming *where*."""
    try:
        port = int(text)
    except (TypeError, ValueError):
        port = -1
    if not 0 < port < 65536:
        raise ConfigError(f"{where}: bad port {text!r}", file=file, field="port")
    return port


def _local_user() -> str:
    """Return the local login name (what ssh uses when nothing else says)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return pwd.getpwuid(os.getuid()).pw_name
