"""Host CPU per screen window: ours against a bare ``screen -X screen``, measured exactly.

``python -m bench.windowcpu [ours|bare] [N]`` opens N windows running ``/bin/sleep 3600``
in a new screen session on this machine, lets them settle for 2 s, stops and quits
the session, and prints the CPU time everything took per window. The process is a
child subreaper (``PR_SET_CHILD_SUBREAPER``), so screen's daemon, every window, every
launcher and every helper they fork end up as its children; once all are reaped,
``RUSAGE_CHILDREN`` holds their whole CPU time at microsecond resolution (per-process
``/proc`` ticks round a launcher's few milliseconds down to zero). ``ours`` writes the
launchers and starts the windows exactly as a run does (:meth:`Screen.start`); ``bare``
is ``screen -dmS`` plus one ``screen -X screen`` per window. Linux only.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid

from remote_runner import screen as scr
from remote_runner.shell import LocalShell

PR_SET_CHILD_SUBREAPER = 36


def measure(mode: str, count: int) -> float:
    """Return the host CPU seconds per window of *count* windows started the *mode* way."""
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    shell = LocalShell()
    name = "rrcpu" + uuid.uuid4().hex[:6]
    state = tempfile.mkdtemp(prefix=name)
    windows = [scr.Window(f"w{i:03d}", f"w{i:03d}", state) for i in range(count)]
    try:
        if mode == "bare":
            lines = [f"screen -dmS {name}",
                     f"until screen -S {name} -X zombie qr >/dev/null 2>&1; do sleep 0.02; done"]
            lines += [f"screen -S {name} -X screen -t {w.title} /bin/sleep 3600" for w in windows]
            shell.script("\n".join(lines), 120)
        else:
            shell.script("".join(scr.printf_write(w.launcher, scr.launcher_text(
                w, ["/bin/sleep", "3600"], "/tmp", w.title)) for w in windows), 120)
            scr.Screen(shell, name, state).start(windows)
        time.sleep(2)
    finally:
        shell.script(scr.quit_sessions_script(name, 2), 60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        shutil.rmtree(state, ignore_errors=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) / count


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "ours"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    if mode not in ("ours", "bare") or count < 1:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    print(f"{mode}: {count} windows, {measure(mode, count) * 1000:.1f} ms host CPU per window")
    return 0


if __name__ == "__main__":
    sys.exit(main())
