"""Running commands in a mirror: ``exec`` (one command, stdio over the link) and ``daemon``/``attach``.

Why apart: the two ways a command meets its caller differ (frames on the
link vs. stdio handed over a UNIX socket with SCM_RIGHTS) but end the same
way: the command's status, 128+N for a signal, or 254 when the link is gone.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import protocol as P
from .command import Command, exit_code, kill_descendants, set_winsize
from .link import EXIT_LINK, Link
from .session import Session

LOG = logging.getLogger("remote_runner.mirror.agent")


def _pump(fd: int, send: Callable[[bytes], None]) -> None:
    """Copy from *fd* to *send* until EOF (EIO on a pty counts as EOF)."""
    while True:
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break
        send(data)


def run_exec(link: Link, boot: Dict[str, Any]) -> int:
    """Run one command in the mirror with its stdio carried over the link."""
    session = Session(link, boot)
    command: Optional[Command] = None
    # Input that arrives while the mirror is being mounted waits for the command.
    stdin_queue: "queue.Queue[Optional[bytes]]" = queue.Queue()
    early_signals: List[int] = []
    started: List[Command] = []
    lock = threading.Lock()

    def on_stdin(header: Dict[str, Any], payload: bytes) -> None:
        stdin_queue.put(payload if payload else None)

    def on_signal(header: Dict[str, Any], payload: bytes) -> None:
        with lock:
            if started:
                started[0].signal(int(header.get("n", signal.SIGTERM)))
            else:
                early_signals.append(int(header.get("n", signal.SIGTERM)))

    def on_winch(header: Dict[str, Any], payload: bytes) -> None:
        with lock:
            if started and started[0].master is not None:
                set_winsize(started[0].master, int(header["rows"]), int(header["cols"]))

    link.handlers[P.STDIN] = on_stdin
    link.handlers[P.SIGNAL] = on_signal
    link.handlers[P.WINCH] = on_winch
    try:
        session.setup()
        try:
            command = Command(boot, session.root, user=session.user, tmpdir=session.tmpdir)
        except OSError as exc:
            # Like a shell: 127 for a missing program, 126 when it cannot be run.
            name = P.name_from_wire(boot["argv"][0]) if boot.get("argv") else b"?"
            link.send({"t": P.STDERR}, b"remote-runner: %s: %s\n" % (name, (exc.strerror or str(exc)).encode()))
            status = 127 if exc.errno == errno.ENOENT else 126
            link.send({"t": P.EXIT, "status": status})
            return status
        cmd = command
        with lock:
            started.append(cmd)
            for signum in early_signals:
                cmd.signal(signum)
        in_fd = cmd.master if cmd.master is not None else cmd.proc.stdin.fileno()

        def feed_stdin() -> None:
            while True:
                data = stdin_queue.get()
                if data is None:
                    if cmd.master is None:
                        try:
                            cmd.proc.stdin.close()
                        except OSError:
                            pass
                    else:
                        try:
                            os.write(cmd.master, b"\x04")
                        except OSError:
                            pass
                    return
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(in_fd, view):]
                except OSError:
                    return

        threading.Thread(target=feed_stdin, daemon=True).start()
        pumps = []
        if cmd.master is not None:
            pumps.append((cmd.master, P.STDOUT))
        else:
            pumps.append((cmd.proc.stdout.fileno(), P.STDOUT))
            pumps.append((cmd.proc.stderr.fileno(), P.STDERR))
        threads = []
        for fd, kind in pumps:
            t = threading.Thread(target=_pump, args=(fd, lambda d, k=kind: link.send({"t": k}, d)),
                                 daemon=True)
            t.start()
            threads.append(t)
        link.send({"t": P.READY, "pid": cmd.proc.pid})

        while True:
            try:
                returncode = cmd.proc.wait(0.2)
                break
            except subprocess.TimeoutExpired:
                if link.lost.is_set():
                    LOG.warning("link lost (%s): killing the command", link.lost_reason)
                    cmd.kill_group()
                    kill_descendants()
                    cmd.proc.wait()
                    return EXIT_LINK
        cmd.kill_group()
        kill_descendants()
        for t in threads:
            t.join(5.0)
        status = exit_code(returncode)
        link.settle()  # changes sent without waiting are on the local disk before the end is told
        used = list(session.files.used_ahead) if session.files is not None else []
        link.send({"t": P.EXIT, "status": status, "stats": link.stats(), "used": used})
        return status
    except OSError as exc:
        LOG.debug("exec failed", exc_info=True)
        link.send({"t": P.FAIL, "msg": str(exc), "errno": exc.errno})
        if command is not None:
            command.kill_group()
        kill_descendants()
        return EXIT_LINK
    finally:
        session.teardown()


# -- daemon mode ---------------------------------------------------------------
def run_daemon(link: Link, boot: Dict[str, Any]) -> int:
    """Keep the mirror and run registered jobs for ``attach`` clients until the link ends."""
    session = Session(link, boot)
    jobs: Dict[str, Dict[str, Any]] = {}
    jobs_cond = threading.Condition()
    running: Dict[int, Command] = {}

    def on_job(header: Dict[str, Any], payload: bytes) -> None:
        with jobs_cond:
            jobs[str(header["job"])] = header
            jobs_cond.notify_all()

    link.handlers[P.JOB] = on_job
    try:
        session.setup()
    except OSError as exc:
        link.send({"t": P.FAIL, "msg": str(exc), "errno": exc.errno})
        session.teardown()
        return EXIT_LINK
    sock_dir = tempfile.mkdtemp(prefix="rr-mirror-sock-")
    os.chmod(sock_dir, 0o700)
    sock_path = os.path.join(sock_dir, "agent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(16)

    def serve_client(conn: socket.socket) -> None:
        command: Optional[Command] = None
        try:
            msg, fds = recv_fds(conn)
            request = json.loads(msg.decode("utf-8"))
            with jobs_cond:
                jobs_cond.wait_for(lambda: str(request.get("job")) in jobs or link.lost.is_set(), 30.0)
                spec = jobs.pop(str(request.get("job")), None)
            if spec is None or len(fds) != 3:
                conn.sendall(json.dumps({"error": "unknown job %r" % request.get("job")}).encode() + b"\n")
                return
            try:
                command = Command(spec, session.root, stdio=(fds[0], fds[1], fds[2]), user=session.user,
                                  tmpdir=session.tmpdir)
            except OSError as exc:
                conn.sendall(json.dumps({"error": str(exc), "status": 127}).encode() + b"\n")
                return
            finally:
                for fd in fds:
                    os.close(fd)
            running[command.proc.pid] = command
            conn.sendall(json.dumps({"pid": command.proc.pid}).encode() + b"\n")
            threading.Thread(target=_relay_signals, args=(conn, command), daemon=True).start()
            returncode = command.proc.wait()
            command.kill_group()
            if link.lost.is_set():
                reply = {"error": "link lost (%s): the mirror is gone, the command was stopped"
                         % link.lost_reason, "status": EXIT_LINK}
            else:
                link.settle()
                reply = {"status": exit_code(returncode)}
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except (OSError, ValueError) as exc:
            LOG.debug("attach client failed: %s", exc)
        finally:
            if command is not None:
                running.pop(command.proc.pid, None)
            conn.close()

    def accept_loop() -> None:
        while not link.lost.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve_client, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    link.send({"t": P.READY, "socket": sock_path, "pid": os.getpid()})
    link.lost.wait()
    LOG.debug("daemon ending: %s", link.lost_reason)
    server.close()
    for command in list(running.values()):
        command.kill_group()
    kill_descendants()
    shutil.rmtree(sock_dir, ignore_errors=True)
    session.teardown()
    return 0


def _relay_signals(conn: socket.socket, command: Command) -> None:
    buf = b""
    while True:
        try:
            data = conn.recv(4096)
        except OSError:
            return
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                command.signal(int(json.loads(line.decode("utf-8"))["sig"]))
            except (ValueError, KeyError, TypeError):
                continue


def recv_fds(conn: socket.socket, maxfds: int = 3) -> Tuple[bytes, List[int]]:
    """Receive one message line plus file descriptors (SCM_RIGHTS)."""
    fds = array.array("i")
    msg, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(maxfds * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
    return msg, list(fds)


def attach(sock_path: str, job: str) -> int:
    """Hand our stdio to the daemon, forward signals, exit with the command's status."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(sock_path)
        msg = json.dumps({"job": job}).encode("utf-8") + b"\n"
        conn.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    except OSError as exc:
        sys.stderr.write("remote-runner mirror: cannot reach the mirror agent at %s: %s\n" % (sock_path, exc))
        return EXIT_LINK

    def forward(signum: int, _frame: Any) -> None:
        try:
            conn.sendall(json.dumps({"sig": signum}).encode() + b"\n")
        except OSError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    buf = b""
    while True:
        try:
            data = conn.recv(4096)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            sys.stderr.write("remote-runner mirror: the mirror agent went away (link lost)\n")
            return EXIT_LINK
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            reply = json.loads(line.decode("utf-8"))
            if "error" in reply:
                sys.stderr.write("remote-runner mirror: %s\n" % reply["error"])
                return int(reply.get("status", EXIT_LINK))
            if "status" in reply:
                return int(reply["status"])
