"""The byte streams a mirror session runs over: an SSH channel, or a local process's pipes.

Why apart: the link only needs ``read``, ``read_stderr``, ``write_all``,
``close`` and ``exit_status``; an SSH channel (hosts) and a subprocess (the
agent run on this machine, for tests and conformance runs) both provide them
here, with :class:`PeekReader` for the one-shot look at the agent's first bytes.
"""

from __future__ import annotations

import errno
import socket
import os
import subprocess
from typing import Any, Callable, Optional, Sequence

from remote_runner.channelio import send_all_or_raise
from remote_runner.mirror import protocol as P


class ChannelStream:
    """A paramiko channel seen as a byte stream (stdout + stderr + write)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    def read(self, size: int) -> bytes:
        try:
            return self.channel.recv(size)
        except (OSError, EOFError):
            return b""

    def read_stderr(self, size: int) -> bytes:
        """The agent's next stderr bytes; b"" at the channel's end. A timeout (the handshake's,
        see :meth:`set_timeout`) is no end: stderr is read for as long as the channel lives."""
        while True:
            try:
                return self.channel.recv_stderr(size)
            except socket.timeout:
                if self.channel.closed or self.channel.eof_received:
                    return b""
            except (OSError, EOFError):
                return b""

    def wait_fd(self) -> Optional[int]:
        """A descriptor to poll for input: paramiko's pipe, readable while output, stderr or the
        end is there (see :meth:`read_ready`); None if the channel cannot give one."""
        try:
            return self.channel.fileno()
        except Exception:  # noqa: BLE001 - paramiko raises what its pipe module raises
            return None

    def set_timeout(self, seconds: Optional[float]) -> None:
        """Let a read or write wait at most *seconds* (None: as long as it takes); a read that
        waited that long returns b"", as the channel's end does."""
        self.channel.settimeout(seconds)

    def read_ready(self) -> bool:
        """Whether :meth:`read` returns at once (output waiting, or the channel's end)."""
        channel = self.channel
        return bool(channel.recv_ready() or channel.eof_received or channel.closed)

    def write_all(self, data: bytes) -> None:
        try:
            send_all_or_raise(self.channel, data)  # (paramiko's copies what is left after every packet)
        except Exception as exc:  # paramiko raises socket.error / SSHException
            raise OSError(errno.EPIPE, "channel closed: %s" % exc)

    def close(self) -> None:
        try:
            self.channel.close()
        except Exception:
            pass

    def exit_status(self, timeout: float = 2.0) -> Optional[int]:
        if self.channel.status_event.wait(timeout):
            return self.channel.recv_exit_status()
        return None


class PipeStream:
    """A local subprocess seen as a byte stream: runs the agent here (tests, debugging)."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0)

    def read(self, size: int) -> bytes:
        try:
            return self.proc.stdout.read1(size) if hasattr(self.proc.stdout, "read1") else \
                os.read(self.proc.stdout.fileno(), size)
        except (OSError, ValueError):
            return b""

    def read_stderr(self, size: int) -> bytes:
        try:
            return os.read(self.proc.stderr.fileno(), size)
        except (OSError, ValueError):
            return b""

    def wait_fd(self) -> Optional[int]:
        """The agent's stdout (unbuffered here: readable exactly when :meth:`read` returns)."""
        try:
            return self.proc.stdout.fileno()
        except (OSError, ValueError):
            return None

    def read_ready(self) -> bool:
        return True

    def write_all(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            raise OSError(errno.EPIPE, "agent stdin closed: %s" % exc)

    def close(self) -> None:
        """Close the agent's stdin (it exits), then our ends of its output pipes."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            return  # still running (e.g. stopped): the caller decides
        for f in (self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass

    def exit_status(self, timeout: float = 2.0) -> Optional[int]:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


class PeekReader(P.ReadAhead):
    """Exact reads over a stream (:class:`~.protocol.ReadAhead`), with a one-shot peek for the NEED marker."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream
        #: Called before each read that may block (see LocalLink._wait_for_input).
        self.before_read: Optional[Callable[[], None]] = None

    def read_some(self, size: int) -> bytes:
        if self.before_read is not None:
            self.before_read()
        return self.stream.read(size)

    def peek(self, size: int) -> bytes:
        """The next *size* bytes (fewer at the end), left to be read."""
        self._buf, self._pos = self._buf[self._pos:], 0
        while len(self._buf) < size:
            chunk = self.stream.read(size - len(self._buf))
            if not chunk:
                break
            self.received += len(chunk)
            self._buf += chunk
        return self._buf[:size]
