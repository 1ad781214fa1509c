"""A standby process with the runner already loaded, so a rerun starts at once.

Why: a rerun with nothing to copy is a fixed cost, and most of it was this
machine's Python before the first packet: ~25 ms for the interpreter and
90-120 ms importing the runner (paramiko and its crypto ~40 ms, our own modules
~40 ms) out of a ~0.35-0.45 s run against four hosts at 0 ms. Users rerun dozens
of times a day; every ``status``, ``logs`` and ``stop`` paid it too.

How (the idea of Mercurial's command server and Android's zygote): the first
command that finds no standby runs as usual and, once done, starts one in the
background. The standby imports the runner, listens on a Unix socket in a
directory only this user can enter, and for every command forks a child that
takes over the caller's standard input, output and error (passed over the
socket), working directory (also passed as a descriptor), environment, umask
and arguments, runs the command exactly as the caller would have, and sends
back its exit status. The caller meanwhile forwards the signals it gets (Ctrl-C
is SIGINT to the caller) to the child, and ends as the child ended. The
standby exits after ``$REMOTE_RUNNER_STANDBY`` seconds without a command
(default 600).

What must hold, and how:

* Same code, same interpreter, same process: the socket's name is a digest of
  everything an import depends on (the interpreter, ``sys.path``, the package's
  files and the directories packages are installed in, the locale and Python
  variables) and of what a child inherits from the standby rather than from its
  caller (user, groups, root, namespaces, resource limits, priority, CPU
  affinity, control group). Change any of them and the next command
  finds no standby under that name, runs in-process and starts a fresh one; the
  old one idles out.
* Only this user: the directory is created 0700 and refused unless it is a real
  directory owned by this user with no group or other access; the standby
  checks each caller's uid (``SO_PEERCRED``) and serves its own uid only.
* Nothing runs twice, nothing half: until the child has said its pid and the
  caller has said "go", nothing has run, and any failure up to there runs the
  command in-process instead. A caller that disappears after that (killed)
  takes the run down with it (SIGTERM), as an in-process run would die.
* What needs this terminal runs in-process: ``--ask-pass`` (a prompt on
  ``/dev/tty``), ``attach``, ``lab``, and ``exec`` when its input is a terminal
  (an interactive program: raw mode, window size, job control stay here).

``REMOTE_RUNNER_STANDBY=0`` turns it off; a number sets the idle time in
seconds. ``REMOTE_RUNNER_STANDBY_DIR`` names the directory (default
``$XDG_RUNTIME_DIR/remote-runner``, else ``/tmp/remote-runner-UID``).
"""

from __future__ import annotations

import marshal
import os
import signal
import socket
import stat
import sys
import time
from typing import Dict, List, NoReturn, Optional, Sequence, Tuple

ENV = "REMOTE_RUNNER_STANDBY"
DIR_ENV = "REMOTE_RUNNER_STANDBY_DIR"
DEFAULT_IDLE = 600.0

#: Entry points a standby can run: name -> (module, function taking argv without argv[0]).
ENTRIES = {"classic": ("remote_runner.cli.classic", "main"), "tool": ("remote_runner.cli", "main")}

#: ``remote-runner`` subcommands served by a standby (and ``exec`` when stdin is not a terminal;
#: ``attach`` needs this terminal, ``lab`` sets up hosts as root once).
TOOL_COMMANDS = frozenset({"run", "status", "logs", "stop", "restart", "fetch", "clean"})

#: Arguments that need this process's terminal: never served by a standby.
NEEDS_TERMINAL = frozenset({"--ask-pass"})

#: Environment variables an import (or the interpreter's set-up) reads: part of the socket's name.
KEY_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONUTF8", "PYTHONIOENCODING",
           "PYTHONWARNINGS", "PYTHONHASHSEED", "LANG", "LC_ALL", "LC_CTYPE", "FUSE_LIBRARY_PATH")

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

_HEADER = 4  # bytes of a message's length, big-endian
_MAX_MESSAGE = 16 << 20
_STDIO = (0, 1, 2)
#: Signals the caller passes on to the child (the terminal sends them to the caller only).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
#: How often an idle standby checks whether its time is up or the code changed (seconds).
RECHECK = 30.0
#: How long a caller waits for a standby to take its command before running it in-process.
TAKE_TIMEOUT = 5.0


def idle_seconds(environ: Optional[Dict[str, str]] = None) -> Optional[float]:
    """The standby's idle time from ``$REMOTE_RUNNER_STANDBY`` (None: turned off)."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if value in ("", "1", "on", "yes", "true"):
        return DEFAULT_IDLE
    if value in ("0", "off", "no", "false"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def directory(environ: Optional[Dict[str, str]] = None) -> str:
    """Where the sockets live (not created here)."""
    env = os.environ if environ is None else environ
    if env.get(DIR_ENV):
        return env[DIR_ENV]
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "remote-runner")
    return f"/tmp/remote-runner-{os.getuid()}"


def private_directory(path: str, create: bool) -> bool:
    """True when *path* is a directory of ours nobody else can enter (made 0700 if *create*)."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def _package_files(root: str) -> List[Tuple[str, int, int]]:
    found = []
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                try:
                    st = os.stat(os.path.join(top, name))
                except OSError:
                    continue
                found.append((os.path.relpath(os.path.join(top, name), root), st.st_mtime_ns, st.st_size))
    return found


def _identity(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"


def _limits() -> list:
    """What the child inherits from the standby rather than from its caller: resource limits,
    priority, CPU affinity, control group. The standby had the caller's; the name keeps it so."""
    import resource
    found: list = [[name, resource.getrlimit(getattr(resource, name))]
                   for name in ("RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_STACK", "RLIMIT_AS",
                                "RLIMIT_CORE", "RLIMIT_DATA", "RLIMIT_CPU", "RLIMIT_FSIZE")
                   if hasattr(resource, name)]
    try:
        found.append(["nice", os.getpriority(os.PRIO_PROCESS, 0)])
        found.append(["cpus", sorted(os.sched_getaffinity(0))])
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/self/cgroup") as src:
            found.append(["cgroup", src.read()])
    except OSError:
        pass
    return found


def fingerprint(environ: Optional[Dict[str, str]] = None) -> str:
    """A digest of everything the standby's imports and set-up depend on (see the module's doc)."""
    env = os.environ if environ is None else environ
    package = os.path.dirname(os.path.abspath(__file__))  # remote_runner/
    namespaces = []
    for name in ("mnt", "pid", "user", "net"):
        try:
            namespaces.append(os.readlink(f"/proc/self/ns/{name}"))
        except OSError:
            namespaces.append("-")
    path = _search_path()
    parts = {
        "python": [sys.executable, sys.version, list(sys.flags)],
        "path": path,
        "installed": [_identity(p) for p in path],
        "package": [package, _package_files(package)],
        "env": {k: env.get(k) for k in KEY_ENV},
        "who": [os.getuid(), os.geteuid(), os.getgid(), sorted(os.getgroups())],
        "root": _identity("/"),
        "namespaces": namespaces,
        "limits": _limits(),
    }
    try:  # the built-in module: hashlib's OpenSSL binding takes ~2 ms to import, on every command
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:
        from hashlib import sha256
    return sha256(repr(sorted(parts.items())).encode()).hexdigest()[:20]


def socket_path(folder: str, key: str) -> str:
    return os.path.join(folder, f"standby-{key}.sock")


def _search_path() -> List[str]:
    """``sys.path`` with ``python -c``'s '' (the working directory) spelled out: a standby, which
    works in ``/``, must import from where this process does."""
    return [p or os.getcwd() for p in sys.path]


def _usable_path() -> bool:
    """Any other relative ``sys.path`` entry would import from another directory in the standby:
    such a set-up is never served."""
    return all(not p or os.path.isabs(p) for p in sys.path)


# -- the caller's side ----------------------------------------------------------------------------

def wanted(entry: str, argv: Sequence[str]) -> bool:
    """Whether *argv* (without the program name) may be served by a standby at all."""
    if idle_seconds() is None or entry not in ENTRIES or not _usable_path():
        return False
    if any(arg.split("=", 1)[0] in NEEDS_TERMINAL for arg in argv):
        return False
    if entry == "tool":
        if argv and argv[0] == "exec":  # an interactive command keeps its terminal here
            return not os.isatty(0)
        return bool(argv) and argv[0] in TOOL_COMMANDS
    return True


# Messages are marshal'd dicts of plain values behind their length: both ends are the same
# interpreter (the socket's name says so) and the same user (the standby checks), and marshal is
# built in, where json costs every command its import.

def _send(sock: socket.socket, payload: dict, fds: Sequence[int] = ()) -> None:
    data = marshal.dumps(payload)
    message = len(data).to_bytes(_HEADER, "big") + data
    if fds:
        sent = socket.send_fds(sock, [message], list(fds))
        message = message[sent:]
    if message:
        sock.sendall(message)


def _read_exact(sock: socket.socket, size: int, fds: Optional[List[int]] = None) -> bytes:
    chunks = []
    while size:
        if fds is not None:
            data, got, _flags, _addr = socket.recv_fds(sock, size, 8)
            fds.extend(got)
        else:
            data = sock.recv(size)
        if not data:
            raise EOFError("the other end closed the connection")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def _receive(sock: socket.socket, fds: Optional[List[int]] = None) -> dict:
    size = int.from_bytes(_read_exact(sock, _HEADER, fds), "big")
    if size > _MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes refused")
    message = marshal.loads(_read_exact(sock, size, fds))
    if not isinstance(message, dict):
        raise ValueError("not a message")
    return message


def _stdio_spec() -> dict:
    spec = {}
    for name in ("stdin", "stdout", "stderr"):
        stream = getattr(sys, name, None)
        spec[name] = [getattr(stream, "encoding", None) or "utf-8", getattr(stream, "errors", None) or "strict"]
    return spec


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
    if len(path.encode()) > 100 or not private_directory(folder, create=False):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = -1
    try:
        sock.settimeout(TAKE_TIMEOUT)
        sock.connect(path)
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        _send(sock, {"entry": entry, "argv": list(argv), "env": dict(os.environ), "umask": _umask(),
                     "stdio": _stdio_spec()}, fds=(*_STDIO, cwd))
        child = int(_receive(sock)["pid"])
        forwarder = _Forwarder(child)  # from here on, a signal for us is one for the command
        forwarder.install()
        try:
            _send(sock, {"go": True})
        except OSError:
            forwarder.restore()
            raise
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        sock.close()
        return None
    finally:
        if cwd >= 0:
            os.close(cwd)
    return _follow(sock, forwarder)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Forwarder:
    """Passes the signals this caller gets (a terminal sends them to the caller only) to the child
    that runs its command; Ctrl-Z stops both and ``fg``/``bg`` resume both."""

    def __init__(self, child: int) -> None:
        self.child = child
        self.forwarded: List[int] = []

    def install(self) -> None:
        for signum in FORWARDED:
            signal.signal(signum, self._forward)
        signal.signal(signal.SIGTSTP, self._suspend)

    def restore(self) -> None:
        for signum in (*FORWARDED, signal.SIGTSTP):
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


def _follow(sock: socket.socket, forwarder: _Forwarder) -> int:
    """Wait for the child's exit status, forwarding signals; end as it ended."""
    sock.settimeout(None)
    try:
        status = int(_receive(sock)["exit"])
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
    """Start a standby in the background for the next command (no-op when turned off or running)."""
    idle = idle_seconds()
    if idle is None or not _usable_path():
        return
    folder = directory()
    if not private_directory(folder, create=True):
        return
    key = fingerprint()
    if len(socket_path(folder, key).encode()) > 100:
        return
    import subprocess
    code = ("import sys; sys.path[:] = %r; from remote_runner.standby import serve; "
            "serve(%r, %r, %r)" % (_search_path(), folder, key, idle))
    try:
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                         start_new_session=True, close_fds=True)
    except OSError:
        pass


# -- the standby's side ---------------------------------------------------------------------------

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
        bound = _identity(path)
        last = time.monotonic()
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                if (time.monotonic() - last >= idle or fingerprint() != key
                        or _identity(path) != bound):
                    break  # idle long enough, the code changed or our socket went: nobody needs us
                continue
            except InterruptedError:
                continue
            last = time.monotonic()
            if not _same_user(conn) or os.fork() != 0:
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


def _stop(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)  # struct ucred: 3 ints
    return int.from_bytes(creds[4:8], sys.byteorder) == os.getuid()


def _child(conn: socket.socket) -> None:
    """Take over the caller's command: its descriptors, directory, environment; run; report; exit."""
    status = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        conn.settimeout(TAKE_TIMEOUT)
        fds: List[int] = []
        request = _receive(conn, fds)
        if len(fds) != 4:
            raise ValueError("expected the caller's stdin, stdout, stderr and directory")
        module, function = ENTRIES[request["entry"]]
        for target, fd in zip(_STDIO, fds):
            os.dup2(fd, target)
        os.fchdir(fds[3])
        for fd in fds:
            if fd not in _STDIO:
                os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        time.tzset()  # the C library read the standby's TZ
        import tempfile
        tempfile.tempdir = None  # and $TMPDIR is read again
        os.umask(int(request["umask"]))
        _reopen_stdio(request["stdio"])
        sys.argv = list(request["argv"])
        _send(conn, {"pid": os.getpid()})
        if not _receive(conn).get("go"):
            raise ValueError("the caller did not confirm")
        conn.settimeout(None)
    except Exception:  # noqa: BLE001 - nothing has run: the caller runs the command itself
        os._exit(1)
    _watch_caller(conn)
    try:
        import importlib
        from remote_runner.cli import wind_down
        status = getattr(importlib.import_module(module), function)(sys.argv[1:])
        status = 0 if status is None else int(status)
        wind_down()
    except SystemExit as done:  # argparse's usage errors and --help, as the interpreter ends them
        status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, int) and done.code is not None:
            sys.stderr.write(f"{done.code}\n")
    except BaseException as exc:  # noqa: BLE001 - as the interpreter would: traceback and status
        import traceback
        traceback.print_exc()
        status = 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: the status still goes back
            pass
        try:
            _send(conn, {"exit": status})
        except OSError:
            pass
        os._exit(status & 0xFF)


def _reopen_stdio(spec: dict) -> None:
    """New ``sys.stdin``/``stdout``/``stderr`` over the caller's descriptors, buffered as Python would."""
    def wrap(fd: int, name: str, mode: str):
        encoding, errors = spec.get(name, ["utf-8", "strict"])
        buffering = 1 if (name == "stderr" or (name == "stdout" and os.isatty(fd))) else -1
        try:
            return open(fd, mode, buffering=buffering, encoding=encoding, errors=errors, closefd=False)
        except (OSError, LookupError, ValueError):
            return open(fd, mode, buffering=buffering, closefd=False)

    sys.stdin = sys.__stdin__ = wrap(0, "stdin", "r")
    sys.stdout = sys.__stdout__ = wrap(1, "stdout", "w")
    sys.stderr = sys.__stderr__ = wrap(2, "stderr", "w")


def _watch_caller(conn: socket.socket) -> None:
    """End this run (SIGTERM) when the caller goes away, as it would have died with it."""
    import threading

    def watch() -> None:
        try:
            while conn.recv(64):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="standby-caller", daemon=True).start()



# -- process entry points ---------------------------------------------------------------------------

def launch(entry: str) -> NoReturn:
    """Be the command *entry* of this process: run in a standby when one takes it, else here (and
    start a standby for the next one). Imports nothing heavy before it knows which."""
    status = run_in_standby(entry, sys.argv)
    if status is not None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status & 0xFF)
    import importlib
    from remote_runner.cli import finish
    module, function = ENTRIES[entry]
    args = sys.argv[1:]
    status = getattr(importlib.import_module(module), function)(args)
    if wanted(entry, args):
        start_standby()
    finish(status)


def tool() -> NoReturn:
    """The ``remote-runner`` console script."""
    launch("tool")


def classic() -> NoReturn:
    """``remote_runner.py``."""
    launch("classic")
