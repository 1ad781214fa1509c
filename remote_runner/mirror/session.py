"""The local side of a mirror session: ship the agent, serve files, carry stdio and signals.

One SSH session channel carries everything, framed by :mod:`protocol`: the
agent's file-system requests (answered here by a thread pool, many in
flight), the command's stdin/stdout/stderr, signals, window size, heartbeats
and the exit status. No port is opened anywhere and no token is needed: the
channel is the authenticated SSH session itself.

:func:`run_command` is ``remote-runner exec``; :class:`MirrorServer` is what
the runner uses for ``component.mirror = True``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import platform
import queue
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from remote_runner.errors import EXIT_LINK, MirrorError
from remote_runner.mirror import protocol as P
from remote_runner.mirror.bundle import ALTERED_MARKER, NEED_MARKER, AgentBundle, build_bundle
from remote_runner.mirror.exports import Exports
from remote_runner.mirror.profile import CommandProfile
from remote_runner.mirror.service import LocalFileService

LOG = logging.getLogger(__name__)

#: Variables naming local sockets or sessions that cannot work on another host.
DROPPED_ENV = (
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_CLIENT", "SSH_CONNECTION", "SSH_TTY", "DISPLAY",
    "WAYLAND_DISPLAY", "XAUTHORITY", "XDG_RUNTIME_DIR", "XDG_SESSION_ID", "DBUS_SESSION_BUS_ADDRESS",
    "SESSION_MANAGER", "GPG_AGENT_INFO", "TMUX", "TMUX_PANE", "STY", "WINDOW", "KRB5CCNAME",
)
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
HEARTBEAT = 5.0
DEADLINE = 20.0
START_TIMEOUT = 60.0
#: Seconds close() waits for the reader thread to end (so it never prints at exit).
READER_JOIN = 2.0


@dataclass
class MirrorOptions:
    """How a mirror session behaves (the ``exec`` flags)."""

    files_only: bool = False
    forward_env: Sequence[str] = ()
    debug_rpc: bool = False
    compress: bool = True
    #: Let the host fetch read-only files whole and keep copies (checked at every open).
    file_cache: bool = True
    heartbeat: float = HEARTBEAT
    deadline: float = DEADLINE
    #: A file operation unanswered this long fails with EIO on the host.
    request_timeout: float = 60.0
    workers: int = 8
    exports: Optional[List[bytes]] = None
    #: ``--export PATH[:ro]``: trees served besides the defaults (see exports.py).
    export: Sequence[str] = ()
    #: ``--read-only``: nothing served can be changed.
    read_only: bool = False


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
        try:
            return self.channel.recv_stderr(size)
        except (OSError, EOFError):
            return b""

    def write_all(self, data: bytes) -> None:
        try:
            self.channel.sendall(data)
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
        import subprocess
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

    def write_all(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            raise OSError(errno.EPIPE, "agent stdin closed: %s" % exc)

    def close(self) -> None:
        """Close the agent's stdin (it exits), then our ends of its output pipes."""
        import subprocess
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
        import subprocess
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


class _Reader:
    """Exact reads over a stream, with a one-shot peek for the NEED marker."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = b""

    def read(self, size: int) -> bytes:
        if self.buf:
            out, self.buf = self.buf[:size], self.buf[size:]
            return out
        return self.stream.read(size)

    def peek(self, size: int) -> bytes:
        while len(self.buf) < size:
            chunk = self.stream.read(size - len(self.buf))
            if not chunk:
                break
            self.buf += chunk
        return self.buf[:size]


def filtered_environment(forward: Sequence[str] = (), base: Optional[Mapping[bytes, bytes]] = None,
                         extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Return the local environment (wire-encoded) minus what cannot work remotely."""
    env = dict(os.environb if base is None else base)
    keep = {name.encode() for name in forward}
    for name in DROPPED_ENV:
        if name.encode() not in keep:
            env.pop(name.encode(), None)
    out = {P.name_to_wire(k): P.name_to_wire(v) for k, v in env.items()}
    for key, value in (extra or {}).items():
        out[key] = str(value)
    return out


def current_umask() -> int:
    """Read the process umask without changing it for long."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_origin() -> str:
    """Name this machine and user for the host's file cache (copies from two origins never mix)."""
    machine = b""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, "rb") as handle:
                machine = handle.read().strip()
            break
        except OSError:
            continue
    seed = b"%s|%s|%d" % (machine, platform.node().encode(), os.getuid())
    return hashlib.sha1(seed).hexdigest()[:20]


def connection_secrets(conn: Any) -> List[str]:
    """The files this connection authenticates with (keys, known_hosts, ssh_config): never served."""
    config = getattr(conn, "config", None) or {}
    found = list(config.get("identityfile") or [])
    for key in ("userknownhostsfile", "globalknownhostsfile"):
        found += str(config.get(key) or "").split()
    options = getattr(conn, "options", None)
    found.append(getattr(options, "ssh_config_file", None) or "")
    return [path for path in found if path and path != "/dev/null"]


def files_only_exports(argv: Sequence[str], cwd: str) -> List[bytes]:
    """Local trees to mount in files-only mode: the cwd and paths named on the command line."""
    candidates = [os.fsencode(cwd)]
    for arg in list(argv)[1:]:
        if not arg or arg.startswith("-") and not os.path.exists(os.path.join(cwd, arg)):
            continue
        path = os.path.normpath(os.path.join(os.fsencode(cwd), os.fsencode(arg)))
        if os.path.isdir(path):
            candidates.append(path)
        elif os.path.lexists(path):
            candidates.append(os.path.dirname(path))
        elif os.path.isabs(arg) and os.path.isdir(os.path.dirname(path)):
            candidates.append(os.path.dirname(path))
    exports: List[bytes] = []
    for path in sorted(set(candidates), key=len):
        if path == b"/":
            LOG.warning("files-only: not mounting the local / over the host's root")
            continue
        if any(path == e or path.startswith(e + b"/") for e in exports):
            continue
        exports.append(path)
    return exports


class LocalLink:
    """The framed channel to the agent, seen from the local side."""

    def __init__(self, stream: Any, service: LocalFileService, options: MirrorOptions,
                 host: str = "host") -> None:
        self.stream = stream
        self.reader = _Reader(stream)
        self.writer = P.FrameWriter(stream.write_all)
        self.service = service
        self.options = options
        self.host = host
        self.handlers: Dict[str, Callable[[Dict[str, Any], bytes], None]] = {}
        self.lost = threading.Event()
        self.lost_reason = ""
        self.last_rx = time.monotonic()
        self.hello: Dict[str, Any] = {}
        self.stderr_tail: List[str] = []
        self.pool = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="mirror-fs")

    # -- startup -------------------------------------------------------------
    def handshake(self, bundle: AgentBundle) -> Dict[str, Any]:
        """Upload the agent if the host asks for it, then read and check its hello."""
        threading.Thread(target=self._stderr_loop, daemon=True, name="mirror-stderr").start()
        first = self.reader.peek(len(NEED_MARKER))
        if first in (NEED_MARKER, ALTERED_MARKER):
            self.reader.read(len(NEED_MARKER))
            if first == ALTERED_MARKER:
                LOG.warning("%s: the cached mirror agent on the host was altered (its sha256 is "
                            "not %s...); replacing it", self.host, bundle.sha256[:12])
            LOG.info("%s: uploading the mirror agent (%d bytes, sha256 %s...)", self.host,
                     len(bundle.data), bundle.sha256[:12])
            self.stream.write_all(bundle.data)
        try:
            header, _ = P.read_frame(self.reader)
        except P.ProtocolError as exc:
            raise MirrorError(self._startup_failure("the mirror agent did not start (%s)" % exc))
        if header.get("t") != P.HELLO:
            raise MirrorError(f"host {self.host}: unexpected first frame {header.get('t')!r}")
        problem = P.check_version(header.get("v"))
        if problem:
            raise MirrorError(f"host {self.host}: mirror agent {problem}")
        if header.get("machine") != platform.machine():
            raise MirrorError(f"host {self.host}: the host is {header.get('machine')} but this machine is "
                              f"{platform.machine()}; the mirror runs local programs, so both must match")
        self.hello = header
        self.writer.compress = bool(header.get("lz4")) and self.options.compress and P.lz4_available()
        return header

    def _startup_failure(self, what: str) -> str:
        time.sleep(0)  # let the stderr thread catch up without a fixed wait
        status = self.stream.exit_status(5.0)
        tail = " | ".join(self.stderr_tail[-5:])
        text = f"host {self.host}: {what}"
        if status == 127 or "python3" in tail and "not found" in tail:
            text += "; python3 (>= 3.8) is required on the host"
        if tail:
            text += f": {tail}"
        return text

    def boot(self, fields: Dict[str, Any]) -> None:
        """Send the single bootstrap frame."""
        header = {"t": P.BOOT, "v": P.PROTOCOL_VERSION, "machine": platform.machine(),
                  "compress": self.writer.compress, "hb": self.options.heartbeat,
                  "deadline": self.options.deadline, "rq": self.options.request_timeout, "debug": LOG.isEnabledFor(logging.DEBUG),
                  "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
        if self.options.file_cache:
            header["cache"] = cache_origin()
        header.update(fields)
        self.send(header)

    def start(self) -> None:
        """Start the reader and heartbeat threads."""
        self._reader_thread = threading.Thread(target=self._read_loop, daemon=True,
                                               name="mirror-read")
        self._reader_thread.start()
        threading.Thread(target=self._heartbeat_loop, daemon=True, name="mirror-heartbeat").start()

    # -- running -------------------------------------------------------------
    def send(self, header: Dict[str, Any], payload: bytes = b"", compressible: bool = False) -> None:
        """Send one frame; a failure marks the link lost."""
        if self.lost.is_set():
            return
        try:
            self.writer.send(header, payload, compressible)
        except OSError as exc:
            self.mark_lost(f"write failed: {exc}")

    def mark_lost(self, reason: str) -> None:
        """Record that the link is gone and wake every waiter."""
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()

    def _serve(self, header: Dict[str, Any], payload: bytes) -> None:
        started = time.monotonic()
        reply, data, compressible = self.service.serve(header, payload)
        if self.options.debug_rpc:
            LOG.info("rpc %s %s -> %s %.2f ms", header.get("op"), header.get("a"),
                     reply.get("e", "ok"), (time.monotonic() - started) * 1000)
        self.send(reply, data, compressible)

    def _read_loop(self) -> None:
        try:
            while True:
                header, payload = P.read_frame(self.reader)
                self.last_rx = time.monotonic()
                kind = header["t"]
                if kind == P.REQ:
                    self.pool.submit(self._serve, header, payload)
                elif kind == P.PING:
                    self.send({"t": P.PONG})
                elif kind == P.PONG:
                    continue
                else:
                    handler = self.handlers.get(kind)
                    if handler is not None:
                        handler(header, payload)
                    else:
                        LOG.debug("mirror: ignoring frame %r", kind)
        except P.LinkClosed:
            self.mark_lost("the SSH channel closed")
        except (P.ProtocolError, OSError) as exc:
            self.mark_lost(f"link error: {exc}")
        except BaseException as exc:  # noqa: BLE001 - a thread must never print a traceback
            # e.g. a request arriving while close() shuts the pool down, or at exit
            if not self.lost.is_set():
                LOG.debug("mirror: reader stopped", exc_info=True)
            self.mark_lost(f"link error: {exc!r}")

    def _heartbeat_loop(self) -> None:
        while not self.lost.wait(self.options.heartbeat):
            if time.monotonic() - self.last_rx > self.options.deadline:
                self.mark_lost(f"no answer from the agent for {self.options.deadline:g} s")
                return
            self.send({"t": P.PING})

    def _stderr_loop(self) -> None:
        pending = b""
        while True:
            try:
                chunk = self.stream.read_stderr(4096)
            except Exception:  # noqa: BLE001 - the stream was closed under us: nothing more
                chunk = b""
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                self._agent_line(line.decode("utf-8", "replace"))
        if pending:
            self._agent_line(pending.decode("utf-8", "replace"))

    def _agent_line(self, text: str) -> None:
        self.stderr_tail = (self.stderr_tail + [text])[-20:]
        if "WARNING" in text or "ERROR" in text:
            LOG.warning("%s: %s", self.host, text)
        else:
            LOG.debug("%s: %s", self.host, text)

    def close(self) -> None:
        """Say goodbye, close the stream and release local handles."""
        self.send({"t": P.BYE})
        self.mark_lost("closed")
        self.stream.close()
        reader = getattr(self, "_reader_thread", None)
        if reader is not None and reader is not threading.current_thread():
            reader.join(READER_JOIN)  # it ends on the closed stream; nothing left to print
        self.pool.shutdown(wait=False)
        self.service.close()


def open_agent(conn: Any, mode: str, options: MirrorOptions, roots: Optional[List[bytes]] = None,
               stream: Any = None, exports: Optional[Exports] = None) -> LocalLink:
    """Start the agent on *conn* (a :class:`remote_runner.ssh.Connection`) or on *stream*.

    *exports* is what the host may see (default: everything but the denylist).
    """
    bundle = build_bundle()
    host = getattr(conn, "alias", None) or "local"
    if stream is None:
        try:
            channel = conn.exec_channel(bundle.launch_command(mode))
        except Exception as exc:
            if isinstance(exc, MirrorError):
                raise
            raise MirrorError(f"host {host}: cannot start the mirror agent: {exc}") from exc
        stream = ChannelStream(channel)
    service = LocalFileService(roots=roots, exports=exports)
    link = LocalLink(stream, service, options, host=host)
    try:
        link.handshake(bundle)
    except BaseException:
        link.close()
        raise
    return link


# ---------------------------------------------------------------------------
# remote-runner exec
# ---------------------------------------------------------------------------
@dataclass
class ExecResult:
    """What ``exec`` ended with."""

    status: int
    link_lost: bool = False
    message: str = ""


class _OutputWriter:
    """Write command output to local fds in order, off the reader thread."""

    def __init__(self) -> None:
        self.queue: "queue.Queue[Optional[Tuple[int, bytes]]]" = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="mirror-output")
        self.thread.start()

    def put(self, fd: int, data: bytes) -> None:
        self.queue.put((fd, data))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            fd, data = item
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                continue

    def finish(self, timeout: float = 30.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)


def run_command(conn: Any, argv: Sequence[str], *, cwd: Optional[str] = None,
                options: Optional[MirrorOptions] = None, stream: Any = None,
                stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2) -> ExecResult:
    """Run *argv* on the host inside the mirror; return its status (254 when the link failed)."""
    options = options or MirrorOptions()
    cwd = cwd or os.getcwd()
    tty = os.isatty(stdin_fd) and os.isatty(stdout_fd)
    roots = None
    fields: Dict[str, Any] = {}
    deny = connection_secrets(conn)
    if options.files_only:
        roots = options.exports if options.exports is not None else files_only_exports(argv, cwd)
        fields["files_only"] = True
        fields["exports"] = [P.name_to_wire(r) for r in roots]
        exports = Exports.only(roots, options.read_only, deny)
    else:
        exports = Exports.for_commands([(argv, cwd)], options.export, options.read_only, deny)
    link = open_agent(conn, "exec", options, roots=roots, stream=stream, exports=exports)
    done = threading.Event()
    result: Dict[str, Any] = {}
    output = _OutputWriter()

    def on_exit(header: Dict[str, Any], _: bytes) -> None:
        result["status"] = int(header.get("status", 255))
        done.set()

    def on_fail(header: Dict[str, Any], _: bytes) -> None:
        result["fail"] = str(header.get("msg") or "the mirror agent failed")
        done.set()

    link.handlers[P.STDOUT] = lambda h, p: output.put(stdout_fd, p)
    link.handlers[P.STDERR] = lambda h, p: output.put(stderr_fd, p)
    link.handlers[P.EXIT] = on_exit
    link.handlers[P.FAIL] = on_fail
    link.handlers[P.READY] = lambda h, p: LOG.debug("command started as pid %s", h.get("pid"))
    rows, cols = _winsize(stdout_fd) if tty else (24, 80)
    fields.update({
        "argv": [P.name_to_wire(os.fsencode(a)) for a in argv],
        "cwd": P.name_to_wire(os.fsencode(cwd)),
        "env": filtered_environment(options.forward_env),
        "umask": current_umask(), "tty": tty, "rows": rows, "cols": cols,
    })
    profile = None
    if options.file_cache:
        profile = CommandProfile.for_command(fields["argv"], options.files_only)
        link.service.seed = profile.load()
    link.boot(fields)
    link.start()
    restore = _enter_raw_mode(stdin_fd) if tty else None
    old_handlers = _install_signal_forwarding(link, stdout_fd if tty else None)
    threading.Thread(target=_pump_stdin, args=(link, stdin_fd), daemon=True, name="mirror-stdin").start()
    try:
        while not done.wait(0.2):
            if link.lost.is_set():
                # Frames already read may still hold the exit status.
                done.wait(0.5)
                break
    finally:
        _restore_signals(old_handlers)
        if restore is not None:
            restore()
    output.finish()
    link.close()
    if profile is not None and "status" in result:
        _save_profile(profile, link.service)
    if "status" in result:
        return ExecResult(status=result["status"])
    if "fail" in result:
        return ExecResult(status=EXIT_LINK, message=f"host {link.host}: {result['fail']}")
    return ExecResult(status=EXIT_LINK, link_lost=True,
                      message=f"host {link.host}: the link to the mirror agent was lost "
                              f"({link.lost_reason}); the remote command was stopped")


def _save_profile(profile: CommandProfile, service: LocalFileService) -> None:
    """Keep what the session looked up and sent whole, for the next start on any host."""
    names, files = service.looked_up, service.sent_whole
    # Files the host already had (served from its copies without asking) were
    # not sent this time: keep those of the last profile that were looked up again.
    kept = [f for f in profile.load()[1] if f in names and f not in files]
    try:
        profile.save(list(names), list(files) + kept)
    except OSError as exc:
        LOG.debug("mirror: profile %s not saved: %s", profile.path, exc)


def _winsize(fd: int) -> Tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
        return size.lines, size.columns
    except OSError:
        return 24, 80


def _enter_raw_mode(fd: int) -> Optional[Callable[[], None]]:
    import termios
    import tty as ttymod
    try:
        saved = termios.tcgetattr(fd)
        ttymod.setraw(fd)
    except termios.error:
        return None
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _pump_stdin(link: LocalLink, fd: int) -> None:
    while not link.lost.is_set():
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        link.send({"t": P.STDIN}, data)
        if not data:
            return


def _install_signal_forwarding(link: LocalLink, tty_fd: Optional[int]) -> Dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    old: Dict[int, Any] = {}

    def forward(signum: int, _frame: Any) -> None:
        link.send({"t": P.SIGNAL, "n": signum})

    for name in FORWARDED_SIGNALS:
        signum = getattr(signal, name)
        old[signum] = signal.signal(signum, forward)
    if tty_fd is not None:
        def winch(_signum: int, _frame: Any) -> None:
            rows, cols = _winsize(tty_fd)
            link.send({"t": P.WINCH, "rows": rows, "cols": cols})
        old[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, winch)
    return old


def _restore_signals(old: Dict[int, Any]) -> None:
    for signum, handler in old.items():
        try:
            signal.signal(signum, handler)
        except (ValueError, TypeError):
            pass


# ---------------------------------------------------------------------------
# The runner's mirror: one daemon agent per host, many screen windows.
# ---------------------------------------------------------------------------
class MirrorServer:
    """Serve the local file system to one host for as long as the runner keeps it.

    ``MirrorServer(conn).start()`` ships and starts the agent as a daemon on
    the host (private 0700 socket directory, no TCP); :meth:`window_argv`
    registers a command and returns the argv a screen window must run (it
    exits with the command's status, 254 if the mirror went away);
    :meth:`close` ends the mirror and every command still running in it.
    """

    def __init__(self, conn: Any, options: Optional[MirrorOptions] = None, *, stream: Any = None,
                 commands: Sequence[Tuple[Sequence[str], str]] = ()) -> None:
        self.conn = conn
        self.options = options or MirrorOptions()
        #: (argv, local cwd) of the commands it will run: what it serves follows from them.
        self.commands = list(commands) or [((), os.getcwd())]
        self._stream = stream
        self.link: Optional[LocalLink] = None
        self.socket_path = ""
        self.agent_path = ""
        self.python = "python3"
        #: The agent's pid on the host (for diagnostics).
        self.agent_pid = 0
        self._ready = threading.Event()
        self._fail = ""

    def start(self, timeout: float = START_TIMEOUT) -> "MirrorServer":
        """Start the agent and wait until its mirror is mounted."""
        exports = Exports.for_commands(self.commands, self.options.export, self.options.read_only,
                                       connection_secrets(self.conn))
        link = open_agent(self.conn, "daemon", self.options, stream=self._stream, exports=exports)
        self.link = link
        self.agent_path = str(link.hello.get("agent") or "")
        self.python = str(link.hello.get("executable") or "python3")

        def on_ready(header: Dict[str, Any], _: bytes) -> None:
            self.socket_path = str(header.get("socket") or "")
            self.agent_pid = int(header.get("pid") or 0)
            self._ready.set()

        def on_fail(header: Dict[str, Any], _: bytes) -> None:
            self._fail = str(header.get("msg") or "the mirror agent failed")
            self._ready.set()

        link.handlers[P.READY] = on_ready
        link.handlers[P.FAIL] = on_fail
        link.boot({"argv": [], "cwd": P.name_to_wire(os.fsencode(os.getcwd()))})
        link.start()
        end = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if link.lost.is_set() or time.monotonic() > end:
                break
        if self._fail or not self.socket_path:
            reason = self._fail or link.lost_reason or "timed out"
            link.close()
            raise MirrorError(f"host {link.host}: the mirror did not start: {reason}")
        return self

    @property
    def alive(self) -> bool:
        """Return whether the link to the agent is up."""
        return self.link is not None and not self.link.lost.is_set()

    def window_argv(self, spec_argv: Sequence[str], cwd: Optional[str] = None,
                    env: Optional[Mapping[str, str]] = None) -> List[str]:
        """Register a command to run in the mirror; return the argv the screen window runs."""
        if self.link is None or not self.alive:
            raise MirrorError("the mirror is not running (call start() first, or the link was lost)")
        job = uuid.uuid4().hex
        self.link.send({
            "t": P.JOB, "job": job,
            "argv": [P.name_to_wire(os.fsencode(a)) for a in spec_argv],
            "cwd": P.name_to_wire(os.fsencode(cwd or os.getcwd())),
            "env": filtered_environment(self.options.forward_env, extra=env),
            "umask": current_umask(),
        })
        return build_bundle().run_argv(self.python, self.agent_path, "attach", "--socket",
                                       self.socket_path, "--job", job)

    def close(self) -> None:
        """End the mirror on the host (commands still in it are killed)."""
        if self.link is not None:
            self.link.close()

    def __enter__(self) -> "MirrorServer":
        return self.start() if self.link is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
