"""How much a user may still write on a host's filesystems, asked in the same command as other work.

A copy that cannot fit is refused before anything is written, and a write
that came up short is explained (a full disk, most often) with the same
measurement: ``stat -f`` (root may use the blocks reserved for it), printed
on marked lines so the script can share a command with other steps.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Dict, Iterable, Optional, Sequence, Tuple

from remote_runner.errors import RunnerError

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.shell import Shell


#: Marks the lines of :func:`free_space_script`.
FREE_MARK = "RR-FREE"
#: The command printing the free space line of each directory named after it (shell words).
STAT_FREE = f"stat -f -c '{FREE_MARK} %i %a %f %S %n' --"
#: The line naming the user (root may use the blocks reserved for it).
UID_LINE = f"echo {FREE_MARK} uid $(id -u)\n"


def free_space_script(dirs: Sequence[str], chunk: int = 500) -> str:
    """Shell text printing the free space of each of *dirs*' filesystems, and the user's uid.

    ``RR-FREE fsid avail free bsize dir`` per directory (``stat -f``; nothing
    where it is missing) and ``RR-FREE uid N``: read by :func:`free_space`.
    """
    script = ""
    for start in range(0, len(dirs), chunk):
        words = " ".join(shlex.quote(d) for d in dirs[start:start + chunk])
        script += f"{STAT_FREE} {words} 2>/dev/null\n"
    return script + (UID_LINE if dirs else "")


def free_space(report: Iterable[str]) -> Dict[str, Tuple[str, int]]:
    """{directory: (filesystem id, bytes the user may still write)} from :func:`free_space_script`.

    Root may use the blocks reserved for it. Lines that do not parse (other
    output, a host without ``stat -f``) are ignored.
    """
    lines = [line for line in report if line.startswith(FREE_MARK + " ")]
    root = any(line.split()[1:] == ["uid", "0"] for line in lines)
    found: Dict[str, Tuple[str, int]] = {}
    for line in lines:
        parts = line.split(" ", 5)
        if len(parts) != 6 or not all(p.isdigit() for p in parts[2:5]):
            continue
        _, fsid, avail, free, bsize, directory = parts
        found[directory] = (fsid, int(free if root else avail) * int(bsize))
    return found


def free_bytes(shell: "Shell", directory: str) -> Optional[int]:
    """Return the bytes the user may still write on *directory*'s filesystem (None: unknown)."""
    try:
        result = shell.script(free_space_script([directory]), timeout=60)
    except RunnerError:
        return None
    known = free_space(result.stdout.splitlines()).get(directory)
    return None if known is None else known[1]
