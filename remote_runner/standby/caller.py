"""The caller's side: hand this process's command to a standby, pass its signals on, end as it ended.

Why apart: this runs in every command before anything else is imported (it
must stay cheap: the standard library's smallest modules), and it decides, for
each command, whether a standby may run it at all (:func:`wanted`).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import List, Optional, Sequence

from .names import (ENV, KEY_ENV, directory, fingerprint, idle_seconds, private_directory,
                    search_path, socket_path, usable_path)
from .wire import STDIO, receive, same_user, send

#: Entry points a standby can run: name -> (module, function taking argv without argv[0]).
ENTRIES = {"classic": ("remote_runner.cli.classic", "main"), "tool": ("remote_runner.cli", "main")}

#: ``remote-runner`` subcommands served by a standby (and ``exec`` when stdin is not a terminal;
#: ``attach`` needs this terminal, ``lab`` sets up hosts as root once).
TOOL_COMMANDS = frozenset({"run", "status", "logs", "stop", "restart", "fetch", "clean"})

#: Arguments that need this process's terminal: never served by a standby.
NEEDS_TERMINAL = frozenset({"--ask-pass"})

#: Signals the caller passes on to the child (the terminal sends them to the caller only).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
#: Besides the imports' own (:data:`.names.KEY_ENV`) and the interpreter's (``PYTHON*``: its
#: flags are part of the socket's name), the environment a standby is started with.
STANDBY_ENV = ("PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "XDG_RUNTIME_DIR", ENV,
               "REMOTE_RUNNER_STANDBY_DIR")
#: How long a caller waits for a standby to take its command before running it in-process.
TAKE_TIMEOUT = 5.0


def wanted(entry: str, argv: Sequence[str]) -> bool:
    """Whether *argv* (without the program name) may be served by a standby at all."""
    if idle_seconds() is None or entry not in ENTRIES or not usable_path():
        return False
    if any(arg.split("=", 1)[0] in NEEDS_TERMINAL for arg in argv):
        return False
    if entry == "tool":
        if argv and argv[0] == "exec":  # an interactive command keeps its terminal here
            return not os.isatty(0)
        return bool(argv) and argv[0] in TOOL_COMMANDS
    return True


def stdio_spec() -> dict:
    """How this process's stdin, stdout and stderr read and write text: encoding, errors, line
    buffering and write-through (``python -u`` or ``PYTHONUNBUFFERED`` make the last true)."""
    spec = {}
    for name in ("stdin", "stdout", "stderr"):
        stream = getattr(sys, name, None)
        spec[name] = [getattr(stream, "encoding", None) or "utf-8",
                      getattr(stream, "errors", None) or "strict",
                      bool(getattr(stream, "line_buffering", False)),
                      bool(getattr(stream, "write_through", False))]
    return spec


def ignored_signals() -> List[int]:
    """The forwarded signals this process ignores (``nohup``, a shell's ``&`` job): the child
    ignores them too, and nothing passes them on."""
    return [int(s) for s in FORWARDED if signal.getsignal(s) == signal.SIG_IGN]


def _stdio_open() -> bool:
    """Whether descriptors 0, 1 and 2 are open: else the socket made next would take one of them
    and be handed to the child as its stdin (a command started with ``<&-`` hung)."""
    try:
        for fd in STDIO:
            os.fstat(fd)
    except OSError:
        return False
    return True


def run_in_standby(entry: str, argv: Sequence[str]) -> Optional[int]:
    """Run the command *argv* (with the program name) in a standby; its exit status.

    None: no standby took it, and nothing of it has run: run it in this process
    (and call :func:`start_standby` after).
    """
    args = list(argv[1:])
    if not wanted(entry, args):
        return None
    folder = directory()
    path = socket_path(folder, fingerprint())
    if len(path.encode()) > 100 or not private_directory(folder, create=False) \
            or not _stdio_open():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = -1
    try:
        sock.settimeout(TAKE_TIMEOUT)
        sock.connect(path)
        if not same_user(sock):  # (the directory was checked by its path, before the connect)
            raise OSError("the standby's socket is not this user's")
        # a child of the standby says it is there before anything of ours goes: descriptors
        # sent to a standby that is stopped or stuck stay open in its socket's queue (a
        # pipeline reading our stdout would wait for them long after we ran in-process)
        if not receive(sock).get("ready"):
            raise ValueError("the standby did not say it is ready")
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        ignored = ignored_signals()
        send(sock, {"entry": entry, "argv": list(argv), "env": dict(os.environ), "umask": _umask(),
                     "stdio": stdio_spec(), "ignored": ignored}, fds=(*STDIO, cwd))
        child = int(receive(sock)["pid"])
        forwarder = Forwarder(child, ignored)  # from here on, a signal for us is one for the command
        forwarder.install()
        try:
            send(sock, {"go": True})
        except OSError:
            forwarder.restore()
            raise
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        sock.close()
        return None
    finally:
        if cwd >= 0:
            os.close(cwd)
    return follow(sock, forwarder)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Forwarder:
    """Passes the signals this caller gets (a terminal sends them to the caller only) to the child
    that runs its command; Ctrl-Z stops both and ``fg``/``bg`` resume both."""

    def __init__(self, child: int, ignored: Sequence[int] = ()) -> None:
        self.child = child
        self.forwarded: List[int] = []
        #: Signals this caller ignores: they stay ignored here (and in the child), not passed on.
        self.ignored = frozenset(ignored)

    def install(self) -> None:
        for signum in FORWARDED:
            if signum not in self.ignored:
                signal.signal(signum, self._forward)
        signal.signal(signal.SIGTSTP, self._suspend)

    def restore(self) -> None:
        for signum in (*FORWARDED, signal.SIGTSTP):
            if signum not in self.ignored:
                signal.signal(signum, signal.SIG_DFL)

    def _kill(self, signum: int) -> None:
        try:
            os.kill(self.child, signum)
        except OSError:
            pass

    def _forward(self, signum: int, _frame: object) -> None:
        self.forwarded.append(signum)
        self._kill(signum)

    def _suspend(self, _signum: int, _frame: object) -> None:
        self._kill(signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stopped here until SIGCONT
        signal.signal(signal.SIGTSTP, self._suspend)
        self._kill(signal.SIGCONT)


def follow(sock: socket.socket, forwarder: Forwarder) -> int:
    """Wait for the child's exit status, forwarding signals; end as it ended."""
    sock.settimeout(None)
    try:
        status = int(receive(sock)["exit"])
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        status = None
    finally:
        sock.close()
        forwarder.restore()
    if status is not None:
        return status
    if forwarder.forwarded:  # it died of a signal we passed on: die of it too, as it would have here
        os.kill(os.getpid(), forwarder.forwarded[-1])
    sys.stderr.write("ERROR: the standby process that ran this command ended without an exit "
                     f"status (pid {forwarder.child}); run it again with {ENV}=0 to run it "
                     "in-process\n")
    return 1


def start_standby() -> None:
    """Start a standby in the background for the next command (nothing when turned off; one that
    finds another holding the same name exits at once, see :func:`.server.serve`)."""
    idle = idle_seconds()
    if idle is None or not usable_path():
        return
    folder = directory()
    if not private_directory(folder, create=True):
        return
    key = fingerprint()
    if len(socket_path(folder, key).encode()) > 100:
        return
    import subprocess
    code = ("import sys; sys.path[:] = %r; from remote_runner.standby.server import serve; "
            "serve(%r, %r, %r)" % (search_path(), folder, key, idle))
    # only what its imports read: a password in this command's environment must not live on in
    # the standby's (each command's own environment reaches the child that runs it)
    env = {k: v for k, v in os.environ.items()
           if k in KEY_ENV or k in STANDBY_ENV or k.startswith(("PYTHON", "LC_"))}
    try:
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                         start_new_session=True, close_fds=True, env=env)
    except OSError:
        pass
