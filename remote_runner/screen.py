"""GNU screen on one host: sessions, windows and the launcher each window runs.

Every component runs in its own window of one detached session per host. Screen
has traps that this module exists to keep away from the rest of the runner
(see docs/notes, "GNU screen facts"):

* ``-S NAME`` matches sessions by *prefix*, so sessions are always addressed by
  the ``PID.NAME`` id that ``screen -ls`` prints, found by an exact name match.
* ``-X`` and rc files expand ``$VAR``, so user text never reaches them
  unescaped: a window runs ``/bin/sh LAUNCHER``, a small file written with
  :func:`shlex.quote` that does ``cd`` and runs the argv. Only the title (the
  component name) and paths pass through screen, quoted by :func:`remote_runner.wave.rc_word`.
* Zombie mode has to be on before the first window can exit, so it is set in
  the rc file the session is created with (``-c RCFILE``), not by a later ``-X``.
* ``-X`` returns 0 even when it did nothing, so a start is confirmed by the
  launcher's own ``.pid`` file, never by an exit code.
* One screen client per window is the expensive part of starting many: a
  whole wave's windows are a file of screen commands, read by the rc file of a
  new session or by one ``-X source`` (:mod:`remote_runner.wave`).

The launcher also makes the window observable without screen: it writes
``<stem>.pid`` (its pid, which is the window's process group) and
``<stem>.win`` (its window number) before running the program, and records
the program's exit status in ``<stem>.status`` (127 for a missing
executable); screen logs the window to ``<stem>.log`` (logging stays on the
terminal, so programs keep line-buffered output). It forks nothing but the
program, so a window costs about what a bare ``screen -X screen`` does.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from remote_runner.errors import ConfigError, StartError

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.shell import Shell
    from remote_runner.wave import WaveResult

#: What a session name may contain: no whitespace (``screen -ls`` columns), no
#: shell or screen metacharacters.
SESSION_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,79}$")
#: A directory used inside the rc file and ``-X`` arguments must avoid these.
UNSAFE_DIR_CHARS = set("'\"$%\\\n\r\t`")
_SAFE_STEM_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_LS_LINE_RE = re.compile(r"^\s+(\d+)\.(\S+)\s")

#: The rc file of a new session. A window keeps 1,000 lines to scroll back
#: through when attached (its whole output is in its log file): screen fills a
#: window's scrollback when it opens it, and with 10,000 lines 25 windows took
#: 97 ms to open instead of 53-70 ms, and the session 29 ms to quit instead of 8.
RC_TEMPLATE = """\
# remote-runner: written for each new session (zombie must be set at creation)
{zombie}
defscrollback 1000
logfile flush 0
logfile '{log_dir}/window-%n.log'
"""


#: Shell text that stops a script on a host without GNU screen (reported as StartError).
_NEED_SCREEN = "command -v screen >/dev/null 2>&1 || { echo NO-SCREEN; exit 0; }\n"
_LIST_MARK = "RR-SCREEN-LS"
#: Exit status of a start command whose setup (launchers, rc files) could not be written.
_SETUP_EXIT = 9
#: Shell text ending a start command when writing its setup failed (nothing stopped yet).
SETUP_FAILED = f"|| {{ echo 'remote-runner: writing failed' >&2; exit {_SETUP_EXIT}; }}"
#: What a start command says when a file staged by the change check could not be renamed.
PLACING_FAILED = "remote-runner: could not put a copied file in place:"
#: Shell text that lists the sessions after a marker line (dead ones wiped first).
_LIST = f"screen -wipe >/dev/null 2>&1\necho {_LIST_MARK}\nscreen -ls\n"


def placing_failed(dest: str) -> str:
    """Shell text ending a start command whose rename of a staged *dest* failed (nothing stopped)."""
    return f"|| {{ echo {shlex.quote(PLACING_FAILED + ' ' + dest)} >&2; exit {_SETUP_EXIT}; }}"


#: Shell function for the waits of a start or stop: a new window's pid file, an old
#: window's or session's exit. What is waited for mostly takes a few ms, so the
#: naps grow (5, 10, 20, then 50 ms) instead of starting at 50 ms: a fixed 50 ms
#: nap cost a rerun about 150 ms per host in three waits. ``$rr_w`` counts the ms
#: slept since it was set to 0 (``sleep 1`` where fractions are refused).
def nap_function(longest_ms: int = 50) -> str:
    """Shell text defining ``rr_nap``: 5, 10, 20, 50 ms naps up to *longest_ms*, then that each time."""
    cases, slept = [], 0
    for ms in (5, 10, 20, 50):
        if ms >= longest_ms:
            break
        cases.append(f"{slept}) rr_s={ms / 1000:g} rr_n={ms};;")
        slept += ms
    cases.append(f"*) rr_s={longest_ms / 1000:g} rr_n={longest_ms};;")
    return ("rr_nap() {\n"
            f"  case $rr_w in {' '.join(cases)} esac\n"
            "  sleep $rr_s 2>/dev/null || { sleep 1; rr_n=1000; }\n"
            "  rr_w=$((rr_w+rr_n))\n}\n")


_NAP_FUNCTION = nap_function()


def nap_while(condition: str, timeout: float) -> str:
    """Return shell text that naps (see :data:`_NAP_FUNCTION`) while *condition* holds, *timeout* s at most."""
    return (_NAP_FUNCTION + f"rr_w=0\nwhile [ $rr_w -lt {max(1, int(timeout * 1000))} ] && {condition}; do "
            "rr_nap; done\n")


def validate_session_name(name: str) -> str:
    """Return *name* if it is usable as a screen session name, else raise ConfigError."""
    if not SESSION_NAME_RE.match(name or ""):
        raise ConfigError(f"screen session name {name!r} must be 1-80 characters of "
                          "letters, digits, '_', '.', '+', '-' (not starting with '.', '+' or '-')",
                          field="--screen")
    return name


def check_state_dir(path: str, host: str) -> str:
    """Return *path* if screen's rc file and ``-X`` can carry it unchanged, else raise."""
    bad = sorted(set(path) & UNSAFE_DIR_CHARS)
    if bad or not path.startswith("/"):
        raise ConfigError(f"host {host}: remote done dir {path!r} must be absolute and free of "
                          f"{''.join(sorted(UNSAFE_DIR_CHARS)).strip()!r} characters",
                          field="--remote-done-dir")
    return path


def file_stem(name: str) -> str:
    """Return a file-name-safe stem for component *name* (the name itself when safe)."""
    if _SAFE_STEM_RE.match(name) and len(name) <= 100:
        return name
    cleaned = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("._+-")[:60] or "component"
    return f"{cleaned}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"


def escape_x(text: str) -> str:
    """Escape *text* so that ``screen -X`` passes it on without ``$`` expansion."""
    return text.replace("\\", "\\\\").replace("$", "\\$")


def parse_sessions(ls_output: str, name: str) -> List[str]:
    """Return the ``PID.NAME`` ids of sessions named exactly *name* in ``screen -ls`` output."""
    ids = []
    for line in ls_output.splitlines():
        match = _LS_LINE_RE.match(line)
        if match and match.group(2) == name:
            ids.append(f"{match.group(1)}.{name}")
    return ids


@dataclass(frozen=True)
class Window:
    """One component's window: its title and the files its launcher uses."""

    title: str
    stem: str
    state_dir: str

    @property
    def launcher(self) -> str:
        return f"{self.state_dir}/{self.stem}.launch"

    @property
    def pid_file(self) -> str:
        return f"{self.state_dir}/{self.stem}.pid"

    @property
    def status_file(self) -> str:
        return f"{self.state_dir}/{self.stem}.status"

    @property
    def log_file(self) -> str:
        return f"{self.state_dir}/{self.stem}.log"

    @property
    def win_file(self) -> str:
        """The screen window number the launcher ran in (restart closes that window)."""
        return f"{self.state_dir}/{self.stem}.win"


def launcher_text(window: Window, argv: Sequence[str], cwd: str, name: str,
                  env: Sequence[Tuple[str, str]] = (), lookup: Optional[str] = None) -> str:
    """Return the ``/bin/sh`` launcher that runs *argv* in *cwd* for *window*.

    *env* is exported first. With *lookup* (a bare executable name), ``argv[0]``
    is ``./NAME`` when base_dir has it, else NAME as found on the host's PATH;
    when neither exists the log says so (host and PATH) and the status is 127.

    Only shell builtins run besides the program, so a window costs one ``sh``
    and its program: screen opens the window's log itself (the start script
    sets ``logfile`` per window), and the pid, window number and status are
    written with plain redirections. Each is one short ``write``, so a reader
    that sees a non-empty file sees all of it; the status is written only if
    the pid file still names this launcher (a restart may have replaced it).
    """
    q = shlex.quote
    d, s = q(window.state_dir), window.stem
    comment = name.replace("\n", " ").replace("\r", " ")
    exports = "".join(f"export {k}={q(v)}\n" for k, v in env)
    if lookup is None:
        run = f"  {shlex.join(list(argv))}\n  rc=$?\n"
    else:
        rest = shlex.join(list(argv[1:]))
        n = q(lookup)
        here = q("./" + lookup)
        run = (f"  if [ -e {here} ]; then set -- {here} {rest}\n"
               f"  elif command -v {n} >/dev/null 2>&1; then set -- {n} {rest}\n"
               f"  else printf 'remote-runner: executable %s is neither in %s nor on the PATH "
               f"of host %s (PATH=%s)\\n' {n} {q(cwd)} \"$(hostname)\" \"$PATH\" >&2; "
               "set --; fi\n"
               "  if [ $# -gt 0 ]; then \"$@\"; rc=$?; else rc=127; fi\n")
    return f"""\
# remote-runner launcher for component {comment}
d={d}
[ -n "$WINDOW" ] && echo "$WINDOW" > "$d/{s}.win"
echo $$ > "$d/{s}.pid"
# Survive the signals meant for the program so its status is still recorded.
trap : HUP INT QUIT TERM
{exports}if cd {q(cwd)}; then
{run}else
  rc=126
fi
p=; {{ read -r p < "$d/{s}.pid"; }} 2>/dev/null
[ "$p" = "$$" ] && echo "$rc" > "$d/{s}.status"
exit "$rc"
"""


def rc_text(state_dir: str, zombie: bool) -> str:
    """Return the rc file a new session is created with."""
    # A bare "zombie" (no keys) is screen's way of saying "off".
    return RC_TEMPLATE.format(zombie="zombie kr" if zombie else "zombie", log_dir=state_dir)


def heredoc_write(path: str, content: str, mode: str = "644", on_error: str = "") -> str:
    """Return shell text that writes *content* to *path* atomically (temp file + rename).

    *on_error* (shell text such as ``|| exit 9``) runs when any step fails.
    """
    marker = "RR_EOF_" + hashlib.sha1(content.encode("utf-8", "surrogateescape")).hexdigest()
    tmp = shlex.quote(path + ".tmp")
    body = content if content.endswith("\n") else content + "\n"
    return (f"cat > {tmp} <<'{marker}' && chmod {mode} {tmp} && mv -f {tmp} "
            f"{shlex.quote(path)} {on_error}\n{body}{marker}\n")


def printf_write(path: str, content: str, on_error: str = "") -> str:
    """Return shell text that writes *content* to a new file *path* with no process forked.

    For files nothing reads yet (a new run's launchers): not atomic, but
    ``printf`` is a builtin, so a hundred launchers cost no fork at all.
    """
    return f"printf %s {shlex.quote(content)} > {shlex.quote(path)} {on_error}\n"


class Screen:
    """The session named *name* on one host, driven through a :class:`Shell`."""

    def __init__(self, shell: "Shell", name: str, state_dir: str, zombie: bool = True,
                 start_timeout: float = 30.0, log_dir: Optional[str] = None) -> None:
        self.shell = shell
        self.name = validate_session_name(name)
        self.state_dir = check_state_dir(state_dir, shell.host)
        #: Where window logs go: the run's own directory, so runs never share logs.
        self.log_dir = check_state_dir(log_dir or state_dir, shell.host)
        self.zombie = zombie
        self.start_timeout = start_timeout
        self.session_id: Optional[str] = None

    @property
    def rc_file(self) -> str:
        """The rc file a new session starts with (this run's settings and first windows)."""
        return f"{self.log_dir}/{self.name}.screenrc"

    def sessions(self) -> List[str]:
        """Return the ids of the sessions with exactly this name."""
        return self._listed(self.shell.script(_NEED_SCREEN + _LIST, timeout=60).stdout)[-1]

    def _listed(self, stdout: str) -> List[List[str]]:
        """Split output made of ``_LIST`` parts into the session ids each part lists."""
        if "NO-SCREEN" in stdout.splitlines():
            raise StartError(f"host {self.shell.host}: GNU screen is not installed "
                             "(or not on PATH)")
        return [parse_sessions(part, self.name) for part in stdout.split(_LIST_MARK + "\n")[1:]]

    def kill(self, grace: float = 10.0) -> List[str]:
        """Stop every window of every session with this name, quit them; return their ids.

        Quitting alone is not enough: screen hangs up only each window's first
        process, and the launcher survives that on purpose (to record a status),
        so its program would live on. Each window's process group is sent
        SIGTERM first, and SIGKILL if it is still there after *grace* seconds.
        One command does it all: find, stop, quit, wait, and list what is left.
        """
        script = (_NEED_SCREEN + _LIST + quit_sessions_script(self.name, grace) +
                  _poll_gone("$rr_pids", self.start_timeout) + _LIST)
        before, after = self._listed(
            self.shell.script(script, timeout=grace + self.start_timeout + 60).stdout)
        left = set(before) & set(after)
        if left:
            raise StartError(f"host {self.shell.host}: screen session(s) {sorted(left)} "
                             "did not quit")
        self.session_id = None
        return before

    def adopt(self) -> Optional[str]:
        """Use the existing session with this name (``--no-kill``), if there is one."""
        ids = self.sessions()
        self.session_id = ids[-1] if ids else None
        return self.session_id

    def start(self, windows: Sequence[Window]) -> Dict[str, int]:
        """Open *windows* (launchers already written); return stem -> pid once all run."""
        return self.start_wave(windows).pids

    def start_wave(self, windows: Sequence[Window], setup: str = "", replace: Optional[str] = None,
                   health: str = "", grace: float = 10.0, extra_time: float = 0.0,
                   before_open: str = "") -> "WaveResult":
        """Start a whole wave on this host in one command, and confirm it.

        In order: *setup* (shell text, e.g. the launchers; a failing step ends
        the command with :data:`SETUP_FAILED` before anything is stopped), then
        the previous session is replaced (*replace* ``"kill"``: its windows
        are stopped as :meth:`kill` does and it is quit; ``"adopt"``: the
        session with this name is used, the current :attr:`session_id` if it is
        still there), then *windows* open — in a new session created with them
        when there is none, else by one ``-X source`` — and every launcher's
        ``.pid`` file is awaited. *health* (shell text) runs last, only when
        every window started; its output is in the result's ``stdout``.
        *before_open* runs just before the windows open, with ``$sid`` set.
        """
        from remote_runner.wave import start_wave
        return start_wave(self, windows, setup, replace, health, grace, extra_time, before_open)

    def windows(self) -> str:
        """Return ``screen -Q windows`` for the session (titles and flags)."""
        if not self.session_id:
            return ""
        result = self.shell.script(f"screen -S {shlex.quote(self.session_id)} -Q windows\n",
                                   timeout=60)
        return result.stdout.strip()


def poll_windows(shell: "Shell", windows: Sequence[Window], seconds: float
                 ) -> Dict[str, Tuple[str, str]]:
    """Wait up to *seconds* for any window to end; return stem -> (DONE|GONE|RUNNING, value).

    DONE carries the recorded exit status; GONE means the launcher is no longer
    running yet left no status (its window was killed).
    """
    rounds = max(1, int(seconds * 5))
    q = shlex.quote
    body = "".join(f"  if [ -s {q(w.status_file)} ] || ! kill -0 \"$(cat {q(w.pid_file)} "
                   f"2>/dev/null)\" 2>/dev/null; then n=1; fi\n" for w in windows)
    done = {w.stem: f"echo \"DONE {w.stem} $(cat {q(w.status_file)})\"" for w in windows}
    report = "".join(
        f"if [ -s {q(w.status_file)} ]; then {done[w.stem]}; "
        f"elif kill -0 \"$(cat {q(w.pid_file)} 2>/dev/null)\" 2>/dev/null; then "
        f"echo \"RUNNING {w.stem} -\"; "
        f"elif [ -s {q(w.status_file)} ]; then {done[w.stem]}; "
        f"else echo \"GONE {w.stem} -\"; fi\n" for w in windows)
    script = (f"i=0\nwhile [ $i -lt {rounds} ]; do\n  n=0\n{body}"
              f"  [ $n -gt 0 ] && break\n  sleep 0.2 2>/dev/null || sleep 1\n  i=$((i+1))\n"
              f"done\n{report}")
    result = shell.script(script, timeout=seconds + 60)
    states = {}
    for line in result.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] in ("DONE", "RUNNING", "GONE"):
            states[parts[1]] = (parts[0], parts[2].strip())
    return states


#: ``pg FILE`` prints the process group recorded in FILE, only if it is a number > 1
#: (so that a damaged pid file can never turn into ``kill -1``).
_PG_FUNCTION = ("pg() { p=$(cat \"$1\" 2>/dev/null); case $p in ''|*[!0-9]*) return 1;; esac; "
                "[ \"$p\" -gt 1 ] && echo \"$p\"; }\n")


@dataclass(frozen=True)
class Stopped:
    """What stopping some windows found: which were running, and which needed SIGKILL."""

    signalled: List[str]  # stems whose process group was alive and got SIGTERM
    killed: List[str]  # stems whose group outlived the grace and got SIGKILL


def stop_windows(shell: "Shell", windows: Sequence[Window], grace: float, then: str = "") -> Stopped:
    """SIGTERM each window's process group, SIGKILL what is left after *grace*; then run *then*.

    A window whose group is gone already (its program ended) is not signalled
    and not reported as stopped: the caller says "not running" instead.
    """
    if not windows:
        return Stopped([], [])
    by_file = {w.pid_file: w.stem for w in windows}
    words = " ".join(shlex.quote(f) for f in by_file)
    listing = _PG_FUNCTION + f'for f in {words}; do p=$(pg "$f") && echo "$p $f"; done'
    script = _stop_groups(listing, grace, report=True) + then + "exit 0\n"
    lines = shell.script(script, timeout=grace + 60).stdout.splitlines()

    def stems(mark: str) -> List[str]:
        n = len(mark) + 1
        return [by_file[line[n:]] for line in lines
                if line.startswith(mark + " ") and line[n:] in by_file]
    return Stopped(stems("STOPPED"), stems("KILLED"))


def _window_groups(screen_pids: str, children: str = "/proc/$sp/task/$sp/children") -> str:
    """Return shell text listing ``PGID SCREENPID`` for each window of the given sessions.

    *screen_pids* is shell text that expands to the pids of the sessions' SCREEN
    processes. A window's first process is a child of SCREEN and leads its own
    process group. Read from /proc with builtins rather than ps, which minimal
    hosts may lack, and without a fork per process: SCREEN's *children* file
    where the kernel has one, else every process's stat.
    """
    return (f"for sp in {screen_pids}; do\n"
            # The kernel's list of SCREEN's children, where it keeps one (CONFIG_PROC_CHILDREN):
            # a host has hundreds of processes, and reading each one's stat cost a start or a
            # stop ~0.1-0.3 s of host CPU even with no session to stop.
            f'  if [ -r "{children}" ]; then\n'
            f'    rr_k=; read -r rr_k < "{children}" 2>/dev/null\n'
            "    for pid in $rr_k; do\n"
            '      read -r s < "/proc/$pid/stat" 2>/dev/null || continue\n'
            '      s=${s##*") "}; set -- $s\n'
            '      [ "$3" = "$pid" ] && echo "$pid $sp"\n'
            "    done\n"
            "  else\n"
            "    for f in /proc/[0-9]*/stat; do\n"
            '      read -r s < "$f" 2>/dev/null || continue\n'
            '      pid=${s%% *}; s=${s##*") "}; set -- $s\n'
            '      [ "$2" = "$sp" ] && [ "$3" = "$pid" ] && echo "$pid $sp"\n'
            "    done\n"
            "  fi\n"
            "done")


def each_line(text: str, body: str, fields: str = "p k") -> str:
    """Shell text running *body* for each line of *text* (shell text, expanded), split into *fields*.

    The lines come from a here-document, so the loop runs in the shell itself:
    no subshell per ``echo ... | while``, and what *body* sets is kept (dash and
    bash write a short here-document straight into a pipe, without a fork).
    """
    return f"while read -r {fields}; do {body}; done <<RR_LINES\n{text}\nRR_LINES\n"


def _set_ids(var: str, name: str, wipe: bool = False) -> str:
    """Return shell text setting *var* to `` ID ID ... `` (space-padded): the sessions named *name*.

    ``screen -ls`` lists ``PID.NAME`` as each line's first word; the words are
    picked by the shell itself, from one captured listing (a start asks more
    than once, and each helper process costs the host a fork and an exec). With
    *wipe*, ``screen -wipe`` lists them instead: it prints the same list while it
    removes dead sessions, which it marks ``(Removed)``, so a start that wipes
    first needs no second screen client to list what is left.
    """
    pick = f'[ "${{rr_i#*.}}" = {shlex.quote(validate_session_name(name))} ] && {var}="${var}$rr_i "'
    keep = f'case $rr_x in *"(Removed)"*) ;; *) {pick};; esac' if wipe else pick
    return (f"rr_ls=$(screen {'-wipe' if wipe else '-ls'} 2>/dev/null)\n{var}=' '\n" +
            each_line("$rr_ls", f"case $rr_i in ?*.*) {keep};; esac", "rr_i rr_x"))


def quit_sessions_script(name: str, grace: float, wipe: bool = False) -> str:
    """Return shell text that stops every window of the sessions called *name* and quits them.

    Self-contained (it finds the sessions itself), for clean-up tools that have
    no :class:`Screen` at hand; :meth:`Screen.kill` does the same in steps. With
    *wipe*, dead sessions are wiped by the same screen client that lists them.
    It leaves the sessions' ids in ``$rr_ids`` and their SCREEN pids in ``$rr_pids``.
    """
    return (_set_ids("rr_ids", name, wipe) +
            'rr_pids=; for s in $rr_ids; do rr_pids="$rr_pids ${s%%.*}"; done\n' +
            _stop_groups(_window_groups("$rr_pids"), grace, only_if='[ -n "$rr_pids" ]') +
            'for s in $rr_ids; do screen -S "$s" -X quit >/dev/null 2>&1; done\n')


def _stop_groups(listing: str, grace: float, only_if: str = "", report: bool = False) -> str:
    """Return shell text that stops the process groups *listing* prints as ``PGID KEY`` lines.

    Each group gets SIGTERM (with *report*, a group that took it, being alive, is
    printed as a ``STOPPED KEY`` line); those still alive after *grace* seconds get
    SIGKILL and are reported as ``KILLED KEY`` lines. With *only_if* (a shell
    test), the listing runs only when it holds (else there is nothing to stop).
    """
    groups = f"rr_groups=$({listing})\n"
    if only_if:
        groups = f"rr_groups=\nif {only_if}; then\n{groups}fi\n"
    alive = ('{ rr_a=1; for p in $rr_gp; do '
             'kill -0 -"$p" 2>/dev/null && { rr_a=0; break; }; done; [ $rr_a = 0 ]; }')
    return (groups + "rr_gp=\n" +
            each_line("$rr_groups", '[ -n "$p" ] && rr_gp="$rr_gp $p"') +
            (each_line("$rr_groups", '[ -n "$p" ] && kill -TERM -"$p" 2>/dev/null && '
                       'echo "STOPPED $k"') if report else
             'for p in $rr_gp; do kill -TERM -"$p" 2>/dev/null; done\n') +
            'if [ -n "$rr_gp" ]; then\n' + nap_while(alive, grace) +
            each_line("$rr_groups", '[ -n "$p" ] && kill -KILL -"$p" 2>/dev/null && echo "KILLED $k"') +
            "fi\n")


def _poll_gone(pids: str, timeout: float) -> str:
    """Return shell text that waits until the processes *pids* (shell words) have ended."""
    alive = f'{{ rr_a=1; for p in {pids}; do kill -0 "$p" 2>/dev/null && {{ rr_a=0; break; }}; done; [ $rr_a = 0 ]; }}'
    return nap_while(alive, timeout)
