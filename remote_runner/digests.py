"""What a SHA-1 digest looks like, for every place that reads one it did not compute.

Why one module: digests arrive from files this machine keeps (the hash cache,
the expectations), from hosts (a manifest's answer, a streamed copy's
report) and from the shell's quick answer. None of them is believed
unchecked (a host is not trusted, a file may be torn), and all apply the
same test: 40 lowercase hexadecimal digits, nothing around them.
"""

from __future__ import annotations

import re
from typing import Any

_SHA1_HEX = re.compile(r"[0-9a-f]{40}")


def is_sha1(value: Any) -> bool:
    """Whether *value* is a SHA-1 digest as ``hashlib`` writes it (a str of 40 lowercase hex digits)."""
    return isinstance(value, str) and _SHA1_HEX.fullmatch(value) is not None
