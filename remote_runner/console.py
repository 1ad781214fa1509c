"""How a run talks to the person (or the script) that started it.

Two audiences, two forms, chosen once per run by :func:`choose`:

* **a person at a terminal** gets the live view (:mod:`remote_runner.live`): one view per phase
  that collapses into one line when the phase ends, then a recap table;
* **anything else** — a pipe, a CI log, ``--no-progress``, ``TERM=dumb``, ``NO_COLOR``, or a
  level of WARNING and above (``-q``) — gets plain ``HH:MM:SS LEVEL: host: message`` lines on
  stderr, one per event that matters, which ``grep`` and SPAR-era scripts (which looked for
  ``LEVEL: message``) can read, and the recap as plain text on stdout. The closing error of
  a failed run (the one that decides the exit status) stays ``ERROR: message`` without a
  timestamp, so ``grep '^ERROR:'`` finds exactly the reason.

Verbosity follows the convention of pyinfra and Ansible, keeping SPAR's ``-l LEVEL``: ``-q``
shows warnings and errors only, ``-qq`` errors only, ``-v`` adds DEBUG lines (each names the
host it concerns: see :class:`remote_runner.events.HostFilter`), ``-vv`` adds paramiko's own
protocol lines, which are otherwise not shown at all.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional, TextIO

from remote_runner.events import HostFilter
from remote_runner.secrets import MaskingFormatter

TIME_FORMAT = "%H:%M:%S"
PLAIN_FORMAT = "%(asctime)s %(levelname)s: %(message)s"


@dataclass(frozen=True)
class Output:
    """The output settings of one run."""

    level: int
    paramiko_debug: bool
    live: bool
    color: bool


def level_from(verbose: int = 0, quiet: int = 0, log_level: Optional[str] = None) -> int:
    """Return the log level: -v/-q win over -l, which defaults to INFO."""
    if verbose:
        return logging.DEBUG
    if quiet:
        return logging.WARNING if quiet == 1 else logging.ERROR
    return getattr(logging, (log_level or "INFO").upper(), logging.INFO)


def progress_wanted(log_level: Any = "INFO", no_progress: bool = False,
                    environ: Optional[Mapping[str, str]] = None,
                    stream: Optional[TextIO] = None) -> bool:
    """Tell whether a live display may be drawn on *stream* (stderr by default).

    One rule, because SPAR's campaign scripts record runs with
    ``script -c "remote_runner.py … -l WARNING" log.txt``: ``script`` gives the tool a
    terminal, so "is stderr a tty" alone would fill the recorded log with cursor movement.
    No display when the user asked for quiet (WARNING or above, ``-q``), for none
    (``--no-progress``, a non-empty ``NO_COLOR``), when the terminal cannot take cursor
    movement (``TERM=dumb``), or when *stream* is not a terminal at all.
    """
    env = os.environ if environ is None else environ
    level = log_level if isinstance(log_level, int) else logging.getLevelName(
        str(log_level).upper())
    if no_progress or (isinstance(level, int) and level >= logging.WARNING):
        return False
    if env.get("NO_COLOR") or env.get("TERM", "") == "dumb":
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def choose(verbose: int = 0, quiet: int = 0, log_level: Optional[str] = None,
           no_progress: bool = False, stream: Optional[TextIO] = None,
           environ: Optional[Mapping[str, str]] = None) -> Output:
    """Decide between the live view and plain lines (see the module docstring)."""
    env = os.environ if environ is None else environ
    level = level_from(verbose, quiet, log_level)
    live = progress_wanted(level, no_progress, env, stream)
    color = progress_wanted(logging.INFO, False, env, stream)
    return Output(level=level, paramiko_debug=verbose >= 2, live=live, color=color)


class PlainFormatter(MaskingFormatter):
    """``HH:MM:SS LEVEL: message``; the run's closing error stays ``ERROR: message``.

    Secrets (the SSH password) are masked in every line, as everywhere else.
    """

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT, TIME_FORMAT)
        self._bare = MaskingFormatter("%(levelname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "verdict", False):
            return self._bare.format(record)
        return super().format(record)


class ConsoleHandler(logging.Handler):
    """Write log lines through a rich Console, so they appear above a live view."""

    def __init__(self, console: Any) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            style = {logging.ERROR: "bold red", logging.WARNING: "yellow",
                     logging.DEBUG: "dim"}.get(record.levelno)
            self.console.print(self.format(record), markup=False, highlight=False,
                               style=style, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup(output: Output, console: Any = None, stream: Optional[TextIO] = None) -> None:
    """Install the one log handler of a run (plain lines, or through the live console)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if output.live and console is not None:
        handler = ConsoleHandler(console)
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(PlainFormatter())  # secrets as ***
    handler.addFilter(HostFilter())
    if not output.paramiko_debug:
        handler.addFilter(_no_paramiko)
    root.addHandler(handler)
    root.setLevel(output.level)


def _no_paramiko(record: logging.LogRecord) -> bool:
    """Drop paramiko's own records (shown at -vv only).

    We report every failure ourselves, naming the host and what to do; paramiko's lines
    (including tracebacks its transport thread logs after a failed handshake) would only
    repeat it in protocol terms. A filter on our handler, not a level on paramiko's
    logger, so a library caller's own handlers still see everything.
    """
    return not record.name.startswith("paramiko")
