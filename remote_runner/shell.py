"""Where scripts run: a remote host over SSH, or this machine for ``localhost``.

Every host-side step of remote_runner (preparing directories, copying, screen,
status, stop, logs) is a POSIX shell script. Running them through one small
interface, :class:`Shell`, lets the same script serve a remote host (``sh -s``
on an SSH exec channel) and ``localhost`` (a local ``sh``) alike, and keeps the
modules that write those scripts (:mod:`remote_runner.screen`,
:mod:`remote_runner.sync`, :mod:`remote_runner.hostops`) free of any import of
the runner that orchestrates them.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from remote_runner.errors import CommandTimeout

#: How a host's python3 runs our programs (the mirror agent, the manifest, the
#: stream receiver): -I ignores PYTHON* variables and the user's site-packages,
#: -S skips the site module and the .pth files of whatever is installed there.
#: They use the standard library alone, so nothing of the host's Python setup
#: can change them, and each start is a little cheaper (on h1: 36.7 ms median
#: without the flags, 33.6 ms with -I -S).
PYTHON_FLAGS = "-I -S"

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.ssh import Connection


@dataclass(frozen=True)
class ScriptResult:
    """What a shell script printed and how it exited."""

    exit_status: int
    stdout: str
    stderr: str


class Shell(Protocol):
    """Somewhere to run POSIX shell scripts: a remote host or this machine."""

    host: str

    def script(self, text: str, timeout: float) -> ScriptResult:
        """Run *text* with ``sh`` (stdin is /dev/null for its commands) and return its output."""

    def feed(self, script: str, data: bytes, timeout: float) -> ScriptResult:
        """Run *script* with ``sh -c``, giving it *data* on stdin."""


def _wrap(text: str) -> bytes:
    """Wrap a script so that sh parses it whole and its commands read /dev/null."""
    return ("{\n" + text + "\n} </dev/null\n").encode("utf-8", "surrogateescape")


def _text(data: Any) -> str:
    return data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else str(data)


#: Longest script given to ``sh -c`` as its argument (see :meth:`RemoteShell.feed`).
ARGV_SCRIPT = 64 << 10


class RemoteShell:
    """Run scripts over an SSH connection (``sh -s`` on an exec channel)."""

    def __init__(self, connection: "Connection", host: str) -> None:
        self.connection = connection
        self.host = host

    def script(self, text: str, timeout: float) -> ScriptResult:
        result = self.connection.run("sh -s", stdin=_wrap(text), timeout=timeout, check=False)
        return ScriptResult(result.exit_status, _text(result.stdout), _text(result.stderr))


    def feed(self, script: str, data: bytes, timeout: float) -> ScriptResult:
        """Run *script* with ``sh``, giving it *data* on stdin.

        A script up to :data:`ARGV_SCRIPT` bytes is ``sh -c``'s argument; a longer
        one (Linux caps one argument at 128 KiB) goes first on stdin, read whole
        into a file of its own (``mktemp``: only this user can change it before it
        runs) by ``head -c``, which reads no further, and runs on the rest: *data*.
        """
        body = script.encode("utf-8", "surrogateescape")
        if len(body) <= ARGV_SCRIPT:
            command, stdin = "sh -c " + shlex.quote(script), data
        else:
            command = "sh -c " + shlex.quote(
                f't=$(mktemp) || exit 125\nhead -c {len(body)} > "$t" && '
                f'[ "$(wc -c < "$t")" -eq {len(body)} ] || {{ rm -f "$t"; exit 125; }}\n'
                'sh "$t"; s=$?; rm -f "$t"; exit $s\n')
            stdin = body + data
        result = self.connection.run(command, stdin=stdin, timeout=timeout, check=False)
        return ScriptResult(result.exit_status, _text(result.stdout), _text(result.stderr))


class LocalShell:
    """Run scripts on this machine, for ``localhost`` components (no SSH)."""

    host = "localhost"

    def script(self, text: str, timeout: float) -> ScriptResult:
        try:
            proc = subprocess.run(["/bin/sh", "-s"], input=_wrap(text), capture_output=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(self.host, "local shell script", timeout) from exc
        return ScriptResult(proc.returncode, _text(proc.stdout), _text(proc.stderr))

    def feed(self, script: str, data: bytes, timeout: float) -> ScriptResult:
        """Run *script* with ``sh -c``, giving it *data* on stdin."""
        try:
            proc = subprocess.run(["/bin/sh", "-c", script], input=data, capture_output=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(self.host, "local shell script", timeout) from exc
        return ScriptResult(proc.returncode, _text(proc.stdout), _text(proc.stderr))


def shell_path(path: str) -> str:
    """Quote *path* for sh, keeping a leading ``~`` as the remote user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)
