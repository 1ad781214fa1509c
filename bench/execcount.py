"""Run our runner's command line while counting, per host, the SSH channels it opens.

An instrument of the bench, not a feature: the runner is started exactly as
``bench.ours.RUNNER`` does, after wrapping :meth:`Connection.exec_channel` (one
remote command each) and the SFTP opening, so a scenario can report how many
commands a run costs per host next to its wall time. The counts are printed on
stderr as one ``RR-BENCH-EXECS {json}`` line when the run ends.
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
from collections import Counter
from typing import Dict, List

MARK = "RR-BENCH-EXECS "
#: Runs the classic CLI with the counters in place.
RUNNER = [sys.executable, "-c", "import sys, bench.execcount as c; c.install(); "
          "from remote_runner.cli.classic import main; sys.exit(main())"]


def install() -> None:
    """Wrap the connection's channel openers and print the counts at exit."""
    from remote_runner import ssh

    counts: Dict[str, Counter] = {}
    lock = threading.Lock()

    def count(host: str, kind: str) -> None:
        with lock:
            counts.setdefault(host, Counter())[kind] += 1

    exec_channel, sftp = ssh.Connection.exec_channel, ssh.Connection.sftp

    def counted_exec(self, command, **kwargs):  # type: ignore[no-untyped-def]
        count(self.alias, "exec")
        return exec_channel(self, command, **kwargs)

    def counted_sftp(self):  # type: ignore[no-untyped-def]
        fresh = self._sftp is None
        client = sftp(self)
        if fresh:
            count(self.alias, "sftp")
        return client

    ssh.Connection.exec_channel = counted_exec  # type: ignore[method-assign]
    ssh.Connection.sftp = counted_sftp  # type: ignore[method-assign]
    atexit.register(lambda: sys.stderr.write(
        MARK + json.dumps({h: dict(c) for h, c in sorted(counts.items())}) + "\n"))


def parse(stderr: str) -> Dict[str, Dict[str, int]]:
    """Return host -> {"exec": n, "sftp": n} from a counted run's stderr ({} if absent)."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {}


def describe(counts: Dict[str, Dict[str, int]]) -> str:
    """Return e.g. ``execs per host: 4 (h1-h4)`` or one value per host when they differ."""
    if not counts:
        return "execs per host: not counted"
    values: List[int] = [c.get("exec", 0) for c in counts.values()]
    sftp = sum(c.get("sftp", 0) for c in counts.values())
    extra = f", {sftp} SFTP session(s) in all" if sftp else ""
    if len(set(values)) == 1:
        return f"execs per host: {values[0]}{extra}"
    return "execs per host: " + ", ".join(f"{h} {c.get('exec', 0)}" for h, c in counts.items()) + extra
