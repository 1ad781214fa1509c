"""This machine's cache directory: ``$XDG_CACHE_HOME/remote-runner`` (``~/.cache/...``).

Why one place: the local hash cache, the mirror's command profiles and the
agent bundles this machine built all live below it, and all must follow
``XDG_CACHE_HOME`` alike (the test suite points it at a directory of its own,
so that a test run neither reads nor changes the developer's caches).
"""

from __future__ import annotations

import os


def cache_dir(*parts: str) -> str:
    """``$XDG_CACHE_HOME/remote-runner/<parts>`` (``~/.cache`` when the variable is unset or empty)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "remote-runner", *parts)
