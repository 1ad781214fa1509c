"""Console output of a run: upload progress and the final summary lines.

On a terminal, uploads show one rich progress bar per host (fed from the SFTP
callbacks, which arrive on worker threads; rich's Progress is thread-safe).
Anywhere else, nothing but ``LEVEL: message`` log lines are written, because
scripts grep them. The summary is plain log lines in both cases.

Whether to draw at all is one rule, :func:`progress_wanted`. SPAR's campaign
scripts record runs with ``script -c "remote_runner.py … -l WARNING" log.txt``:
``script`` gives the tool a terminal, so "is stderr a tty" alone would fill
the recorded log with cursor-movement escapes. A user who asked for WARNING
or less, a dumb terminal, ``NO_COLOR`` or ``--no-progress`` gets no display.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Dict, Iterator, Mapping, Optional, TextIO

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.runner import RunReport
    from remote_runner.sync import Progress

LOG = logging.getLogger(__name__)


def progress_wanted(log_level: str = "INFO", no_progress: bool = False,
                    environ: Optional[Mapping[str, str]] = None,
                    stream: Optional[TextIO] = None) -> bool:
    """Tell whether a live progress display may be drawn on *stream* (stderr by default).

    No display when the user asked for quiet (``-l WARNING`` or above), for
    none (``--no-progress``, a non-empty ``NO_COLOR``), when the terminal
    cannot take cursor movement (``TERM=dumb``), or when *stream* is not a
    terminal at all.
    """
    env = os.environ if environ is None else environ
    level = logging.getLevelName(str(log_level).upper())
    if no_progress or (isinstance(level, int) and level >= logging.WARNING):
        return False
    if env.get("NO_COLOR") or env.get("TERM", "") == "dumb":
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def upload_progress(enabled: Optional[bool] = None,
                    console: Any = None) -> Iterator[Optional["Progress"]]:
    """Yield a sync progress callback drawing rich bars on a terminal, else None."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TransferSpeedColumn)

    bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), console=console or Console(stderr=True), transient=True)
    tasks: Dict[str, int] = {}

    def advance(host: str, delta: int) -> None:
        if host not in tasks:
            tasks[host] = bars.add_task(f"{host}: uploading", total=None)
        bars.advance(tasks[host], delta)

    with bars:
        yield advance


def log_summary(report: "RunReport") -> None:
    """Log where each host's session is and how to attach to it."""
    for host, session in sorted(report.session.items()):
        LOG.info("%s: screen session %s (attach: ssh -t %s screen -r %s)", host, session, host,
                 session)
