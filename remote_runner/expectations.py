"""What hosts were found to hold, kept on this machine by content: the answers checks expected.

Why: the everyday rerun is "I edited one file". Every other file on the host
is then exactly as an earlier run left it, which the host's shell can tell
from one ``stat`` of the files (see :func:`remote_runner.manifest.run_script`),
but the shell cannot say what those files hold: python3 would have to start to
read the manifest. What it can do is *name* the earlier state, by the SHA-1 of
the answer the earlier run expected and got (:func:`remote_runner.manifest.expectation`),
because this machine wrote that answer and keeps its text here under that
SHA-1. A name a host gives is only ever looked up here and the text checked
against it: a host can name a state, never describe one.

One small file per distinct answer, in ``$XDG_CACHE_HOME/remote-runner/expectations/``;
the oldest beyond :data:`KEEP` are removed when a new one is written. A state
that is missing here (removed, or never seen by this machine) only means
the host's python3 answers, as without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from typing import List, Optional, Tuple

from remote_runner.cachedir import cache_dir
from remote_runner.digests import is_sha1

#: Answers kept (a run writes one only when the files it expects are new to it).
KEEP = 64

_LINE = re.compile(r"(\d+) (\d+) ([0-9a-f]{40})\Z")


def folder() -> str:
    """Where the answers are kept."""
    return cache_dir("expectations")


def keep(digest: str, text: str) -> None:
    """Keep *text* (an expected answer, see :func:`remote_runner.manifest.expectation_text`)
    under its SHA-1 *digest*, unless it is kept already. Never fails a run."""
    where = folder()
    path = os.path.join(where, digest)
    if os.path.exists(path):
        return
    try:
        os.makedirs(where, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="ascii") as out:
            out.write(text)
        os.replace(tmp, path)
        names = [n for n in os.listdir(where) if is_sha1(n)]
        if len(names) > KEEP:
            names.sort(key=lambda n: _mtime(os.path.join(where, n)))
            for name in names[:len(names) - KEEP]:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(where, name))
    except OSError:
        pass


def recall(digest: str, count: int) -> Optional[List[Tuple[int, int, str]]]:
    """(size, mode, SHA-1) of each of *count* files in the answer kept as *digest*, or None
    when it is not kept here, not that answer, or not about *count* files."""
    if not is_sha1(digest):
        return None
    try:
        with open(os.path.join(folder(), digest), "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    if hashlib.sha1(data).hexdigest() != digest:
        return None
    lines = data.decode("ascii", "replace").split("\n")
    if lines[-1] != "" or len(lines) - 1 != count:
        return None
    out = []
    for line in lines[:-1]:
        match = _LINE.match(line)
        if match is None:
            return None
        out.append((int(match.group(1)), int(match.group(2)), match.group(3)))
    return out


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
