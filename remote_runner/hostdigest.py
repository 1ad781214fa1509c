"""Sizes, modes and SHA-1s of host files by plain shell commands, for hosts without python3.

Where the host has python3, one exec against its manifest answers all of this
(:mod:`remote_runner.manifest`). Elsewhere — a minimal Debian, a router, a
container without Python — the change check needs only POSIX tools: one ``stat
-c`` for the size and mode of every file (an SFTP listing per directory where
``stat -c`` is missing too), and one batched hash command for the files whose
size and mode match: ``openssl dgst -sha1 -r`` (SPAR's), else ``sha1sum``, else
nothing, in which case no file can be proven unchanged. The dry run
(:mod:`remote_runner.plan`) and ``fetch`` (:mod:`remote_runner.results`) use
these too: they must not write on the host.
"""

from __future__ import annotations

import posixpath
import shlex
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.shell import Shell

#: Files hashed per ``openssl`` invocation (keeps each exec well under ARG_MAX).
HASH_CHUNK = 500
HASH_TOOL_MARK = "RR-HASH-TOOL"
STAT_OK_MARK = "RR-STAT-OK"


#: Hashes the files named on its command line like ``sha1sum -b`` (hosts with
#: neither openssl nor sha1sum but a Python; unreadable files are left out).
_PY_SHA1 = (
    "import hashlib,sys\n"
    "for p in sys.argv[1:]:\n"
    " try:\n"
    "  h=hashlib.sha1()\n"
    "  with open(p,'rb') as f:\n"
    "   for b in iter(lambda:f.read(1<<20),b''):h.update(b)\n"
    "  print(h.hexdigest()+' *'+p)\n"
    " except OSError:pass\n")
#: Picks the first hash tool that works on the host and names it on a marker line.
_PICK_HASHER = (
    "if openssl dgst -sha1 -r /dev/null >/dev/null 2>&1; then h() { openssl dgst -sha1 -r \"$@\"; }\n"
    f"elif sha1sum -b /dev/null >/dev/null 2>&1; then echo {HASH_TOOL_MARK} sha1sum; "
    "h() { sha1sum -b \"$@\"; }\n"
    f"elif python3 -c '' >/dev/null 2>&1; then echo {HASH_TOOL_MARK} python3; "
    f"h() {{ python3 -c {shlex.quote(_PY_SHA1)} \"$@\"; }}\n"
    f"else echo {HASH_TOOL_MARK} none; exit 0\nfi\n")


def remote_sha1(shell: "Shell", paths: Sequence[str]) -> Tuple[Dict[str, str], str]:
    """Hash *paths* on the host in one command; return ({path: sha1}, tool used).

    The tool is openssl (SPAR's), else sha1sum, else the host's python3, else
    ``none``: then no file can be proven unchanged and all of them are copied.
    """
    hashable = [p for p in paths if "\n" not in p and "\\" not in p]
    if not hashable:
        return {}, "openssl"
    lines = [_PICK_HASHER]
    for start in range(0, len(hashable), HASH_CHUNK):
        words = " ".join(shlex.quote(p) for p in hashable[start:start + HASH_CHUNK])
        lines.append(f"h {words} 2>/dev/null")
    result = shell.script("\n".join(lines) + "\n", timeout=600)
    wanted = set(hashable)
    hashes: Dict[str, str] = {}
    tool = "openssl"
    for line in result.stdout.splitlines():
        if line.startswith(HASH_TOOL_MARK + " "):
            tool = line.split(" ", 1)[1]
            continue
        digest, _, rest = line.partition(" ")
        path = rest[1:] if rest[:1] in ("*", " ") else rest
        if path in wanted and len(digest) == 40:
            hashes[path] = digest.lower()
    return hashes, tool


def remote_attrs(sftp: Any, dirs: Iterable[str]) -> Dict[str, Tuple[int, int]]:
    """Return {path: (size, st_mode)} for the entries of each directory in *dirs* (SFTP)."""
    found: Dict[str, Tuple[int, int]] = {}
    for directory in sorted(set(dirs)):
        try:
            entries = sftp.listdir_attr(directory)
        except IOError:
            continue  # missing directory: everything in it must be uploaded
        for attr in entries:
            found[posixpath.join(directory, attr.filename)] = (attr.st_size, attr.st_mode or 0)
    return found


def remote_stat(shell: "Shell", paths: Sequence[str]) -> Optional[Dict[str, Tuple[int, int]]]:
    """Return {path: (size, st_mode)} of those *paths* that exist, in one command.

    None where ``stat -c`` is not available (the caller lists directories over
    SFTP instead: one round trip per directory rather than one in all).
    """
    lines = [f"stat -c %s / >/dev/null 2>&1 && echo {STAT_OK_MARK} || exit 0"]
    for start in range(0, len(paths), HASH_CHUNK):
        words = " ".join(shlex.quote(p) for p in paths[start:start + HASH_CHUNK])
        lines.append(f"stat -c '%s %f %n' -- {words} 2>/dev/null")
    result = shell.script("\n".join(lines) + "\n", timeout=600)
    out = result.stdout.splitlines()
    if STAT_OK_MARK not in out:
        return None
    wanted = set(paths)
    found: Dict[str, Tuple[int, int]] = {}
    for line in out:
        size, _, rest = line.partition(" ")
        mode, _, path = rest.partition(" ")
        if path in wanted and size.isdigit():
            try:
                found[path] = (int(size), int(mode, 16))
            except ValueError:
                continue
    return found
