"""Host sets: ``client[1-20]``, ``node[01-64]``, ``rack[1-2]-n[1-8]``, ``a,b,c[3,5-7]``.

Clusters name hosts by pattern, and every tool that drives many of them (ClusterShell's node
sets, Slurm node lists, pdsh, Ansible's ``host[01:50]``) lets a user write the pattern instead of
the list. We accept the ClusterShell/Slurm spelling, which is the one users paste from
``sinfo`` or ``scontrol show hostnames``:

* a bracket holds a comma list of numbers and ``lo-hi`` ranges; a range whose lower bound has
  leading zeros pads every number to that width (``[01-10]`` -> ``01`` … ``10``), as Slurm does;
* several brackets in one name multiply (``rack[1-2]-n[1-3]`` is six hosts, rack-major);
* commas outside brackets separate patterns; the result keeps the written order and drops
  repeats.

Expansion is bounded (:data:`MAX_HOSTS`) so a typo like ``[1-9999999]`` fails fast rather than
filling memory. Errors are :class:`ValueError` with the offending pattern; callers that know
the file and line (the YAML experiment loader) wrap them into a located ConfigError.
"""

from __future__ import annotations

import itertools
import re
from typing import Iterable, List

#: Most hosts one expression may expand to.
MAX_HOSTS = 100_000

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class HostSetError(ValueError):
    """A host set expression is malformed or too large."""


def split_top(text: str) -> List[str]:
    """Split *text* at commas that are outside brackets (``a,b[1,2]`` -> ``a``, ``b[1,2]``)."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostSetError(f"nested '[' in host set {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostSetError(f"']' without '[' in host set {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise HostSetError(f"unclosed '[' in host set {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _bracket_values(body: str, pattern: str) -> List[str]:
    """Expand the inside of one bracket: ``1,3,5-7`` or ``01-10``."""
    values: List[str] = []
    for item in body.split(","):
        item = item.strip()
        match = _RANGE.match(item)
        if not match:
            raise HostSetError(f"bad range {item!r} in host set {pattern!r} "
                               "(expected N or LO-HI, e.g. [1-20] or [01,03,10-12])")
        lo_text, hi_text = match.group(1), match.group(2)
        if hi_text is None:
            values.append(lo_text)
            continue
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise HostSetError(f"range {item!r} runs backwards in host set {pattern!r}")
        if hi - lo + 1 > MAX_HOSTS:
            raise HostSetError(f"range {item!r} in host set {pattern!r} is larger than "
                               f"{MAX_HOSTS} hosts")
        width = len(lo_text) if lo_text.startswith("0") and len(lo_text) > 1 else 0
        values.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return values


def expand_one(pattern: str) -> List[str]:
    """Expand one pattern without top-level commas (``rack[1-2]-n[1-8]``)."""
    pieces = re.split(r"(\[[^\]]*\])", pattern)
    choices: List[List[str]] = []
    total = 1
    for piece in pieces:
        if piece.startswith("[") and piece.endswith("]"):
            values = _bracket_values(piece[1:-1], pattern)
        else:
            if "[" in piece or "]" in piece:
                raise HostSetError(f"unbalanced bracket in host set {pattern!r}")
            values = [piece]
        total *= len(values)
        if total > MAX_HOSTS:
            raise HostSetError(f"host set {pattern!r} expands to more than {MAX_HOSTS} hosts")
        choices.append(values)
    return ["".join(combo) for combo in itertools.product(*choices)]


def expand(text: str) -> List[str]:
    """Expand a host set expression to the list of host names, in order, without repeats."""
    if not isinstance(text, str) or not text.strip():
        raise HostSetError("an empty host set")
    hosts: List[str] = []
    for part in split_top(text):
        if not part:
            raise HostSetError(f"empty name between commas in host set {text!r}")
        hosts.extend(expand_one(part))
    if len(hosts) > MAX_HOSTS:
        raise HostSetError(f"host set {text!r} expands to more than {MAX_HOSTS} hosts")
    return list(dict.fromkeys(hosts))


def expand_all(items: Iterable[str]) -> List[str]:
    """Expand several expressions (a YAML list) into one ordered list without repeats."""
    out: List[str] = []
    for item in items:
        out.extend(expand(item))
    return list(dict.fromkeys(out))
