"""Host-key verification the way OpenSSH does it, without ever rewriting known_hosts.

The original tool used paramiko's ``AutoAddPolicy`` with no known_hosts at
all, so any machine in the middle could read the password. Here a server key
is checked against the user's and the system's known_hosts files:

* a known key is accepted;
* an unknown key is refused unless new keys were accepted on purpose
  (``--accept-new-host-keys`` or ``StrictHostKeyChecking accept-new``); an
  accepted key is *appended* as one line to the user's file, because
  paramiko's ``save_host_keys`` rewrites the whole file and loses comments,
  markers and hashed entries (paramiko #680, #435);
* a changed key (the name is known with another key of the same type, or
  only with keys of other types) is always refused, with the exact
  ``ssh-keygen -R`` command that removes the old entry.

The parser is our own (a few lines) rather than ``paramiko.HostKeys`` so that
a refusal can name the file and line of the offending entry, and so that
several lines for one name, ``@revoked`` markers, negated and wildcard
patterns behave as in OpenSSH.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import os
import re
import shlex
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import paramiko

from remote_runner.errors import HostKeyError

log = logging.getLogger(__name__)

#: The opt-in flag named in every "unknown host key" message.
ACCEPT_FLAG = "--accept-new-host-keys"

_append_lock = threading.Lock()

#: known_hosts key type -> host-key algorithms a server may offer for it.
_ALGORITHMS_FOR_TYPE = {
    "ssh-rsa": ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
}


@dataclass(frozen=True)
class KnownHost:
    """One usable line of a known_hosts file."""

    patterns: str
    keytype: str
    key_b64: str
    file: str
    line: int
    marker: str = ""

    def matches(self, name: str) -> bool:
        """Return True if this line's host patterns cover *name*."""
        return _patterns_match(self.patterns, name)


@dataclass
class KnownHosts:
    """The known_hosts entries for one connection: user files plus global files."""

    user_files: List[str]
    global_files: List[str] = field(default_factory=list)
    entries: List[KnownHost] = field(default_factory=list)

    @classmethod
    def load(cls, user_files: Sequence[str], global_files: Sequence[str]) -> "KnownHosts":
        """Read every existing file of *user_files* and *global_files*."""
        known = cls(list(user_files), list(global_files))
        for path in list(user_files) + list(global_files):
            known.entries.extend(read_known_hosts(path))
        return known

    def for_name(self, name: str) -> List[KnownHost]:
        """Return the entries that apply to *name* (not @cert-authority lines)."""
        return [e for e in self.entries if e.marker != "@cert-authority" and e.matches(name)]

    def preferred_algorithms(self, name: str, offered: Sequence[str]) -> List[str]:
        """Order *offered* host-key algorithms so that types known for *name* come first."""
        known_types = [e.keytype for e in self.for_name(name) if not e.marker]
        first: List[str] = []
        for keytype in known_types:
            for algo in _ALGORITHMS_FOR_TYPE.get(keytype, [keytype]):
                if algo in offered and algo not in first:
                    first.append(algo)
        return first + [a for a in offered if a not in first]


def read_known_hosts(path: str) -> List[KnownHost]:
    """Parse one known_hosts file; a missing file is empty, bad lines are skipped.

    A file already parsed by this process and unchanged since (same inode, size,
    mtime and ctime) is not parsed again: a run connecting to 200 hosts read the
    same file 200 times.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            st = os.fstat(handle.fileno())
            stamp = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with _parsed_lock:
                known = _parsed.get(path)
            if known is not None and known[0] == stamp:
                return list(known[1])
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read known_hosts file %s: %s", path, exc)
        return []
    entries = _parse_known_hosts(path, lines)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS:
        with _parsed_lock:  # (a file changed just now could change again within one tick)
            _parsed[path] = (stamp, tuple(entries))
    return entries


#: A known_hosts file changed longer ago than this is kept parsed while its stat holds.
_SETTLED_NS = 2_000_000_000
#: known_hosts path -> (its stat when parsed, its entries), see :func:`read_known_hosts`.
_parsed: Dict[str, Tuple[Tuple[int, int, int, int, int], Tuple[KnownHost, ...]]] = {}
_parsed_lock = threading.Lock()


def _parse_known_hosts(path: str, lines: List[str]) -> List[KnownHost]:
    entries = []
    for number, text in enumerate(lines, 1):
        fields = text.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else ""
        if len(fields) < 3:
            log.debug("%s:%d: not a known_hosts line, skipped", path, number)
            continue
        entries.append(KnownHost(fields[0], fields[1], fields[2], path, number, marker))
    return entries


def _patterns_match(patterns: str, name: str) -> bool:
    """Match *name* against a comma list of plain, hashed, wildcard or negated patterns."""
    name = name.lower()
    matched = False
    for pattern in patterns.split(","):
        if pattern.startswith("|1|"):
            if _hashed_match(pattern, name):
                matched = True
            continue
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        if _wildcard_match(pattern.lower(), name):
            if negated:
                return False
            matched = True
    return matched


def _wildcard_match(pattern: str, name: str) -> bool:
    """Match with OpenSSH wildcards only (``*`` and ``?``; brackets are literal).

    Most lines name one host: compared as a string. Building a regex per line
    and connect cost 1 ms per connect here with the lab's 200-line file
    (every line is looked at for every host: 200 hosts, 40,000 regexes).
    """
    if "*" not in pattern and "?" not in pattern:
        return pattern == name
    return _wildcard_regex(pattern).fullmatch(name) is not None


@functools.lru_cache(maxsize=1024)
def _wildcard_regex(pattern: str) -> "re.Pattern[str]":
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                              for c in pattern), re.DOTALL)


def _hashed_match(pattern: str, name: str) -> bool:
    """Return True if the ``|1|salt|hash`` *pattern* is the hash of *name*."""
    try:
        _, _, salt_b64, hash_b64 = pattern.split("|")
        salt = base64.b64decode(salt_b64)
        want = base64.b64decode(hash_b64)
    except (ValueError, TypeError):
        return False
    got = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return hmac.compare_digest(got, want)


def known_hosts_name(hostname: str, port: int) -> str:
    """Return the name OpenSSH files a host under: ``host`` or ``[host]:port``."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def fingerprint(key: paramiko.PKey) -> str:
    """Return the OpenSSH-style ``SHA256:...`` fingerprint of *key*."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def verify(host: str, name: str, key: paramiko.PKey, known: KnownHosts, accept_new: bool,
           hash_names: bool = False) -> None:
    """Accept *key* for *name* or raise HostKeyError; with *accept_new* record an unknown key."""
    blob = key.get_base64()
    keytype = key.get_name()
    entries = known.for_name(name)
    revoked = [e for e in entries if e.marker == "@revoked" and e.key_b64 == blob]
    if revoked:
        raise HostKeyError(host, f"the host key {keytype} {fingerprint(key)} of {name} is marked "
                                 f"@revoked in {revoked[0].file}:{revoked[0].line}",
                           "refusing to connect")
    plain = [e for e in entries if not e.marker]
    if any(e.key_b64 == blob for e in plain):
        return
    if plain:
        _refuse_changed(host, name, key, plain)
    if not accept_new:
        files = ", ".join(known.user_files + known.global_files) or "(no known_hosts file)"
        raise HostKeyError(
            host, f"unknown host key {keytype} {fingerprint(key)} for {name} (not in {files})",
            f"check the fingerprint, then re-run with {ACCEPT_FLAG} to record it, "
            f"or add it to known_hosts yourself")
    if not known.user_files:
        raise HostKeyError(host, f"cannot record the new host key of {name}: no user known_hosts file")
    append(known.user_files[0], name, key, hash_names)
    log.warning("host %s: recorded new host key %s %s for %s in %s",
                host, keytype, fingerprint(key), name, known.user_files[0])
    known.entries.append(KnownHost(name, keytype, blob, known.user_files[0], 0))


def _refuse_changed(host: str, name: str, key: paramiko.PKey, plain: List[KnownHost]) -> None:
    """Raise the HostKeyError for a key that differs from the recorded one(s)."""
    same_type = [e for e in plain if e.keytype == key.get_name()]
    old = (same_type or plain)[0]
    what = ("HOST KEY CHANGED" if same_type
            else f"host key type changed (known: {', '.join(sorted({e.keytype for e in plain}))})")
    raise HostKeyError(
        host,
        f"{what} for {name}: the server offered {key.get_name()} {fingerprint(key)}, "
        f"but {old.file}:{old.line} records another key; someone may be intercepting the connection",
        f"if the change is expected, remove the old key with: "
        f"ssh-keygen -f {shlex.quote(old.file)} -R {shlex.quote(name)}")


def append(path: str, name: str, key: paramiko.PKey, hash_name: bool = False) -> None:
    """Append one ``name type key`` line to *path*, creating the file (and dir) if needed."""
    label = paramiko.HostKeys.hash_host(name) if hash_name else name
    line = f"{label} {key.get_name()} {key.get_base64()}\n"
    with _append_lock:
        directory = os.path.dirname(path)
        if directory and not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        needs_newline = False
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                needs_newline = handle.read(1) != b"\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(("\n" if needs_newline else "") + line)


def split_files(value: Optional[str], default: Iterable[str]) -> List[str]:
    """Split an ssh_config known-hosts value (space separated, ``~`` allowed) or use *default*."""
    if value is None:
        return [os.path.expanduser(p) for p in default]
    if value.strip().lower() == "none":
        return []
    return [os.path.expanduser(p) for p in shlex.split(value)]
