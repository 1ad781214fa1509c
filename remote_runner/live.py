"""The live view of a run on a terminal: one view per phase, collapsed to one line when done.

A run is a sequence of phases (connect, prepare, copy, start, wait, terminate). While a phase
runs, the bottom of the terminal shows what it is doing — hosts connected and failed, bytes
copied against the real total (known per host once its hashes were compared) with a row per
host when there are few, windows started per index, and, while waiting, a row per waited
component with its elapsed time and the last line of its log. When the phase ends, that view is
replaced by one line (``✔ copy  5 files, 36.0 KiB to 3 hosts, 2 unchanged  0.5 s``), so the
scrollback is a short history of the run instead of a wall of log lines; warnings and errors
print above the view as they happen.

The view is a :class:`~remote_runner.events.Reporter`: events arrive on worker threads and
only update state under a lock; rich's refresh thread renders that state.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from remote_runner import events as ev

MAX_HOST_ROWS = 8
MAX_WAIT_ROWS = 12
TITLES = {"connect": "connecting", "prepare": "preparing", "copy": "copying",
          "start": "starting", "wait": "waiting", "terminate": "terminating"}


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class LiveView:
    """Draw the current phase with rich.Live; print one line per finished phase."""

    def __init__(self, console: Any, refresh_per_second: float = 8.0) -> None:
        from rich.live import Live

        self.console = console
        self._lock = threading.Lock()
        self._phase: Optional[str] = None
        self._phase_began = time.monotonic()
        self._total = 0
        self._reset()
        self._live = Live(get_renderable=self._render, console=console, transient=True,
                          refresh_per_second=refresh_per_second, redirect_stderr=False,
                          redirect_stdout=False)

    def _reset(self) -> None:
        self.connected: List[str] = []
        self.failed: Dict[str, str] = {}
        self.planned: Dict[str, Tuple[int, int]] = {}
        self.sent: Dict[str, int] = {}
        self.copied: Dict[str, Tuple[int, int, int]] = {}
        self.started: Dict[Any, List[str]] = {}
        self.index: Any = None
        self.waiting: Dict[Tuple[str, str], float] = {}
        self.lines: Dict[Tuple[str, str], str] = {}
        self.ended: Dict[Tuple[str, str], str] = {}

    # -- context ---------------------------------------------------------------

    def __enter__(self) -> "LiveView":
        self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.stop()

    # -- events ----------------------------------------------------------------

    def emit(self, event: ev.Event) -> None:
        kind = event.kind
        key = (event.host or "", event.component or "")
        line = ""
        with self._lock:
            if kind == ev.KIND_PHASE_BEGIN:
                self._phase, self._total = event.phase, int(event.data.get("total", 0))
                self._phase_began = time.monotonic()
                self._reset()
            elif kind == ev.KIND_PHASE_END:
                line = self._summary(event)
                self._phase = None
            elif kind == ev.KIND_HOST_CONNECTED and event.host:
                self.connected.append(event.host)
            elif kind == ev.KIND_HOST_FAILED and event.host:
                self.failed[event.host] = str(event.data.get("error", ""))
            elif kind == ev.KIND_COPY_PLANNED and event.host:
                self.planned[event.host] = (int(event.data["files"]), int(event.data["bytes"]))
            elif kind == ev.KIND_COPY_PROGRESS and event.host:
                self.sent[event.host] = self.sent.get(event.host, 0) + int(event.data["bytes"])
            elif kind == ev.KIND_COPY_DONE and event.host:
                self.copied[event.host] = (int(event.data["copied"]),
                                           int(event.data["unchanged"]), int(event.data["bytes"]))
            elif kind == ev.KIND_COMPONENT_STARTED:
                index = event.data.get("start_index")
                self.index = index
                self.started.setdefault(index, []).append(f"{event.host}:{event.component}")
            elif kind == ev.KIND_COMPONENT_WAITING:
                self.waiting[key] = time.monotonic()
            elif kind == ev.KIND_COMPONENT_LOG:
                self.lines[key] = str(event.data.get("line", ""))
            elif kind == ev.KIND_COMPONENT_ENDED:
                status = event.data.get("status")
                self.ended[key] = (f"exit {status}" if status is not None
                                   else str(event.data.get("failure") or "ended"))
        if kind == ev.KIND_PHASE_END and line:
            ok = bool(event.data.get("ok"))
            mark = "[green]✔[/]" if ok else "[bold red]✘[/]"
            self.console.print(f"{mark} {line}", highlight=False)

    def _summary(self, event: ev.Event) -> str:
        """One line for a finished phase (called under the lock)."""
        name = event.phase or ""
        seconds = f"{float(event.data.get('seconds', 0.0)):.1f} s"
        if name == "connect":
            text = f"connect    {len(self.connected)}/{self._total} hosts"
            if self.failed:
                text += f", failed: {', '.join(sorted(self.failed))}"
        elif name == "prepare":
            text = f"prepare    {_plural(self._total, 'host')}"
        elif name == "copy":
            files = sum(c[0] for c in self.copied.values())
            same = sum(c[1] for c in self.copied.values())
            size = sum(c[2] for c in self.copied.values())
            text = (f"copy       {_plural(files, 'file')}, {_size(size)} to "
                    f"{_plural(len(self.copied), 'host')}, {same} unchanged")
        elif name == "start":
            count = sum(len(v) for v in self.started.values())
            text = (f"start      {count}/{self._total} components in "
                    f"{_plural(len(self.started), 'index')}".replace("indexs", "indexes"))
        elif name == "wait":
            if not self._total:
                return ""
            ends = ", ".join(f"{h}:{c} {how}" for (h, c), how in sorted(self.ended.items()))
            text = f"wait       {ends or 'nothing ended'}"
        elif name == "terminate":
            text = f"terminate  {_plural(self._total, 'component')}"
        else:
            text = name
        if not event.data.get("ok"):
            text += "  (failed)"
        return f"{text}  {seconds}"

    # -- drawing ---------------------------------------------------------------

    def _render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            phase = self._phase
            if phase is None:
                return Text("")
            elapsed = time.monotonic() - self._phase_began
            title = f"{TITLES.get(phase, phase)}  {elapsed:4.1f} s"
            parts: List[Any] = []
            if phase == "connect":
                detail = f"{len(self.connected)}/{self._total} hosts connected"
                if self.failed:
                    detail += f", {len(self.failed)} failed ({', '.join(sorted(self.failed))})"
                parts.append(Spinner("dots", text=Text(f"{title}  {detail}")))
            elif phase == "copy":
                total = sum(b for _f, b in self.planned.values())
                sent = sum(self.sent.values())
                files = sum(f for f, _b in self.planned.values())
                checking = self._total - len(self.planned)
                head = Table.grid(padding=(0, 1))
                head.add_row(Text(title), ProgressBar(total=max(total, 1), completed=min(sent, total),
                                                      width=30),
                             Text(f"{_size(sent)}/{_size(total)}, {_plural(files, 'file')}"
                                  + (f", {checking} host(s) comparing" if checking > 0 else "")))
                parts.append(head)
                if len(self.planned) <= MAX_HOST_ROWS:
                    rows = Table.grid(padding=(0, 2))
                    for host in sorted(self.planned):
                        nfiles, nbytes = self.planned[host]
                        state = "done" if host in self.copied else f"{_size(self.sent.get(host, 0))}/{_size(nbytes)}"
                        rows.add_row(Text(f"  {host}"), Text(_plural(nfiles, "file")), Text(state))
                    parts.append(rows)
            elif phase == "start":
                count = sum(len(v) for v in self.started.values())
                parts.append(Spinner("dots", text=Text(
                    f"{title}  {count}/{self._total} started" +
                    (f", index {self.index}" if self.index is not None else ""))))
            elif phase == "wait":
                parts.append(Spinner("dots", text=Text(f"{title}  {len(self.ended)}/"
                                                       f"{len(self.waiting)} ended")))
                rows = Table.grid(padding=(0, 2))
                now = time.monotonic()
                for key in sorted(self.waiting)[:MAX_WAIT_ROWS]:
                    host, name = key
                    state = self.ended.get(key) or f"{now - self.waiting[key]:.0f} s"
                    rows.add_row(Text(f"  {host}:{name}"), Text(state),
                                 Text(self.lines.get(key, ""), style="dim", overflow="ellipsis",
                                      no_wrap=True))
                if len(self.waiting) > MAX_WAIT_ROWS:
                    rows.add_row(Text(f"  … {len(self.waiting) - MAX_WAIT_ROWS} more"), Text(""),
                                 Text(""))
                parts.append(rows)
            else:
                parts.append(Spinner("dots", text=Text(title)))
            return Group(*parts)
