"""The ``remote-runner`` command: a thin dispatcher over the library.

Subcommands live in their own modules (``classic`` for the SPAR-compatible
runner, ``lab`` for throwaway test hosts, ``exec`` for the mirror) and each
exposes ``add_parser(subparsers)``. This module owns the one place where a
:class:`~remote_runner.errors.RunnerError` becomes a message and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import signal
import sys
import threading
from typing import Callable, List, NoReturn, Optional

from remote_runner import __version__
from remote_runner.secrets import MaskingFormatter
from remote_runner.errors import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_PIPE, EXIT_TERMINATED,
                                  RunnerError)

LOG = logging.getLogger("remote_runner")

#: Subcommand modules, imported lazily so ``--help`` stays fast and a missing
#: optional system library (libfuse) only matters to the command that needs it.
SUBCOMMANDS = ("classic", "lifecycle", "lab", "exec_")

#: The module that registers each subcommand. Running one imports that module alone:
#: the others' imports (the runner's, ~80 ms) would delay every ``exec`` for nothing.
#: ``--help``, a misspelt command and anything else build the whole parser.
COMMAND_MODULES = {"run": "classic", "lab": "lab", "exec": "exec_",
                   **{name: "lifecycle" for name in ("status", "logs", "stop", "restart", "fetch",
                                                     "clean", "attach")}}

#: Marks the one closing error line: always ``ERROR: message``, without a timestamp, as
#: SPAR-era scripts and ``grep '^ERROR:'`` expect it.
VERDICT = {"verdict": True}

EXIT_CODES_HELP = """exit codes:
  0 success; 1 internal error; 2 usage/config error; 3 connection, host-key or
  auth error; 4 copy error; 5 a waited component failed; 6 start error;
  7 lab error; 8 partial run (unreachable hosts skipped within --max-fail);
  130 interrupted (Ctrl-C), 141 stdout's reader went away (| head), 143 terminated (SIGTERM);
  exec: the command's own status (128+N if killed by signal N), 254 if the tool or the link
  failed."""


def setup_logging(level: str = "INFO") -> None:
    """Log ``LEVEL: message`` lines on stderr, as SPAR's scripts expect (secrets masked)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(MaskingFormatter("%(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # paramiko is chatty ("Connected (version 2.0 ...)", tracebacks of its thread); keep it quiet
    # unless the user asked for DEBUG. A filter on our handler, not a level on
    # paramiko's logger, so other handlers (a library caller's) still see it all.
    if level.upper() != "DEBUG":
        handler.addFilter(_quiet_paramiko)


def _quiet_paramiko(record: logging.LogRecord) -> bool:
    """Drop paramiko's records: every failure is reported by us, naming the host and what to do
    (paramiko's own ERROR lines are tracebacks of its transport thread, in protocol terms)."""
    return not record.name.startswith("paramiko")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the command unwinds as it does for Ctrl-C (see :func:`end_on_sigterm`)."""


_terminated = threading.Event()


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    _terminated.set()
    raise Terminated()


def end_on_sigterm() -> None:
    """Make SIGTERM end a command the way Ctrl-C does, then exit 143.

    Why: ``kill PID``, a CI job's timeout, a supervisor or the standby's
    caller going away all send SIGTERM, and Python's default dies on the
    spot: a run serving mirrored components left its hosts' commands to find
    their link gone and its empty ``$TMPDIR`` mount point directory behind,
    and a copy in flight left its cleanup undone. Unwound like an interrupt,
    copies cancel and remove their temporary files, mirrors close (stopping
    the commands in them), locks are released. A SIGTERM the caller chose to
    ignore stays ignored; a second one ends the process at once.
    """
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def run_guarded(func: Callable[[], int]) -> int:
    """Run *func*, mapping our errors to their exit codes (SIGTERM ends it as Ctrl-C would)."""
    end_on_sigterm()
    verdict: Optional[object] = None
    try:
        code = func()
    except RunnerError as exc:
        code, verdict = exc.exit_code, exc
    except KeyboardInterrupt:
        code, verdict = EXIT_INTERRUPTED, "interrupted"
    except BrokenPipeError:
        if not stdout_gone():  # another pipe of ours: a bug, as any other exception
            LOG.exception("internal error (please report this with the traceback)", extra=VERDICT)
            return EXIT_INTERNAL
        return EXIT_PIPE
    except Exception:  # a bug of ours: say so, with the traceback
        LOG.exception("internal error (please report this with the traceback)", extra=VERDICT)
        return EXIT_INTERNAL
    if _terminated.is_set() and code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        code, verdict = EXIT_TERMINATED, "terminated (SIGTERM)"
    if verdict is not None:
        LOG.error("%s", verdict, extra=VERDICT)
    return code


def stdout_gone() -> bool:
    """Whether stdout's reader went away (``remote-runner … | head``): see :func:`park_stdout`."""
    return park_stdout() == "gone"


def _reader_gone() -> bool:
    """Whether descriptor 1 is a pipe or socket nobody reads any more (poll says POLLERR)."""
    import select
    try:
        poller = select.poll()
        poller.register(1, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def park_stdout() -> str:
    """Flush stdout; where that fails, or its reader went away, point descriptor 1 at
    /dev/null, where what is still buffered is dropped instead of being reported at exit as an
    exception. Returns "" (all is well), "gone" (its reader went away: a write failed with
    EPIPE) or "broken" (closed, or failing otherwise)."""
    try:
        sys.stdout.flush()
        kind = "gone" if _reader_gone() else ""
    except BrokenPipeError:
        kind = "gone"
    except (OSError, ValueError, AttributeError):
        kind = "broken"
    if not kind:
        return kind
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        if devnull != 1:  # (1 itself when it was closed: the lowest free number)
            os.dup2(devnull, 1)
            os.close(devnull)
    except OSError:
        pass
    return kind


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``remote-runner`` parser; with a known *command*, only that command's module's parsers."""
    parser = argparse.ArgumentParser(
        prog="remote-runner",
        description="Start and watch multi-host experiments over SSH.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"remote-runner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in (COMMAND_MODULES[command],) if command in COMMAND_MODULES else SUBCOMMANDS:
        if importlib.util.find_spec(f"remote_runner.cli.{name}") is not None:
            importlib.import_module(f"remote_runner.cli.{name}").add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    setup_logging(getattr(args, "log_level", "INFO") or "INFO")
    return run_guarded(lambda: args.func(args))


def finish(code: Optional[int]) -> NoReturn:
    """End this process with *code* once a command is done, without the interpreter's teardown.

    Why: freeing every object and module at exit took 20-50 ms of wall time
    here, after the command had finished (a rerun with nothing changed is
    ~0.4 s). What a normal exit does that matters is done first: threads that
    are not daemons and thread pools are waited for, atexit functions run
    (logging's flush among them), stdout and stderr are flushed. Anything
    unexpected there (a closed pipe on stdout, an interpreter without
    ``threading._shutdown``) falls back to a normal exit. Only for a
    process's entry point: a caller of :func:`main` in-process gets its status back.
    """
    status = 0 if code is None else int(code)
    try:
        wind_down()
    except BaseException:  # noqa: BLE001 - the normal exit then does (and reports) it
        if park_stdout() == "gone":  # its last output met a reader that went away (| head)
            os._exit(EXIT_PIPE)
        sys.exit(status)
    os._exit(status & 0xFF)


def wind_down() -> None:
    """What a normal exit does that matters, short of exiting: wait for the threads that are not
    daemons (and thread pools), run the atexit functions, flush stdout and stderr."""
    import atexit
    import threading
    threading._shutdown()  # what the interpreter's own exit calls first (none: a normal exit)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()


def entry() -> NoReturn:
    """The ``remote-runner`` console script of installs made before :func:`remote_runner.standby.tool`."""
    from remote_runner.standby import launch
    launch("tool")
