"""``remote-runner status | logs | stop | restart | fetch | attach``: a run after it started.

Thin: each command loads the run record (the newest, or ``--run ID``), calls
:mod:`remote_runner.control` and prints. Exit codes: ``status`` 0 only when
every selected component is running or exited 0 (else 5); the others follow
the usual contract (2 usage, 3 host, 6 start).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional

from remote_runner.cli import EXIT_CODES_HELP
from remote_runner.cli.flags import seconds, seconds_or_zero
from remote_runner.errors import EXIT_COMPONENT, ConfigError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="ID", help="the run to act on (default: the newest)")
    parser.add_argument("-F", dest="ssh_config", metavar="FILE",
                        help="ssh_config to use instead of the one the run used")
    parser.add_argument("--ask-pass", action="store_true",
                        help="prompt for the SSH password ($REMOTE_RUNNER_PASSWORD works too)")
    parser.add_argument("-l", "--log-level", dest="log_level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register the lifecycle subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("status", help="one row per component of a run",
                       description="Show each component's state (running / exited N / killed by "
                                   "SIG / missing), uptime or end, last log line. Exit 0 only "
                                   "when every one is running or exited 0.",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt)
    _common(p)
    p.add_argument("components", nargs="*", metavar="COMPONENT", help="name or host/name")
    p.add_argument("--host", action="append", metavar="H", help="only components on host H")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--watch", action="store_true", help="on a terminal, refresh the table live")
    p.add_argument("--interval", type=seconds, default=2.0, metavar="S",
                   help="seconds between refreshes with --watch (default 2)")
    p.set_defaults(func=status_command)

    p = sub.add_parser("logs", help="print or follow component logs",
                       description="Print (or with -f follow) the logs of a run's components, "
                                   "each line prefixed 'host/name |'.",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt)
    _common(p)
    p.add_argument("components", nargs="*", metavar="COMPONENT")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, default=20, metavar="N",
                   help="lines per log to start with (default 20)")
    p.set_defaults(func=logs_command)

    p = sub.add_parser("stop", help="stop components of a run (process group TERM, then KILL)",
                       description="Stop the selected components (all by default): SIGTERM to "
                                   "each window's process group, SIGKILL after --grace, then quit "
                                   "screen sessions left without a live window.",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt)
    _common(p)
    p.add_argument("components", nargs="*", metavar="COMPONENT")
    p.add_argument("--host", action="append", metavar="H", help="only components on host H")
    p.add_argument("--grace", type=seconds, default=10.0, metavar="S",
                   help="seconds between SIGTERM and SIGKILL (default 10)")
    p.set_defaults(func=stop_command)

    p = sub.add_parser("restart", help="stop components, re-copy changed files, start them again",
                       description="Restart the named components in the run's screen session "
                                   "(others keep running): stop by process group, copy files "
                                   "whose size or SHA-1 changed, start with the run's health "
                                   "rules (exit 6 if one exits or is not ready).",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt)
    _common(p)
    p.add_argument("components", nargs="+", metavar="COMPONENT")
    p.add_argument("--grace", type=seconds, default=10.0, metavar="S",
                   help="seconds between SIGTERM and SIGKILL (default 10)")
    p.add_argument("--settle", type=seconds_or_zero, default=1.0, metavar="S",
                   help="alive this long counts as started, for components without ready "
                        "or a settle of their own (default 1)")
    p.set_defaults(func=restart_command)

    p = sub.add_parser("fetch", help="copy results and logs of a run to this machine",
                       description="Copy each component's `results` files (globs relative to "
                                   "its base_dir) and its screen log into <runs>/<run-id>/<host>/"
                                   "<name>/, skipping files already fetched unchanged.",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt)
    _common(p)
    p.add_argument("components", nargs="*", metavar="COMPONENT")
    p.add_argument("--host", action="append", metavar="H", help="only components on host H")
    p.set_defaults(func=fetch_command)

    p = sub.add_parser("clean", help="remove a finished run's temporary base_dirs and host files",
                       description="On every host of the run: remove the base directories the "
                                   "run created (base_dir = None) and its runs/<run-id> directory. "
                                   "Refused while one of its components runs. The record and "
                                   "fetched results on this machine stay.",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt)
    _common(p)
    p.set_defaults(func=clean_command)

    p = sub.add_parser("attach", help="attach this terminal to a component's screen window",
                       epilog=EXIT_CODES_HELP, formatter_class=fmt)
    _common(p)
    p.add_argument("component", metavar="COMPONENT")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the command instead of running it")
    p.set_defaults(func=attach_command)


def _record(args: argparse.Namespace):
    from remote_runner import runrecord
    return runrecord.load(args.run)


def _ssh(args: argparse.Namespace, record: Any):
    from remote_runner import control
    from remote_runner.ssh import resolve_password
    password = resolve_password(None, getattr(args, "ask_pass", False))
    return control.ssh_options_for(record, args.ssh_config, password)


def _fmt_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _ended(stamp: Optional[float]) -> str:
    """``ended HH:MM:SS`` for an end time a host reported (nothing for one no clock can show)."""
    import datetime
    if not stamp:
        return ""
    try:
        return datetime.datetime.fromtimestamp(stamp).strftime("ended %H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return ""


def status_table(record: Any, rows: List[Any]) -> Any:
    """Return a rich Table of *rows* (what a host sent is shown as plain text, no markup)."""
    from rich.table import Table
    from rich.text import Text
    from remote_runner.tails import clean_line
    table = Table(title=f"run {record.run_id}", title_justify="left", box=None, pad_edge=False)
    for column in ("HOST", "NAME", "STATE", "PID", "UP/ENDED", "LAST LOG LINE"):
        table.add_column(column, no_wrap=column != "LAST LOG LINE", overflow="ellipsis")
    for row in rows:
        when = _fmt_seconds(row.since) if row.since is not None else _ended(row.ended)
        style = "green" if row.state == "running" else ("" if row.healthy else "red")
        table.add_row(row.host, row.name, Text(row.state, style=style), str(row.pid or ""), when,
                      Text(clean_line(row.last_line)[:120]))
    return table


def status_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from remote_runner import control
    record = _record(args)
    ssh_options = _ssh(args, record)
    if args.watch:
        if not sys.stdout.isatty():
            raise ConfigError("--watch needs a terminal; use status --json in scripts",
                              field="--watch")
        return _watch(args, record, ssh_options)
    rows = control.status(record, ssh_options, args.components or None, args.host)
    if args.json:
        print(json.dumps({"run_id": record.run_id, "components": [r.to_json() for r in rows]},
                         indent=2))
    else:
        Console(highlight=False, width=max(100, _width())).print(status_table(record, rows))
    return 0 if all(r.healthy for r in rows) else EXIT_COMPONENT


def _width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 160


def _watch(args: argparse.Namespace, record: Any, ssh_options: Any) -> int:
    """Refresh the status table in place until Ctrl-C (one connection per host, kept)."""
    from rich.console import Console
    from rich.live import Live
    from remote_runner import control
    comps = record.select(args.components or None, args.host)
    rows: List[Any] = []
    with control.Hosts(record, ssh_options, {c.host for c in comps}) as hosts:
        with Live(console=Console(highlight=False), auto_refresh=False) as live:
            try:
                while True:
                    rows = control.status(record, ssh_options, args.components or None,
                                          args.host, hosts=hosts)
                    live.update(status_table(record, rows), refresh=True)
                    threading.Event().wait(max(0.2, args.interval))
            except KeyboardInterrupt:
                pass
    return 0 if rows and all(r.healthy for r in rows) else EXIT_COMPONENT


def _terminal_text(line: str) -> str:
    """*line* without control characters and escape sequences (tabs kept)."""
    from remote_runner.tails import strip_controls
    return strip_controls(line)


def logs_command(args: argparse.Namespace) -> int:
    from remote_runner import control
    record = _record(args)
    comps = record.select(args.components or None)
    width = max(len(c.label) for c in comps) if comps else 0
    lock = threading.Lock()

    # a host's log may carry terminal escapes (titles, clipboard writes): a terminal gets the
    # text only; a pipe or file gets the lines as they are
    shown: Callable[[str], str] = _terminal_text if sys.stdout.isatty() else str

    def emit(label: str, line: str) -> None:
        with lock:
            sys.stdout.write(f"{label.ljust(width)} | {shown(line)}\n")
            sys.stdout.flush()
    try:
        control.logs(record, _ssh(args, record), args.components or None, args.lines,
                     args.follow, emit)
    except KeyboardInterrupt:
        pass
    return 0


def stop_command(args: argparse.Namespace) -> int:
    import logging
    from remote_runner import control
    if args.grace <= 0:
        raise ConfigError("--grace must be a positive number of seconds", field="--grace")
    record = _record(args)
    found = control.stop(record, _ssh(args, record), args.components or None, args.host,
                         args.grace)
    log = logging.getLogger("remote_runner")
    for comp in record.select(args.components or None, args.host):
        outcome = found.get(comp.host)
        if outcome is not None and comp.stem in outcome.signalled:
            log.info("%s: stopped%s", comp.label,
                     " (needed SIGKILL)" if comp.stem in outcome.killed else "")
        else:
            log.info("%s: was not running", comp.label)
    return 0


def restart_command(args: argparse.Namespace) -> int:
    import logging
    from remote_runner import control
    if args.grace <= 0 or args.settle < 0:
        raise ConfigError("--grace must be positive and --settle 0 or more", field="--grace")
    record = _record(args)
    pids = control.restart(record, _ssh(args, record), args.components, args.grace, args.settle)
    for label, pid in pids.items():
        logging.getLogger("remote_runner").info("%s: restarted (pid %d)", label, pid)
    return 0


def fetch_command(args: argparse.Namespace) -> int:
    record = _record(args)
    fetch_and_report(record, _ssh(args, record), args.components or None, args.host)
    return 0


def fetch_and_report(record: Any, ssh_options: Any, names: Optional[List[str]] = None,
                     hosts: Optional[List[str]] = None) -> None:
    """Fetch with a progress bar on a terminal, then log what was copied per host."""
    import logging
    from remote_runner import control
    with download_progress() as progress:
        reports = control.fetch(record, ssh_options, names, hosts, progress)
    log = logging.getLogger("remote_runner")
    total = 0
    for host in sorted(reports):
        rep = reports[host]
        total += rep.bytes
        log.info("%s: fetched %d file%s (%d bytes), %d unchanged", host, len(rep.copied),
                 "" if len(rep.copied) == 1 else "s", rep.bytes, len(rep.unchanged))
    log.info("results of run %s in %s (%d bytes fetched)", record.run_id, record.directory, total)


@contextmanager
def download_progress() -> Iterator[Optional[Callable[[str, int], None]]]:
    """Yield a fetch progress callback drawing one bar with the running total (terminals only)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TransferSpeedColumn)

    bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), console=Console(stderr=True), transient=True)
    task = bars.add_task("fetching", total=None)
    with bars:
        yield lambda _host, delta: bars.advance(task, delta)


def clean_command(args: argparse.Namespace) -> int:
    import logging
    from remote_runner import control
    record = _record(args)
    removed = control.clean(record, _ssh(args, record))
    log = logging.getLogger("remote_runner")
    for host in sorted(removed):
        log.info("%s: removed %s", host, " ".join(removed[host]))
    if not removed:
        log.info("run %s left nothing to remove", record.run_id)
    return 0


def attach_command(args: argparse.Namespace) -> int:
    import shlex
    from remote_runner import control
    record = _record(args)
    comps = record.select([args.component])
    if len(comps) > 1:
        raise ConfigError(f"{args.component!r} names {len(comps)} components "
                          f"({', '.join(c.label for c in comps)}); say host/name",
                          field="COMPONENT")
    argv = control.attach_argv(record, comps[0])
    if args.print_only:
        print(shlex.join(argv))
        return 0
    sys.stdout.flush()
    os.execvp(argv[0], argv)
    return 1  # not reached
