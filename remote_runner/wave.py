"""One start command per host per wave: replace the old session, open windows, confirm them.

Starting is what every run pays, and on a slow link every command is two or
three round trips before it does anything. So a *wave* (the components of one
``start_index`` on one host) is one shell command: it writes what the wave
needs (the launchers, on a host's first wave), replaces the previous session
or adopts it, opens every window of the wave with a single screen client —
the windows are a file of screen commands (:func:`windows_rc`), read by the
rc file of a new session or by one ``-X source`` — waits for each launcher's
pid file and runs the health check, printing one line per fact for
:func:`_wave_result` to check. Nothing in it is trusted blindly: the session
id must look like one, a missing pid is a window that did not start.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from remote_runner.errors import CopyError, StartError
from remote_runner.screen import (PLACING_FAILED, SETUP_FAILED, _NEED_SCREEN, _SETUP_EXIT, Window,
                                  _poll_gone, _set_ids, escape_x, nap_while, parse_sessions,
                                  printf_write, quit_sessions_script, rc_text)

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.screen import Screen
    from remote_runner.shell import ScriptResult


def rc_word(text: str) -> str:
    """Quote *text* as one word of a screen rc file (no ``$`` or ``^`` interpretation)."""
    text = text.replace("\n", " ").replace("\r", " ")
    for char in "\\\"$^":
        text = text.replace(char, "\\" + char)
    return f'"{text}"'


def windows_rc(windows: Sequence[Window]) -> str:
    """Return screen commands opening *windows*, each logging to its own ``<stem>.log``.

    Sourced by a running session (``-X source``) or by the rc file a new
    session starts with, so a whole wave costs one screen client, not one per
    window. ``logfile NAME`` also renames the log of the current window when
    that one is logging, so each window opens without logging, then gets its
    name and ``log on``: screen reads no window output while it runs a
    sourced file, so nothing is printed before the log is open.
    """
    lines = []
    for w in windows:
        lines += [f"screen -t {rc_word(w.title)} /bin/sh {rc_word(w.launcher)}",
                  f"logfile {rc_word(w.log_file)}", "log on"]
    return "\n".join(lines) + "\n"


@dataclass
class WaveResult:
    """What one start command reports: the session, the new pids, what it replaced."""

    session_id: Optional[str]
    pids: Dict[str, int]
    quit: List[str]
    adopted: bool
    stdout: str


def start_wave(screen: "Screen", windows: Sequence[Window], setup: str = "",
               replace: Optional[str] = None, health: str = "", grace: float = 10.0,
               extra_time: float = 0.0, before_open: str = "") -> WaveResult:
    """Run one start command on *screen*'s host; see :meth:`Screen.start_wave`."""
    q = shlex.quote
    parts = [_NEED_SCREEN, setup]
    listed = None  # a variable listing the sessions left, when this command has one already
    if replace == "kill":
        listed = "rr_after"
        # a session has quit when its SCREEN process has ended (screen removes its socket
        # as it goes): what is left is known without asking screen again
        parts.append(quit_sessions_script(screen.name, grace, wipe=True) +
                     _poll_gone("$rr_pids", screen.start_timeout) +
                     "rr_left=\n"
                     'for s in $rr_ids; do if kill -0 "${s%%.*}" 2>/dev/null; then '
                     'rr_left="$rr_left $s"; else echo "RR-QUIT $s"; fi; done\n'
                     'if [ -n "$rr_left" ]; then echo "RR-NOT-QUIT$rr_left"; exit 0; fi\n'
                     # past here no session of that name is left: the new one is any listed
                     "rr_after=' '\nsid=\n")
    elif replace == "adopt":
        listed = "rr_all"
        parts.append(_set_ids("rr_all", screen.name, wipe=True) +
                     "sid=\nfor s in $rr_all; do sid=$s; done\n")
        if screen.session_id:
            parts.append(f'case "$rr_all" in *" "{q(screen.session_id)}" "*) '
                         f"sid={q(screen.session_id)};; esac\n")
        parts.append('[ -n "$sid" ] && echo "RR-ADOPT $sid"\n')
    else:
        parts.append(f"sid={q(screen.session_id or '')}\n")
    if windows:
        parts.append(before_open)
        parts.append(_open_script(screen, windows, listed))
        parts.append(f"if [ $rr_missing = 0 ]; then\n:\n{health}\nfi\n")
    parts.append('echo "RR-SESSION $sid"\n')
    result = screen.shell.script("".join(parts), timeout=2 * screen.start_timeout + grace +
                                 extra_time + 60)
    return _wave_result(screen, windows, result)


def _open_script(screen: "Screen", windows: Sequence[Window], listed: Optional[str] = None) -> str:
    """Return shell text opening *windows* in session ``$sid`` (created when empty).

    A new session is found as the one ``screen -ls`` lists after it was started
    and not before; *listed* names a variable that already holds the "before"
    (the sessions this command left running, space-padded), saving the host a
    screen client.
    """
    q = shlex.quote
    wave_file = f"{screen.log_dir}/windows-{windows[0].stem}.screenrc"
    rc = rc_text(screen.log_dir, screen.zombie) + f"source {rc_word(wave_file)}\n"
    script = (printf_write(wave_file, windows_rc(windows), on_error=SETUP_FAILED) +
              'if [ -z "$sid" ]; then\n' +
              printf_write(screen.rc_file, rc, on_error=SETUP_FAILED) +
              (f'  rr_b="${listed}"\n' if listed else _set_ids("rr_b", screen.name)) +
              # zombie mode is in the rc, so it holds before the first window can exit
              f"  screen -c {q(screen.rc_file)} -d -m -S {q(screen.name)} </dev/null >/dev/null 2>&1\n"
              "  rr_rc=$?\n"
              # screen -d -m may return before the new session's socket is listed: wait for it
              "  rr_find() {\n" + _set_ids("rr_now", screen.name) +
              '    for s in $rr_now; do case "$rr_b" in *" $s "*) ;; *) sid=$s;; esac; done\n'
              '    [ -z "$sid" ]\n  }\n' +
              nap_while('[ $rr_rc = 0 ] && rr_find', screen.start_timeout) +
              '  if [ -z "$sid" ]; then echo "RR-NO-SESSION $rr_rc"; screen -ls; exit 0; fi\n'
              "else\n"
              f'  screen -S "$sid" -X source {q(escape_x(wave_file))} </dev/null >/dev/null 2>&1\n'
              "fi\n" +
              _poll_files([w.pid_file for w in windows], screen.start_timeout) +
              "rr_missing=0\n")
    for w in windows:
        pid = q(w.pid_file)
        script += (f"p=; {{ read -r p < {pid}; }} 2>/dev/null; [ -n \"$p\" ] || rr_missing=1; "
                   f"echo \"PID {w.stem} $p\"\n")
    script += ('if [ $rr_missing = 1 ]; then echo RR-WINDOWS; '
               'screen -S "$sid" -Q windows 2>&1; echo; fi\n')
    return script


def _wave_result(screen: "Screen", windows: Sequence[Window], result: "ScriptResult"
                 ) -> WaveResult:
    """Check what a start command printed; raise StartError for what went wrong."""
    host, lines = screen.shell.host, result.stdout.splitlines()
    if "NO-SCREEN" in lines:
        raise StartError(f"host {host}: GNU screen is not installed (or not on PATH)")
    if result.exit_status == _SETUP_EXIT:
        said = result.stderr.strip()
        if PLACING_FAILED in said:
            dest = (said.split(PLACING_FAILED, 1)[1].strip().splitlines() or ["?"])[0]
            raise CopyError("the file staged by the change check could not be renamed into "
                            "place; the previous session is left running", host=host, path=dest)
        raise StartError(f"host {host}: could not write launchers: {said}")
    quit_ids = [line[8:] for line in lines if line.startswith("RR-QUIT ")]
    left = [line.split()[1:] for line in lines if line.startswith("RR-NOT-QUIT")]
    if left:
        raise StartError(f"host {host}: screen session(s) {left[0]} did not quit")
    failed = [line for line in lines if line.startswith("RR-NO-SESSION")]
    if failed:
        raise StartError(f"host {host}: could not create screen session {screen.name!r} "
                         f"({result.stdout.strip() or 'no output'}; {result.stderr.strip()})")
    said = [line[11:] for line in lines if line.startswith("RR-SESSION ")]
    if not said:
        raise StartError(f"host {host}: the start command ended early (exit status "
                         f"{result.exit_status}): {result.stderr.strip() or 'no output'}")
    sid = said[-1].strip() if said else ""
    if sid and parse_sessions(f"\t{sid}\t(x)\n", screen.name) != [sid]:
        raise StartError(f"host {host}: screen reported an unexpected session id {sid!r}")
    screen.session_id = sid or None
    adopted = any(line.startswith("RR-ADOPT ") for line in lines)
    pids = _parse_pids(result.stdout)
    missing = [w.title for w in windows if w.stem not in pids]
    if missing:
        listing = result.stdout.split("RR-WINDOWS\n", 1)[-1].split("RR-SESSION")[0].strip()
        raise StartError(f"host {host}: window(s) {missing} did not start within "
                         f"{screen.start_timeout:g} s in screen session {screen.session_id}; "
                         f"windows: {listing!r}")
    return WaveResult(screen.session_id, pids, quit_ids, adopted, result.stdout)


def _poll_files(paths: Sequence[str], timeout: float) -> str:
    """Return shell text that waits until every path in *paths* is non-empty, or *timeout*."""
    tests = " && ".join(f"[ -s {shlex.quote(p)} ]" for p in paths) or "true"
    return nap_while(f"! {{ {tests}; }}", timeout)


def _parse_pids(stdout: str) -> Dict[str, int]:
    """Return stem -> pid from ``PID stem pid`` lines (lines without a pid are skipped)."""
    pids = {}
    for line in stdout.splitlines():
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == "PID" and parts[2].isdigit():
            pids[parts[1]] = int(parts[2])
    return pids
