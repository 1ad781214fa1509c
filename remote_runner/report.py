"""Console output of a run: upload progress and the final summary lines.

On a terminal, uploads show one rich progress bar per host (fed from the SFTP
callbacks, which arrive on worker threads; rich's Progress is thread-safe).
Anywhere else, nothing but ``LEVEL: message`` log lines are written, because
scripts grep them. The summary is plain log lines in both cases.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.runner import RunReport
    from remote_runner.sync import Progress

LOG = logging.getLogger(__name__)


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
