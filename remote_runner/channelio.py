"""One command on one SSH channel: its stdin fed, its output drained, its end awaited.

paramiko gives channels, not commands. Running a command safely on a connection that many
threads share needs more than ``exec_command``: stdout and stderr drained at once (a full
stderr window blocks a command that only writes stdout), stdin sent and closed without
tripping OpenSSH (see :class:`_Feeder` and :func:`_draining`), and a deadline that closes the
channel instead of hanging. Kept apart from :mod:`remote_runner.ssh` so the connection module
is about connecting.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import shlex
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import paramiko

from remote_runner.errors import MAX_OUTPUT, OutputTooLarge

from remote_runner.loginshell import OutputAfterMark, for_login_shell, with_mark

log = logging.getLogger("remote_runner.ssh")


@dataclass
class RunResult:
    """What a finished remote command produced."""

    exit_status: int
    stdout: bytes
    stderr: bytes


def start_command(channel: paramiko.Channel, command: str) -> None:
    """Ask the host to run *command* on *channel*, without waiting for its answer.

    paramiko's ``exec_command`` waits for the host's "success" before it
    returns: one round trip per command for nothing, since what follows (the
    command's stdin, reading its output) travels on the channel after the
    request and the host handles them in that order. A command the host
    refuses closes the channel: its reader sees the end with no exit status
    (-1), as for a command that died without one. *command* is given to
    the host's login shell as :func:`~remote_runner.loginshell.for_login_shell`
    writes it, so that csh or fish reads it as ``/bin/sh`` would; it prints a
    mark first and the channel's ``recv`` gives only what follows it (what the
    login shell's rc files printed is dropped, see
    :class:`~remote_runner.loginshell.OutputAfterMark`).
    """
    command, line, error_line = with_mark(command)
    _after_mark(channel, "recv", "recv_ready", line)
    if error_line is not None:
        _after_mark(channel, "recv_stderr", "recv_stderr_ready", error_line)
    command = for_login_shell(command)  # the host's login shell reads it first
    transport = channel.transport
    if not hasattr(transport, "_send_user_message") or not hasattr(channel, "remote_chanid"):
        channel.exec_command(command)  # another paramiko: its own way
        return
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("exec")
    message.add_boolean(True)  # the answer still comes: a refusal closes the channel
    message.add_string(command)
    with channel.lock:
        if channel.closed:
            raise paramiko.SSHException("channel closed before the command was sent")
    transport._send_user_message(message)


#: Seconds a refused session waits for one of ours on the connection to close (see
#: :func:`open_session`) before the refusal is an error.
SESSION_WAIT = 60.0


#: A copy's channel on which the host takes no data and sends no answer for this long (seconds)
#: belongs to a host that stalled (a hung disk or NFS home, a stopped receiver): the wait ends
#: with an error instead of lasting for ever while the connection itself stays up.
IDLE_TIMEOUT = 120.0


def open_session(transport: paramiko.Transport, timeout: float) -> paramiko.Channel:
    """``transport.open_session``, waiting for a session of ours to end when the host refuses one.

    sshd allows ``MaxSessions`` sessions per connection (10 by default; hardened
    hosts set fewer). A copy opens several at once (bundles, streams, packed
    files) beside the session lock's, and the host refuses the next ("Connect
    failed") until one of them ends. So a refusal while other channels of ours
    are open waits for one to close and tries again; with none of ours open, or
    none closing for :data:`SESSION_WAIT` seconds, it is an error that says why.
    """
    patient_since = time.monotonic()
    while True:
        try:
            return transport.open_session(timeout=timeout)
        except paramiko.SSHException as exc:
            # (refusals that reach threads opening at once can lose their reason: "Unable to open")
            if not isinstance(exc, paramiko.ChannelException) and "Unable to open" not in str(exc):
                raise
            ours = _open_channels(transport)
            if not ours or time.monotonic() - patient_since > SESSION_WAIT or not transport.is_active():
                raise paramiko.ChannelException(getattr(exc, "code", 2), f"{getattr(exc, 'text', exc)}: the host "
                                                f"refused a session while {ours} of ours were open on the "
                                                "connection (sshd's MaxSessions)") from exc
            log.debug("session refused with %d open; waiting for one to end", ours)
            end = time.monotonic() + 1.0
            while _open_channels(transport) >= ours and time.monotonic() < end:
                time.sleep(0.01)
            if _open_channels(transport) < ours:
                patient_since = time.monotonic()  # one ended: the wait starts again


def _open_channels(transport: paramiko.Transport) -> int:
    """How many channels are open on *transport* (paramiko keeps no public count)."""
    channels = getattr(transport, "_channels", None)
    try:
        return len(channels) if channels is not None else 0
    except TypeError:
        return 0


def _after_mark(channel: paramiko.Channel, recv: str, ready: str, line: bytes) -> None:
    """Make *channel*'s *recv* (and its *ready* test) skip what comes before *line*."""
    reader = OutputAfterMark(getattr(channel, recv), line)
    buffered = getattr(channel, ready)
    setattr(channel, recv, reader)
    setattr(channel, ready, lambda: reader.ready(buffered))


def _collect(channel: paramiko.Channel, stdin: Optional[bytes],
             deadline: Optional[float]) -> Optional[RunResult]:
    """Feed stdin and drain stdout/stderr concurrently; return None on timeout."""
    out: List[bytes] = []
    err: List[bytes] = []
    feeder = _Feeder(channel, stdin)
    drains = [
        threading.Thread(target=_drain, args=(channel.recv, out, channel.close), daemon=True),
        threading.Thread(target=_drain, args=(channel.recv_stderr, err, channel.close),
                         daemon=True),
    ]
    for thread in drains + [feeder]:
        thread.start()
    for thread in drains:
        thread.join(_remaining(deadline))
        if thread.is_alive():
            break
    if None in out or None in err:  # (the channel is closed already)
        raise OutputTooLarge("", "a command")
    finished = not any(t.is_alive() for t in drains) and channel.status_event.wait(
        _remaining(deadline))
    if not finished:
        channel.close()
        for thread in drains + [feeder]:
            thread.join(5)
        return None
    return RunResult(channel.exit_status, b"".join(out), b"".join(err))


def _draining(command: str) -> str:
    """*command*, then read what is left of stdin, keeping the command's exit status.

    A command that exits without reading all the input we send lets the
    server close the channel while paramiko may still send data on it (it
    checks for a close, then sends outside its lock); OpenSSH answers data
    for a freed channel by dropping the whole connection. Draining stdin on
    the host keeps every channel open until our EOF.
    """
    return "sh -c " + shlex.quote("{ " + command + "\n}; s=$?; cat >/dev/null; exit $s")


def _remaining(deadline: Optional[float]) -> Optional[float]:
    """Return seconds left until *deadline* (None = forever, never negative)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _drain(read: Callable[[int], bytes], sink: List[bytes],
           give_up: Callable[[], None] = lambda: None) -> None:
    """Read a channel stream into *sink* until EOF or close, or :data:`MAX_OUTPUT` bytes.

    Past that, the host is not believed: reading stops, ``None`` is appended
    and *give_up* is called (closing the channel, which ends the other stream's
    read too); the caller refuses the answer.
    """
    held = 0
    while True:
        try:
            data = read(1 << 16)
        except (OSError, EOFError, paramiko.SSHException):
            return
        if not data:
            return
        held += len(data)
        if held > MAX_OUTPUT:
            sink.append(None)  # type: ignore[arg-type]
            give_up()
            return
        sink.append(data)


class _Feeder(threading.Thread):
    """Send a command's stdin, then EOF, so a command reading stdin never waits forever.

    A command may exit before reading all its input (``tar`` stops at the
    end-of-archive blocks, a script may ``exit``). The server then closes the
    channel, paramiko answers with its own close at once, and an EOF sent
    after that refers to a channel OpenSSH has freed: it drops the whole
    connection, and every other command on it fails. paramiko's
    ``shutdown_write`` checks nothing of this and sends outside the channel
    lock, so EOF is sent here while holding that lock (the one paramiko takes
    to mark the channel closed): either it goes out before the close, or the
    channel is seen closed and nothing is sent. Data cannot be guarded so
    (paramiko waits for window space inside that lock): :func:`_draining`
    keeps such a channel open until our EOF instead.
    """

    def __init__(self, channel: paramiko.Channel, stdin: Optional[bytes]) -> None:
        super().__init__(daemon=True, name="ssh-stdin")
        self.channel = channel
        self.stdin = stdin
        # Log lines of this thread name the host of the thread that started it.
        self._context = contextvars.copy_context()

    def run(self) -> None:
        self._context.run(self._feed)

    def _feed(self) -> None:
        try:
            if self.stdin:
                send_all(self.channel, self.stdin)
            send_eof(self.channel)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.debug("stdin not fully sent: %s", exc or type(exc).__name__)


def send_all(channel: paramiko.Channel, data: Any) -> bool:
    """Send *data* (bytes or a memoryview) whole, one channel packet at a time; False if closed.

    paramiko's ``sendall`` re-slices the remaining bytes after every packet
    (``s = s[sent:]``), copying what is left each time: a 16 MiB tar bundle
    cost ~4 GB of memory copies. Here each packet is one slice of a view.
    """
    view = memoryview(data).cast("B")
    step = max(1024, (getattr(channel, "out_max_packet_size", 32768) or 32768) - 64)
    while view:
        sent = channel.send(bytes(view[:step]))
        if not sent:  # closed, or EOF already sent
            return False
        view = view[sent:]
    return True


def send_all_or_raise(channel: paramiko.Channel, data: Any) -> None:
    """:func:`send_all`, raising as paramiko's ``sendall`` does when the channel is closed."""
    if not send_all(channel, data):
        raise OSError(errno.EPIPE, "the SSH channel is closed")


def send_eof(channel: paramiko.Channel) -> None:
    """Send EOF on *channel* unless it is closed already (checked under paramiko's channel lock).

    See :class:`_Feeder` for why a late EOF would cost the whole connection.
    """
    if not hasattr(channel, "_send_eof"):  # another paramiko: its own shutdown
        channel.shutdown_write()
        return
    with channel.lock:
        if channel.closed:
            return
        message = channel._send_eof()
        if message is not None:
            channel.transport._send_user_message(message)
