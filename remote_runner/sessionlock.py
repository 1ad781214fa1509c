"""The session lock: one run per (host, ``--screen``) at a time, and a channel for its first step.

A second run with the same ``--screen`` on the same host is refused while the
first one runs ("already running: pid, run id, since"), before it changes
anything there. The lock (``<state>/session.lock``, ``flock``) is held by a
shell on an exec channel that lives as long as the runner's connection, so a
crashed runner never leaves a stale lock behind: its connection closes, and
the lock goes with it.

That channel is also the cheapest place for a run's first step on the host: the
prepare script (*then*) runs under the lock as soon as it is held, and the
manifest's change check (*fed*, :mod:`remote_runner.precheck`) after it, reading
its request from the same channel's stdin.

After that the shell does not just sit on the lock: it runs the run's later
scripts (:meth:`SessionLock.script`, the start waves through
:class:`LockShell`), one at a time, each sent as a length-prefixed text on
its stdin and answered with its status and output. An exec channel costs a
channel open and a new session on the host (sshd forks, the shell starts)
before the script's first line: about two and a half round trips (measured
at 10 ms each way: the first line ran 73 ms after the call on an exec, 17 ms
for a step here). A rerun of an unchanged
experiment then costs one exec (the lock, the prepare script, the manifest
check) and one round trip per start wave.
"""

from __future__ import annotations

import secrets
import shlex
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from remote_runner.channelio import send_all_or_raise
from remote_runner.errors import (MAX_OUTPUT, CommandTimeout, ConnectionLost, OutputTooLarge,
                                  SessionBusy, StartError)
from remote_runner.shell import ScriptResult, Shell, shell_path


@dataclass
class SessionLock:
    """A held per-(host, session) lock; :meth:`release` (or a lost link) frees it."""

    host: str
    handle: Any
    #: what the command run once the lock was held printed (stdout and stderr) and its status
    then_output: str = ""
    then_status: Optional[int] = None
    #: the connection's counters (a step is counted in ``steps``), if it has them
    traffic: Any = None
    _steps: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _no_steps: bool = False
    #: the answer came early (:data:`EARLY_MARK`): what was read of the rest, which the
    #: first step reads before its own answer
    _tail: Optional[bytes] = None
    #: the thread still sending the lock's input, which the first step's text must follow
    _feeder: Optional[threading.Thread] = field(default=None, repr=False)

    def script(self, text: str, timeout: float, data: Optional[bytes] = None) -> Optional[ScriptResult]:
        """Run *text* with ``sh`` on the lock's shell, one round trip; None if it cannot.

        With *data*, the script reads it on stdin (else /dev/null), as
        :meth:`~remote_runner.shell.Shell.feed` gives it; what it leaves
        unread is read and dropped on the host.

        None (nothing ran; run it some other way) when the lock is held by a
        local process or released, another step is running, or the host's
        shell cannot take steps (no ``mktemp`` or ``head -c``). Once the text is sent, a
        lost answer is an error, never a second run:
        :class:`CommandTimeout` past *timeout* (the lock's channel is then
        closed: its shell is out of step), :class:`ConnectionLost` when the
        channel ends.
        """
        channel = self.handle
        if channel is None or isinstance(channel, subprocess.Popen) or self._no_steps:
            return None
        if not self._steps.acquire(blocking=False):
            return None
        try:
            if self.handle is None:
                return None
            nonce = secrets.token_hex(8)
            body = text.encode("utf-8", "surrogateescape")
            try:
                feeder, self._feeder = self._feeder, None
                if feeder is not None:
                    feeder.join(timeout)
                    if feeder.is_alive():  # the host stopped reading the lock's input
                        raise socket.timeout()
                channel.settimeout(timeout)
                head = f"{_STEP} {nonce} {len(body)} {len(data or b'')}\n".encode()
                send_all_or_raise(channel, head + body)
                if data:
                    send_all_or_raise(channel, data)
                tail, self._tail = self._tail, None
                answer = _read_step(channel, nonce, b"" if tail is None else _read_tail(channel, tail))
                channel.settimeout(None)
                if answer is None:  # the script was not read, so it did not run
                    self._no_steps = True
                    return None
                status, out, err = answer
                if self.traffic is not None:
                    self.traffic.count("steps")
            except OutputTooLarge as exc:  # the shell is out of step: never used again
                self.release()
                raise OutputTooLarge(self.host, "a script on the session lock's shell") from exc
            except socket.timeout as exc:
                self.release()
                raise CommandTimeout(self.host, "a script on the session lock's shell", timeout) from exc
            except (OSError, EOFError, ValueError) as exc:
                self.release()
                raise ConnectionLost(self.host, f"the session lock's shell ended during a script ({exc})",
                                     "check the host and the network, then run again") from exc
            return ScriptResult(status, out.decode("utf-8", "surrogateescape"),
                                err.decode("utf-8", "surrogateescape"))
        finally:
            self._steps.release()

    def release(self) -> None:
        """Free the lock (closing the channel or the local process's stdin)."""
        handle, self.handle = self.handle, None
        if handle is None:
            return
        try:
            if isinstance(handle, subprocess.Popen):
                if handle.stdin:
                    handle.stdin.close()
                handle.wait(timeout=30)
            else:
                handle.close()
        except Exception:  # noqa: BLE001 - releasing never fails a run
            pass


#: Ends the output of the command run under a freshly taken lock: ``RR-THEN-DONE <status>``.
_THEN_MARK = "RR-THEN-DONE"
#: A line the lock's *fed* part prints when its answer is whole and only dropping its
#: input is left (see :func:`lock_script`).
EARLY_MARK = "RR-THEN-EARLY"
#: What the lock script says when it cannot make the state directory (then the error).
_NO_DIR = "RR-NO-STATE-DIR"
#: A script for the lock's shell: ``RR-STEP <nonce> <bytes> <data bytes>`` then the text and
#: the data for its stdin; it answers with the script's stdout, then
#: ``\nRR-STEP-END <nonce> <status> <0|1>``, then (1) its stderr and ``\nRR-STEP-ERR <nonce>``.
_STEP = "RR-STEP"


class LockShell:
    """A host's :class:`~remote_runner.shell.Shell` that runs scripts on its session lock's shell.

    Scripts and data-fed commands go to the lock (:meth:`SessionLock.script`)
    while it is held and free, else to *shell* (an exec each). Give it only to
    steps whose timeout ends the run: a step that times out closes the lock's
    channel (its shell is out of step), and with it the lock.
    """

    def __init__(self, lock: SessionLock, shell: Shell) -> None:
        self.lock = lock
        self.shell = shell
        self.host = shell.host
        #: the host's connection, for what opens channels of its own (streamed copies)
        self.connection = getattr(shell, "connection", None)

    def script(self, text: str, timeout: float) -> ScriptResult:
        result = self.lock.script(text, timeout)
        return result if result is not None else self.shell.script(text, timeout)

    def feed(self, script: str, data: bytes, timeout: float) -> ScriptResult:
        result = self.lock.script(script, timeout, data)
        return result if result is not None else self.shell.feed(script, data, timeout)


def _read_step(channel: Any, nonce: str, data: bytes = b"") -> Optional[Tuple[int, bytes, bytes]]:
    """Read one step's answer from *channel*: (status, stdout, stderr); None if it was refused.

    The step's stdout comes as it was printed, then ``\\nRR-STEP-END <nonce> <status>
    <1 if stderr follows>``; its stderr, when it printed any, then ends with
    ``\\nRR-STEP-ERR <nonce>`` (see :func:`_steps_loop`). *data*: its first bytes,
    read already.
    """
    end = f"\n{_STEP}-END {nonce} ".encode()
    start = 0
    while True:
        at = data.find(end, start)
        if at >= 0:
            line_end = data.find(b"\n", at + len(end))
            if line_end >= 0:
                break
        else:
            if f"{_STEP}-FAIL {nonce}\n".encode() in data:
                return None
            start = max(0, len(data) - len(end) + 1)
        data += _recv_some(channel, len(data))
    fields: List[str] = data[at + len(end):line_end].decode().split()
    status, has_err = int(fields[0]), fields[1:2] == ["1"]
    rest, err = data[line_end + 1:], b""
    if has_err:
        err_end = f"\n{_STEP}-ERR {nonce}\n".encode()
        while err_end not in rest:
            rest += _recv_some(channel, len(rest))
        err = rest[:rest.index(err_end)]
    return status, data[:at], err


def _read_tail(channel: Any, data: bytes) -> bytes:
    """Read the rest of an early answer (*data*: its start) up to its ``RR-THEN-DONE`` line;
    return what follows that line."""
    mark, data = f"\n{_THEN_MARK} ".encode(), b"\n" + data
    while True:
        at = data.find(mark)
        if at >= 0:
            line_end = data.find(b"\n", at + len(mark))
            if line_end >= 0:
                return data[line_end + 1:]
        data += _recv_some(channel, len(data))


def _recv_some(channel: Any, held: int = 0) -> bytes:
    """The next bytes from *channel*; EOFError when it closed.

    *held*: how much of this answer was read already; an answer past
    :data:`MAX_OUTPUT` is not believed (:class:`OutputTooLarge`).
    """
    if held > MAX_OUTPUT:
        raise OutputTooLarge("", "a step")
    chunk = channel.recv(65536)
    if not chunk:
        raise EOFError("the channel closed")
    return chunk


def lock_script(state_dir: str, info: str, then: str = "", fed: str = "") -> str:
    """Return the shell text that takes the session lock and holds it until stdin closes.

    *then* (shell text) runs once the lock is held, its output (stdout and
    stderr) followed by ``RR-THEN-DONE STATUS``: the first step of a run rides
    on the lock's own channel instead of costing an exec of its own. *fed*
    (shell text) runs after *then* succeeded, with the channel's stdin: it
    must read exactly the bytes the caller sent for it (the manifest check,
    whose request is too big for a command line), its output before the mark.
    Once its whole answer is out and all it has left to do is read and drop
    those bytes, it may say so (a line :data:`EARLY_MARK`): the caller goes on
    then, a round trip sooner (a host lets a channel's stdin flow only once
    its command has started, so what is sent there arrives a round trip after
    the command), and the lock's first step reads the rest.
    """
    q = shlex.quote
    d = shell_path(state_dir)
    lock, owner = f"{d}/session.lock", f"{d}/session.owner"
    run_fed = f"if [ $s = 0 ]; then (\n{fed}\n) 2>&1; fi\n" if fed else ""
    run_then = (f"(\n{then}\n) </dev/null 2>&1\ns=$?\n{run_fed}echo \"{_THEN_MARK} $s\"\n"
                if then else "")
    return (f"if ! [ -d {d} ]; then rr_e=$(mkdir -p {d} 2>&1) || {{ echo \"{_NO_DIR} $rr_e\"; exit 3; }}; fi\n"
            "if ! command -v flock >/dev/null 2>&1; then echo NO-FLOCK; else\n"
            f"exec 9>>{lock}\n"
            f"if ! flock -n 9; then echo \"BUSY $(cat {owner} 2>/dev/null)\"; exit 0; fi\n"
            f"printf '%s\\n' {q(info)} > {owner}\n"
            "echo LOCKED\nfi\n" + run_then + _steps_loop())


def _steps_loop() -> str:
    """Shell text running the scripts sent on stdin one at a time (see :meth:`SessionLock.script`).

    Each is read whole into a file first (``head -c`` reads no further than
    it is told), in a directory of its own that only this user can enter
    (``mktemp -d``: nothing else on the host can change the script between
    its arrival and its run, whoever can write to the state directory). It
    runs in a fresh ``sh`` without the lock's descriptor (a screen session it
    starts must not hold the lock), its stdin /dev/null or exactly its data
    (the rest of which is drained if it stops reading). Its stdout goes
    straight to the channel, followed by a line with the step's nonce and
    status: the nonce is random and new for each step, so nothing the script
    prints ends its answer early. Its stderr is kept in a file and sent after
    that line only when there is some, ended by a second nonce line. Beyond
    the script itself a step costs the host ``head`` and nothing else: no
    process to count or copy its outputs. Anything but a step ends the loop,
    as does a host without ``mktemp`` or ``head -c`` (the step is refused: it
    did not run); the shell then holds the lock until stdin closes.
    """
    t = '"$rr_t"'
    step, err, rc = f"{t}/s", f"{t}/e", f"{t}/r"
    return ("rr_t=$(mktemp -d 2>/dev/null) || rr_t=\n"
            "while IFS= read -r rr_h; do\n"
            f'  case $rr_h in "{_STEP} "*) ;; *) break;; esac\n'
            "  set -- $rr_h\n"
            # a script cut short (the link dropped) is never run: its last line could be cut
            # mid-word (`rm -rf /a/b` read as `rm -rf /a`)
            f'  [ -n "$rr_t" ] && head -c "$3" > {step} && [ "$(wc -c < {step})" -eq "$3" ] || '
            f'{{ echo "{_STEP}-FAIL $2"; break; }}\n'
            '  if [ "${4:-0}" = 0 ]; then\n'
            f"    sh {step} </dev/null 2>{err} 9>&-\n"
            "    rr_s=$?\n"
            "  else\n"
            f'    head -c "$4" 9>&- | {{ sh {step} 2>{err} 9>&-; echo $? >{rc}; cat >/dev/null; }}\n'
            f"    rr_s=; read -r rr_s <{rc}\n"
            "  fi\n"
            f"  if [ -s {err} ]; then\n"
            f"    printf '\\n{_STEP}-END %s %s 1\\n' \"$2\" \"${{rr_s:-255}}\"\n"
            f"    cat {err}\n"
            f"    printf '\\n{_STEP}-ERR %s\\n' \"$2\"\n"
            "  else\n"
            f"    printf '\\n{_STEP}-END %s %s 0\\n' \"$2\" \"${{rr_s:-255}}\"\n"
            "  fi\n"
            "done\n"
            '[ -n "$rr_t" ] && rm -rf "$rr_t"\n'
            "exec cat >/dev/null\n")


def _then_ended(line: str) -> bool:
    """Whether *line* is the whole ``RR-THEN-DONE <status>`` line that ends the *then* part."""
    return line.startswith(_THEN_MARK + " ") and line.endswith("\n")


def _take_then(lock: SessionLock, rest: str) -> None:
    """Give *lock* the output and status of its *then* (and *fed*) part, from *rest*.

    An early answer (:data:`EARLY_MARK`) is the output before that line, and
    *then*'s status 0 (*fed* runs only after it succeeded); what follows the
    line up to the ``RR-THEN-DONE`` line is left for the lock's next step to
    read, with what of it was read already.
    """
    lines = rest.splitlines(keepends=True)
    if EARLY_MARK + "\n" in lines:
        at = lines.index(EARLY_MARK + "\n")
        lock.then_output, lock.then_status = "".join(lines[:at]), 0
        after = lines[at + 1:]
        if not any(_then_ended(line) for line in after):
            lock._tail = "".join(after).encode("utf-8", "surrogateescape")
        return
    body, _, status = rest.rpartition(_THEN_MARK + " ")
    lock.then_output = body
    lock.then_status = int(status.split()[0]) if status.split() and status.split()[0].isdigit() else None


def _feed_channel(channel: Any, data: bytes) -> None:
    """Send *data* on the lock's *channel* (its script reads it after the lock is held)."""
    try:
        send_all_or_raise(channel, data)
    except (OSError, EOFError):  # the script ended at once (busy): its answer says why
        pass


def _feed_pipe(pipe: Any, data: bytes) -> None:
    """Write *data* to a local lock's stdin, leaving it open (closing it frees the lock)."""
    try:
        pipe.write(data)
        pipe.flush()
    except OSError:  # the script ended (busy, or failed): nothing reads it
        pass


def _read_until(read: Any, done: Any) -> str:
    """Read chunks with *read* until ``done(text)`` or end of stream; return the text."""
    data = b""
    try:
        while not done(data.decode("utf-8", "replace")):
            chunk = read()
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data.decode("utf-8", "replace")


def acquire_lock(host: str, state_dir: str, info: str, connection: Any = None,
                 timeout: float = 60.0, then: str = "", fed: str = "",
                 feed: bytes = b"") -> SessionLock:
    """Take the session lock on *host* (over *connection*, or locally when None).

    With *then*, that shell text runs on the host once the lock is held (see
    :func:`lock_script`); the returned lock carries its output and status.
    *fed* runs after it, reading *feed* from stdin. Raises
    :class:`SessionBusy` naming the holder ("pid …, run …, since …").
    """
    script = lock_script(state_dir, info, then, fed if then else "")
    feed = feed if then and fed else b""

    def done(text: str) -> bool:
        lines = text.splitlines(keepends=True)
        if not lines or not lines[0].endswith("\n"):
            return False
        if not then or not lines[0].startswith(("LOCKED", "NO-FLOCK")):
            return True
        return any(_then_ended(line) or line == EARLY_MARK + "\n" for line in lines[1:])
    feeder = None  # (the thread sending *feed* on a channel; the lock's first step waits for it)
    if connection is None:
        proc = subprocess.Popen(["/bin/sh", "-c", script], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stdin is not None
        if feed:
            threading.Thread(target=_feed_pipe, args=(proc.stdin, feed), daemon=True).start()
        out = _read_until(proc.stdout.readline, done)
        handle: Any = proc
    else:
        channel = connection.exec_channel("sh -c " + shlex.quote(script))
        # a fed check hashes what changed on the host: as long as a check of its own may take
        channel.settimeout(600.0 if feed else max(timeout, 120.0) if then else timeout)
        if feed:
            # Sent beside the read: the host lets stdin flow only once the command has
            # started, and an early answer needs none of it (see lock_script).
            feeder = threading.Thread(target=_feed_channel, args=(channel, feed), daemon=True,
                                      name=f"lock-feed-{host}")
            feeder.start()
        out = _read_until(lambda: channel.recv(65536), done)
        channel.settimeout(None)
        handle = channel
    first, _, rest = out.partition("\n")
    first = first.strip()
    lock = SessionLock(host, handle, traffic=getattr(connection, "traffic", None), _feeder=feeder)
    if first.startswith("LOCKED") or first.startswith("NO-FLOCK"):
        if then:
            _take_then(lock, rest)
        return lock
    lock.release()
    if first.startswith("BUSY"):
        holder = first[4:].strip() or "another run (no details recorded)"
        raise SessionBusy(f"host {host}: screen session directory {state_dir} is already in use "
                          f"by a running remote-runner ({holder}); wait for it to end, stop it, "
                          "or use another --screen")
    if first.startswith(_NO_DIR):
        raise StartError(f"host {host}: cannot create the state directory {state_dir} "
                         f"({first[len(_NO_DIR):].strip() or 'mkdir failed'}); the login user's home "
                         "must be writable, or --remote-done-dir must name a directory it can write")
    raise StartError(f"host {host}: could not take the session lock in {state_dir} "
                     f"({first or 'no answer'})")
