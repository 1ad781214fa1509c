"""The standby's side: import the runner once, then fork a child per command that takes it over.

Why apart: this is the long-lived process. It must never run a command itself
(each runs in a fork, so one command's state never reaches the next), never
serve another user, and leave nothing behind when it goes: its socket, pid and
lock files are removed whether it idles out, sees its code change or is stopped
by its pid (SIGTERM).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import List

from .caller import ENTRIES, FORWARDED, TAKE_TIMEOUT
from .names import fingerprint, identity, private_directory, socket_path
from .wire import STDIO, receive, same_user, send

#: What the standby imports before it serves (what ``run``, ``status`` and the others load).
PRELOAD = ("remote_runner.cli", "remote_runner.cli.classic", "remote_runner.cli.lifecycle",
           "remote_runner.runner", "remote_runner.loader", "remote_runner.muddle", "remote_runner.plan",
           "remote_runner.recap", "remote_runner.runrecord", "remote_runner.console",
           "remote_runner.live", "remote_runner.control", "remote_runner.inventory",
           "remote_runner.failpolicy", "remote_runner.traffic", "remote_runner.yamlconfig",
           "remote_runner.python2.source", "paramiko", "yaml", "rich.console", "rich.live",
           "rich.table", "rich.text", "rich.progress", "rich.progress_bar", "rich.spinner",
           "remote_runner.cli.exec_", "remote_runner.mirror.session", "concurrent.futures.thread",
           "json", "shlex", "subprocess", "tempfile")
#: How often an idle standby checks whether its time is up or the code changed (seconds).
RECHECK = 30.0


def serve(folder: str, key: str, idle: float) -> None:
    """Be the standby for *key* until *idle* seconds pass without a command (one per key)."""
    import fcntl
    import importlib

    if not private_directory(folder, create=False):
        return  # made by the caller: gone or changed since, nobody wants this standby
    try:
        lock = os.open(os.path.join(folder, f"standby-{key}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another standby holds this key (or the directory went away)
    if key != fingerprint():
        return  # the code or the set-up changed since the caller looked
    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - an optional module: the command imports it if it can
            pass
    path = socket_path(folder, key)
    pid_file = os.path.join(folder, f"standby-{key}.pid")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, _stop)  # stopped by its pid: leave no socket behind
    try:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        descriptor = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        os.close(descriptor)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_mask = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old_mask)
        listener.listen(16)
        listener.settimeout(min(idle, RECHECK))
        bound = identity(path)
        last = time.monotonic()
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                if (time.monotonic() - last >= idle or fingerprint() != key
                        or identity(path) != bound):
                    break  # idle long enough, the code changed or our socket went: nobody needs us
                continue
            except InterruptedError:
                continue
            last = time.monotonic()
            if not same_user(conn) or os.fork() != 0:
                conn.close()
                continue
            try:  # the child: never back into this loop (nor its clean-up of the standby's files)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                listener.close()
                os.close(lock)
                _child(conn)
            finally:
                os._exit(1)
    finally:  # the lock file last, still held (a standby that opened it meanwhile finds no
        # socket bound under it and exits at its first check; the next caller starts a new one)
        for leftover in (path, pid_file, os.path.join(folder, f"standby-{key}.lock")):
            try:
                os.unlink(leftover)
            except OSError:
                pass


def stop_all(folder: str) -> int:
    """Stop every standby of *folder* by the pid it wrote there (each then removes its files);
    return how many were told to. For a caller that gave its commands that folder."""
    told = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith("standby-") and name.endswith(".pid"):
            try:
                with open(os.path.join(folder, name)) as src:
                    os.kill(int(src.read()), signal.SIGTERM)
                told += 1
            except (OSError, ValueError):
                pass
    return told


def _stop(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _child(conn: socket.socket) -> None:
    """Take over the caller's command: its descriptors, directory, environment; run; report; exit."""
    status = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        conn.settimeout(TAKE_TIMEOUT)
        send(conn, {"ready": True})  # (the caller sends its descriptors only then)
        fds: List[int] = []
        request = receive(conn, fds)
        if len(fds) != 4:
            raise ValueError("expected the caller's stdin, stdout, stderr and directory")
        module, function = ENTRIES[request["entry"]]
        for target, fd in zip(STDIO, fds):
            os.dup2(fd, target)
        os.fchdir(fds[3])
        for fd in fds:
            if fd not in STDIO:
                os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        time.tzset()  # the C library read the standby's TZ
        import tempfile
        tempfile.tempdir = None  # and $TMPDIR is read again
        os.umask(int(request["umask"]))
        ignored = {int(s) for s in request.get("ignored", ())}  # (nohup's SIGHUP, a job's SIGINT)
        for signum in FORWARDED:  # the caller's, not those of whoever started the standby
            signal.signal(signum, signal.SIG_IGN if signum in ignored else
                          signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        _reopen_stdio(request["stdio"])
        sys.argv = list(request["argv"])
        send(conn, {"pid": os.getpid()})
        if not receive(conn).get("go"):
            raise ValueError("the caller did not confirm")
        conn.settimeout(None)
    except Exception:  # noqa: BLE001 - nothing has run: the caller runs the command itself
        os._exit(1)
    _watch_caller(conn, signal.SIGKILL if signal.SIGTERM in request.get("ignored", ()) else
                  signal.SIGTERM)
    try:
        import importlib
        from remote_runner.cli import wind_down
        status = getattr(importlib.import_module(module), function)(sys.argv[1:])
        status = 0 if status is None else int(status)
        try:
            wind_down()
        except BrokenPipeError:  # stdout's reader went away: quietly, as in-process (finish)
            from remote_runner.cli import stdout_gone
            from remote_runner.errors import EXIT_PIPE
            if stdout_gone():
                status = EXIT_PIPE
    except SystemExit as done:  # argparse's usage errors and --help, as the interpreter ends them
        status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, int) and done.code is not None:
            sys.stderr.write(f"{done.code}\n")
    except BaseException as exc:  # noqa: BLE001 - as the interpreter would: traceback and status
        import traceback
        traceback.print_exc()
        status = 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe: the status still goes back
                pass
        try:
            send(conn, {"exit": status})
        except OSError:
            pass
        os._exit(status & 0xFF)


def _reopen_stdio(spec: dict) -> None:
    """New ``sys.stdin``/``stdout``/``stderr`` over the caller's descriptors, as its own were: the
    same encoding and errors, line buffering and write-through (``python -u``: no buffer at all),
    and no newline translation."""
    import io

    def wrap(fd: int, name: str, mode: str):
        encoding, errors, *flushing = spec.get(name, ["utf-8", "strict"])
        line, through = flushing if len(flushing) == 2 else (name == "stderr" or os.isatty(fd), False)
        raw = io.FileIO(fd, mode, closefd=False)
        binary = raw if (mode == "w" and through) else (
            io.BufferedWriter(raw) if mode == "w" else io.BufferedReader(raw))
        try:
            return io.TextIOWrapper(binary, encoding=encoding, errors=errors, newline="\n",
                                    line_buffering=bool(line), write_through=bool(through))
        except LookupError:
            return io.TextIOWrapper(binary, newline="\n", line_buffering=bool(line),
                                    write_through=bool(through))

    sys.stdin = sys.__stdin__ = wrap(0, "stdin", "r")
    sys.stdout = sys.__stdout__ = wrap(1, "stdout", "w")
    sys.stderr = sys.__stderr__ = wrap(2, "stderr", "w")


def _watch_caller(conn: socket.socket, signum: int = signal.SIGTERM) -> None:
    """End this run (*signum*: SIGTERM, or SIGKILL where the caller ignored that) when the caller
    goes away, as it would have died with it."""
    import threading

    def watch() -> None:
        try:
            while conn.recv(64):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name="standby-caller", daemon=True).start()
