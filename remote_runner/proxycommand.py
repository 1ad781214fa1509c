"""ssh_config's ``ProxyCommand``: a local program that carries the SSH stream.

paramiko ships a ProxyCommand socket, but it fits a run badly: when the
program exits, its ``recv`` spins until the banner timeout (15 s) instead of
reporting end of file; the program's stderr is piped and never read (a chatty
proxy blocks, and its explanation is lost), and the failure reaches the user
as paramiko's own traceback naming the HostName. This one reads stderr into a
bounded tail, returns end of file as soon as the program's stdout closes, and
can say what happened: ``ProxyCommand `nc gw 22` exited with status 1: nc:
connection refused``.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import subprocess
import threading
from typing import Deque, Optional

#: Lines of the program's stderr kept for the error message.
STDERR_LINES = 5


class ProxyCommand:
    """A running ProxyCommand with the socket methods paramiko's transport uses."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.process = subprocess.Popen(["/bin/sh", "-c", "exec " + command],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, bufsize=0)
        self.timeout: Optional[float] = None
        self._stderr: Deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._stderr_done = threading.Event()
        threading.Thread(target=self._read_stderr, daemon=True, name="proxycommand-stderr").start()

    def _read_stderr(self) -> None:
        stream = self.process.stderr
        try:
            for raw in iter(stream.readline, b""):  # type: ignore[union-attr]
                line = raw.decode(errors="replace").strip()
                if line:
                    self._stderr.append(line)
        except (OSError, ValueError):
            pass
        finally:
            self._stderr_done.set()

    # -- the socket interface --------------------------------------------------

    def send(self, data: bytes) -> int:
        try:
            return self.process.stdin.write(data) or 0  # type: ignore[union-attr]
        except (OSError, ValueError) as exc:
            raise OSError(exc.errno if isinstance(exc, OSError) else None, self.failure()) from exc

    def recv(self, size: int) -> bytes:
        """Return up to *size* bytes; b"" at end of file; socket.timeout past the timeout."""
        fd = self.process.stdout.fileno()  # type: ignore[union-attr]
        ready, _, _ = select.select([fd], [], [], self.timeout)
        if not ready:
            raise socket.timeout()
        return os.read(fd, size)

    def settimeout(self, timeout: Optional[float]) -> None:
        self.timeout = timeout

    def close(self) -> None:
        """Stop the program (terminate, then kill) and release its pipes."""
        process = self.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    @property
    def closed(self) -> bool:
        return self.process.returncode is not None

    _closed = closed

    # -- diagnosis -------------------------------------------------------------

    def failure(self, wait: float = 1.0) -> str:
        """Say what the program did: its exit status (if it ended) and its last stderr lines."""
        try:
            status: Optional[int] = self.process.wait(wait)
        except subprocess.TimeoutExpired:
            status = None
        self._stderr_done.wait(0.5 if status is not None else 0)
        text = f"ProxyCommand `{self.command}` " + (
            "is still running but sent no SSH banner" if status is None
            else f"exited with status {status}")
        tail = " | ".join(self._stderr)
        return f"{text}: {tail}" if tail else text
