"""What every scenario gets: the testbed, the settings, and a few shared helpers."""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from bench.measure import BenchError, run
from bench.testbed import Testbed
from bench.tools import Outrun
from remote_runner.screen import quit_sessions_script


@dataclass
class Context:
    """Settings and shared resources of one bench run."""

    testbed: Testbed
    delays: List[float]
    reps: int
    quick: bool
    work_dir: str
    outrun: Optional[Outrun] = None
    slow_after: float = 15.0
    step_timeout: float = 600.0
    notes: List[str] = field(default_factory=list)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def path(self, *parts: str) -> str:
        """Return a path inside the bench's local work directory (created)."""
        path = os.path.join(self.work_dir, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def screen_name(self, what: str) -> str:
        """Return a screen session name unique to this bench run and *what*."""
        return f"rrbench-{self.tag}-{what}"

    def on_hosts(self, delay: float, hosts: Sequence[str], command: str, timeout: float = 300) -> None:
        """Run one shell *command* on every host in parallel (OpenSSH); raise on any failure."""
        ssh_config = self.testbed.ssh_config(delay)
        parallel([["ssh", "-F", ssh_config, "-o", "BatchMode=yes", h, command] for h in hosts], timeout)

    def quit_screens(self, delay: float, hosts: Sequence[str], name: str) -> None:
        """Quit every screen session called *name* on *hosts* and kill what its windows started."""
        try:
            self.on_hosts(delay, hosts, cleanup_script(name))
        except BenchError:
            pass


def cleanup_script(name: str) -> str:
    """Return shell text that stops and quits session *name* and removes its state directory."""
    return (quit_sessions_script(name, 0) +
            f"rm -rf \"$HOME/.remote-runner/\"{shlex.quote(name)}\n")


def parallel(argvs: Sequence[Sequence[str]], timeout: float = 600, env=None) -> None:  # type: ignore[no-untyped-def]
    """Run every argv at once; raise BenchError naming the first that failed."""
    if not argvs:
        return
    with ThreadPoolExecutor(max_workers=min(32, len(argvs))) as pool:
        futures = [pool.submit(run, argv, timeout, env) for argv in argvs]
        errors = []
        for future in futures:
            try:
                future.result()
            except BenchError as exc:
                errors.append(str(exc))
    if errors:
        raise BenchError(f"{len(errors)} of {len(argvs)} failed: {errors[0]}")


def write_random(path: str, size: int) -> None:
    """Write *size* random bytes to *path* unless it already has that size."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = min(left, 1 << 20)
            handle.write(os.urandom(chunk))
            left -= chunk


def git(*args: str, cwd: str) -> None:
    """Run git quietly in *cwd* with a fixed identity."""
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", *args],
                   cwd=cwd, check=True, capture_output=True)
