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
its request from the same channel's stdin. A rerun of an unchanged experiment
then costs one exec here and one per start wave.
"""

from __future__ import annotations

import shlex
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, Optional

from remote_runner.errors import SessionBusy, StartError
from remote_runner.shell import shell_path

@dataclass
class SessionLock:
    """A held per-(host, session) lock; :meth:`release` (or a lost link) frees it."""

    host: str
    handle: Any
    #: what the command run once the lock was held printed (stdout and stderr) and its status
    then_output: str = ""
    then_status: Optional[int] = None

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


def lock_script(state_dir: str, info: str, then: str = "", fed: str = "") -> str:
    """Return the shell text that takes the session lock and holds it until stdin closes.

    *then* (shell text) runs once the lock is held, its output (stdout and
    stderr) followed by ``RR-THEN-DONE STATUS``: the first step of a run rides
    on the lock's own channel instead of costing an exec of its own. *fed*
    (shell text) runs after *then* succeeded, with the channel's stdin: it
    must read exactly the bytes the caller sent for it (the manifest check,
    whose request is too big for a command line), its output before the mark.
    """
    q = shlex.quote
    d = shell_path(state_dir)
    lock, owner = f"{d}/session.lock", f"{d}/session.owner"
    run_fed = f"if [ $s = 0 ]; then (\n{fed}\n) 2>&1; fi\n" if fed else ""
    run_then = (f"(\n{then}\n) </dev/null 2>&1\ns=$?\n{run_fed}echo \"{_THEN_MARK} $s\"\n"
                if then else "")
    return (f"mkdir -p {d} || exit 3\n"
            "if ! command -v flock >/dev/null 2>&1; then echo NO-FLOCK; else\n"
            f"exec 9>>{lock}\n"
            f"if ! flock -n 9; then echo \"BUSY $(cat {owner} 2>/dev/null)\"; exit 0; fi\n"
            f"printf '%s\\n' {q(info)} > {owner}\n"
            "echo LOCKED\nfi\n" + run_then +
            "exec cat >/dev/null\n")


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
        return any(line.startswith(_THEN_MARK) and line.endswith("\n") for line in lines[1:])
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
            try:
                channel.sendall(feed)
            except OSError:  # the script ended at once (busy): its answer says why
                pass
        out = _read_until(lambda: channel.recv(65536), done)
        channel.settimeout(None)
        handle = channel
    first, _, rest = out.partition("\n")
    first = first.strip()
    lock = SessionLock(host, handle)
    if first.startswith("LOCKED") or first.startswith("NO-FLOCK"):
        if then:
            body, _, status = rest.rpartition(_THEN_MARK + " ")
            lock.then_output = body
            lock.then_status = int(status.split()[0]) if status.split() and \
                status.split()[0].isdigit() else None
        return lock
    lock.release()
    if first.startswith("BUSY"):
        holder = first[4:].strip() or "another run (no details recorded)"
        raise SessionBusy(f"host {host}: screen session directory {state_dir} is already in use "
                          f"by a running remote-runner ({holder}); wait for it to end, stop it, "
                          "or use another --screen")
    raise StartError(f"host {host}: could not take the session lock in {state_dir} "
                     f"({first or 'no answer'})")
