"""Host-side operations on a run's windows: health, status, stop, logs.

``run`` starts components; ``status``, ``logs``, ``stop`` and ``restart`` look
at them later from another process. They all read the same files, which the
launcher (:mod:`remote_runner.screen`) writes in the run's directory on the
host, so every question is answered by the same few shell scripts, kept here:

* ``<state>/runs/<run-id>/`` holds ``<stem>.pid``, ``<stem>.status`` and
  ``<stem>.log`` of each component; ``<state>/latest`` points at the newest
  run. Keying the files by run id means two runs never read each other's exit
  codes, and the previous run's logs survive a new run or a restart.
* **Health** after a start: a component is *started* when it is still alive
  after a settle time, or, when it declares ``ready``, once the check passes
  (``tcp:PORT`` listening on its host, ``log:REGEX`` in its log,
  ``file:PATH`` existing, relative to base_dir). One bounded script per host
  polls all of a wave's windows.
* **Status** reads pid, status, times and the last log line of each window.
* **Stop** signals each window's process group (TERM, then KILL after the
  grace), then quits sessions that have no live window left.
* **Logs** are ``tail`` on the hosts, one stream per host.

The session lock, which a run holds on each host while it runs, is
:mod:`remote_runner.sessionlock`.
"""

from __future__ import annotations

import math
import re
import shlex
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from remote_runner.config import parse_ready
from remote_runner.errors import ComponentUnhealthy
from remote_runner.runrecord import ComponentRecord, utc_now
from remote_runner.screen import Stopped, Window, _window_groups, nap_function
from remote_runner.screen import stop_windows as screen_stop_windows

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.shell import Shell

__all__ = ["ComponentRecord"]

#: Runs kept per session directory on a host; older run directories are removed.
KEEP_RUNS = 20
#: A log line longer than this (bytes) is passed on in pieces: followed logs hold no more.
MAX_LOG_LINE = 64 * 1024
#: How much of a failed component's log is shown.
TAIL_LINES = 20
_TAIL_MARK = "RR-TAIL"
_SCREEN_SIGNAL_RE = re.compile(r"^=== Command terminated with signal (\d+)")


def run_dir(state_dir: str, run_id: str) -> str:
    """Return the directory of run *run_id* under a session's state directory."""
    return f"{state_dir}/runs/{run_id}"


def prepare_run_script(state_dir_var: str, run_id: str) -> str:
    """Return shell text making the run directory, pointing ``latest`` at it, pruning old runs.

    *state_dir_var* is a shell expression for the (already created) state dir.
    Old runs are found by the shell's own glob, which lists them sorted (run ids
    sort by time): pruning costs one ``rm`` and no listing process, and a run
    with nothing to prune starts none (a run's first step is on every run's way).
    The old ones are rotated to the end of the positional parameters, then
    removed with one ``rm``: the only array a POSIX shell has.
    """
    q = shlex.quote(run_id)
    this = f"{state_dir_var}/runs/{q}"
    return (f'mkdir -p {this} || exit 3\n'
            f'ln -sfn runs/{q} {state_dir_var}/latest.tmp && '
            f'mv -fT {state_dir_var}/latest.tmp {state_dir_var}/latest 2>/dev/null || '
            f'{{ rm -f {state_dir_var}/latest; ln -s runs/{q} {state_dir_var}/latest; }}\n'
            f'set -- {state_dir_var}/runs/*\n'
            f'rr_n=$(($# - {KEEP_RUNS})); rr_m=0\n'
            'while [ $rr_n -gt 0 ]; do\n'
            f'  [ "$1" = {this} ] || {{ set -- "$@" "$1"; rr_m=$((rr_m + 1)); }}\n'
            '  shift; rr_n=$((rr_n - 1))\n'
            'done\n'
            'if [ $rr_m -gt 0 ]; then shift $(($# - rr_m)); rm -rf -- "$@"; fi\n')


# --------------------------------------------------------------------------- health

@dataclass(frozen=True)
class HealthCheck:
    """How one started window proves it is healthy."""

    window: Window
    base_dir: str
    ready: Optional[str]
    timeout: float
    may_exit: bool  # a wait=True component may end during the check (the wait reports it)
    settle: Optional[float] = None  # the component's own settle time; None: the run's

    def settle_time(self, default: float) -> float:
        """Return the seconds alive that make this window started (without ``ready``)."""
        return default if self.settle is None else self.settle


@dataclass
class Health:
    """The outcome of a health check for one window."""

    stem: str
    verdict: str  # READY, EXITED (allowed), DEAD, GONE, TIMEOUT; PENDING (not judged)
    status: Optional[int] = None
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict not in ("DEAD", "GONE", "TIMEOUT")


def _ready_test(check: HealthCheck) -> str:
    """Return a shell test that succeeds when *check*'s readiness condition holds."""
    parsed = parse_ready(check.ready)
    if parsed is None:
        return "false"
    kind, arg = parsed
    q = shlex.quote
    if kind == "tcp":
        port = f"{int(arg):04X}"
        return (f"grep -Eq '^ *[0-9]+: [0-9A-Fa-f:]+:{port} [0-9A-Fa-f:]+ 0A ' "
                "/proc/net/tcp /proc/net/tcp6 2>/dev/null")
    if kind == "log":
        return f"grep -Eq -- {q(arg)} {q(check.window.log_file)} 2>/dev/null"
    path = arg if arg.startswith("/") else f"{check.base_dir.rstrip('/')}/{arg}"
    return f"[ -e {q(path)} ]"


def health_script(checks: Sequence[HealthCheck], settle: float) -> str:
    """Return the script that waits until every window is healthy or one is not."""
    q = shlex.quote
    # the clock counts centiseconds (Linux's /proc/uptime; whole seconds elsewhere): a whole-
    # second clock would let a 1 s settle end after a few milliseconds at a second's boundary
    lines = ["rr_cs() { u=; { read -r u _ < /proc/uptime; } 2>/dev/null; case \"$u\" in",
             "  [1-9]*.[0-9][0-9]) cs=${u%.*}${u#*.};; *) cs=$(( $(date +%s) * 100 ));; esac; }",
             "rr_cs; t0=$cs", "pending=1", "failed=0", nap_function(100) + "rr_w=0"]
    for n, c in enumerate(checks):
        lines.append(f"v{n}=")
    lines.append("while [ $pending = 1 ] && [ $failed = 0 ]; do")
    lines.append("  rr_cs; el=$((cs - t0)); pending=0")
    for n, c in enumerate(checks):
        w = c.window
        ready = _ready_test(c)
        settle_cs = max(0, int(round(c.settle_time(settle) * 100)))
        timeout_cs = max(100, int(math.ceil(c.timeout * 100)))
        if c.may_exit:
            ended = f"v{n}=EXITED"
        else:  # exit 0 is a finished job, not a failed start
            ended = (f"rr_v=; {{ read -r rr_v < {q(w.status_file)}; }} 2>/dev/null; "
                     f"if [ \"$rr_v\" = 0 ]; then v{n}=EXITED; else v{n}=DEAD; fi")
        lines += [
            f'  if [ -z "$v{n}" ]; then',
            f"    if [ -s {q(w.status_file)} ]; then",
            f"      {ended}",
            f"    elif p=; {{ read -r p < {q(w.pid_file)}; }} 2>/dev/null; ! kill -0 \"$p\" "
            "2>/dev/null; then",
            f"      if [ -s {q(w.status_file)} ]; then pending=1; else v{n}=GONE; fi",
        ]
        if c.ready:
            lines += [f"    elif {ready}; then v{n}=READY",
                      f"    elif [ $el -ge {timeout_cs} ]; then v{n}=TIMEOUT"]
        else:
            lines.append(f"    elif [ $el -ge {settle_cs} ]; then v{n}=READY")
        lines += ["    else pending=1; fi",
                  f'    case "$v{n}" in DEAD|GONE|TIMEOUT) failed=1;; esac',
                  "  fi"]
    # short naps first: a program that exits at once has its status written within milliseconds
    lines.append("  [ $pending = 1 ] && [ $failed = 0 ] && rr_nap")
    lines.append("done")
    # screen writes window logs a moment after the program's output: let it catch up
    lines.append("[ $failed = 1 ] && { sleep 1 2>/dev/null; }")
    for n, c in enumerate(checks):
        w = c.window
        lines.append(f"s=; {{ read -r s < {q(w.status_file)}; }} 2>/dev/null; "
                     f'echo "HEALTH {w.stem} ${{v{n}:-PENDING}} $s"')
        lines.append(f'case "$v{n}" in DEAD|GONE|TIMEOUT) echo "{_TAIL_MARK} {w.stem}"; '
                     f"tail -n {TAIL_LINES} {q(w.log_file)} 2>/dev/null | tr -d '\\r'; "
                     f'echo; echo "{_TAIL_MARK}-END";; esac')
    return "\n".join(lines) + "\n"


def health_time(checks: Sequence[HealthCheck], settle: float) -> float:
    """Return the longest the health script of *checks* may take (seconds)."""
    return max([0.0] + [c.timeout if c.ready else c.settle_time(settle) for c in checks])


def check_health(shell: "Shell", checks: Sequence[HealthCheck], settle: float) -> Dict[str, Health]:
    """Run the health script for *checks* on one host; return stem -> :class:`Health`."""
    if not checks:
        return {}
    result = shell.script(health_script(checks, settle), timeout=health_time(checks, settle) + 60)
    return parse_health(result.stdout, checks)


def parse_health(stdout: str, checks: Sequence[HealthCheck]) -> Dict[str, Health]:
    """Return stem -> :class:`Health` from what :func:`health_script` printed."""
    out: Dict[str, Health] = {}
    tail_of: Optional[str] = None
    tail: List[str] = []
    for line in stdout.splitlines():
        if tail_of is not None:
            if line == f"{_TAIL_MARK}-END":
                out[tail_of].log_tail = "\n".join(tail).strip("\n")
                tail_of, tail = None, []
            else:
                tail.append(line)
            continue
        parts = line.split(" ")
        if parts[0] == "HEALTH" and len(parts) >= 3:
            status = parts[3] if len(parts) > 3 else ""
            out[parts[1]] = Health(parts[1], parts[2],
                                   int(status) if status.lstrip("-").isdigit() else None)
        elif parts[0] == _TAIL_MARK and len(parts) == 2 and parts[1] in out:
            tail_of = parts[1]
    for c in checks:
        out.setdefault(c.window.stem, Health(c.window.stem, "GONE"))
    return out


def judge(host: str, comps: Sequence["ComponentRecord"], health: Dict[str, Health]
          ) -> List[ComponentUnhealthy]:
    """Record each verdict in *comps* (state, exit status, end); return the failures.

    ``run`` and ``restart`` share it, so "started" means the same for both.
    """
    failures = []
    for comp in comps:
        verdict = health[comp.stem]
        if verdict.verdict == "EXITED" and verdict.status is not None:
            comp.exit_status = verdict.status  # a waited one: the wait step reports it
            comp.state, comp.ended = describe_status(verdict.status), utc_now()
            continue
        if verdict.ok:
            comp.state = "running"
            continue
        if verdict.verdict == "DEAD" and verdict.status is not None:
            comp.state, comp.exit_status = describe_status(verdict.status), verdict.status
            comp.ended = utc_now()
            reason = f"{comp.state} while starting" + (
                " (command not found)" if verdict.status == 127 else "")
        elif verdict.verdict == "TIMEOUT":
            comp.state = "not ready"
            reason = f"did not become ready ({comp.ready}) within {comp.ready_timeout:g} s"
        else:
            comp.state = "missing"
            reason = "ended while starting without recording an exit status"
        failures.append(ComponentUnhealthy(host, comp.name, reason, verdict.log_tail))
    return failures


# --------------------------------------------------------------------------- status

@dataclass
class WindowState:
    """What a host says about one window now."""

    stem: str
    pid: Optional[int]
    alive: bool
    status: Optional[int]
    started: Optional[int]  # host clock, seconds since the epoch
    ended: Optional[int]
    now: Optional[int]
    #: the last non-blank line the program wrote (screen's own lines left out)
    last_line: str = ""
    #: screen's "=== Command terminated ..." line of a dead window, if it wrote one
    zombie_line: str = ""

    @property
    def state(self) -> str:
        """``running``, ``exited N``, ``killed by SIGX`` or ``missing``."""
        if self.status is not None:
            return describe_status(self.status)
        if self.alive:
            return "running"
        # the launcher itself was killed; screen's zombie line may still say how
        match = _SCREEN_SIGNAL_RE.search(self.zombie_line)
        if match:
            return describe_status(128 + int(match.group(1)))
        return "missing"


def describe_status(status: int) -> str:
    """Return ``exited N`` or, for a shell's 128+N, ``killed by SIGNAME``."""
    if status > 128:
        try:
            return f"killed by {signal.Signals(status - 128).name}"
        except ValueError:
            pass
    return f"exited {status}"


def inspect(shell: "Shell", windows: Sequence[Window]) -> Dict[str, WindowState]:
    """Return stem -> :class:`WindowState` for *windows* (one command)."""
    q = shlex.quote
    parts = ['now=$(date +%s)']
    for w in windows:
        parts.append(
            f"p=$(cat {q(w.pid_file)} 2>/dev/null); a=0; "
            f"case $p in ''|*[!0-9]*) p=;; *) kill -0 \"$p\" 2>/dev/null && a=1;; esac; "
            f"s=$(cat {q(w.status_file)} 2>/dev/null); "
            f"t=$(stat -c %Y {q(w.pid_file)} 2>/dev/null); e=$(stat -c %Y {q(w.status_file)} "
            f"2>/dev/null); "
            f"l=$(tail -n 8 {q(w.log_file)} 2>/dev/null | tr -d '\\r' | grep -v '^[[:space:]]*$'); "
            "z=$(printf '%s\\n' \"$l\" | grep '^=== Command terminated' | tail -n 1); "
            "l=$(printf '%s\\n' \"$l\" | grep -v '^=== Command ' | tail -n 1); "
            f"printf 'W\\t%s\\t%s\\t%s\\t%s\\t%s\\t%s\\t%s\\t%s\\t%s\\n' {q(w.stem)} \"$p\" "
            f"\"$a\" \"$s\" \"$t\" \"$e\" \"$now\" \"$z\" \"$l\"")
    result = shell.script("\n".join(parts) + "\n", timeout=60)
    states: Dict[str, WindowState] = {}
    for line in result.stdout.splitlines():
        cols = line.split("\t", 9)
        if len(cols) == 10 and cols[0] == "W":
            states[cols[1]] = WindowState(cols[1], _int(cols[2]), cols[3] == "1", _int(cols[4]),
                                          _int(cols[5]), _int(cols[6]), _int(cols[7]), cols[9],
                                          zombie_line=cols[8])
    return states


def _int(text: str) -> Optional[int]:
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else None


# --------------------------------------------------------------------------- stop

def stop_windows(shell: "Shell", windows: Sequence[Window], grace: float,
                 sessions: Sequence[str] = ()) -> Stopped:
    """Stop *windows* by process group; quit those of *sessions* left with no live window."""
    return screen_stop_windows(shell, windows, grace, then=quit_empty_script(sessions))


def quit_empty_script(sessions: Sequence[str]) -> str:
    """Return shell text quitting each session of *sessions* that has no live window left."""
    out = []
    for sid in sessions:
        pid = sid.split(".", 1)[0]
        if not pid.isdigit():
            continue
        out.append(f"if [ -z \"$({_window_groups(pid)})\" ]; then "
                   f"screen -S {shlex.quote(sid)} -X quit >/dev/null 2>&1 && echo QUIT {sid}; fi")
    return "\n".join(out) + ("\n" if out else "")


# --------------------------------------------------------------------------- logs

def tail_command(windows: Sequence[Window], lines: int, follow: bool) -> str:
    """Return a shell command printing the last *lines* of each window's log with headers.

    ``tail -v`` puts a ``==> FILE <==`` header before each file's lines (and,
    following, before lines from a file other than the previous one).
    """
    files = " ".join(shlex.quote(w.log_file) for w in windows)
    follow_flag = "-F " if follow else ""
    return f"exec tail -v {follow_flag}-n {max(0, int(lines))} {files} 2>/dev/null"


class LogSplitter:
    """Turn ``tail -v`` output into (stem, line) pairs, carrying partial lines over."""

    HEADER = re.compile(r"^==> (.*) <==$")

    def __init__(self, windows: Sequence[Window]) -> None:
        self.by_file = {w.log_file: w.stem for w in windows}
        self.current: Optional[str] = None
        self.buffer = b""

    def feed(self, data: bytes) -> List[Tuple[str, str]]:
        """Return the complete lines in *data* (plus what was buffered)."""
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > MAX_LOG_LINE:  # a line without end (progress drawn with \r only)
            complete.append(self.buffer)
            self.buffer = b""
        out = []
        for raw in complete:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            match = self.HEADER.match(line)
            if match and match.group(1) in self.by_file:
                self.current = self.by_file[match.group(1)]
                continue
            if self.current is not None:
                out.append((self.current, line))
        return out


def read_logs(shell: "Shell", windows: Sequence[Window], lines: int) -> List[Tuple[str, str]]:
    """Return (stem, line) pairs: the last *lines* of each window's log."""
    result = shell.script(tail_command(windows, lines, False) + "\n", timeout=120)
    splitter = LogSplitter(windows)
    pairs = splitter.feed(result.stdout.encode("utf-8", "surrogateescape") + b"\n")
    # tail separates files by a blank line; drop the blank before each header
    return _drop_separators(pairs)


def _drop_separators(pairs: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    out: List[Tuple[str, str]] = []
    for i, (stem, line) in enumerate(pairs):
        if line == "" and (i + 1 == len(pairs) or pairs[i + 1][0] != stem):
            continue
        out.append((stem, line))
    return out
