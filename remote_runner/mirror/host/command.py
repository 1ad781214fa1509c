"""The command's process: chrooted into the mirror, as the local user, with a tty or pipes; and its end.

Why apart: the agent is a child subreaper, so when the command ends or the
link drops every descendant is found (/proc) and killed here; how a command
starts (ids before PR_SET_PDEATHSIG, controlling tty) is in one place.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
from typing import Any, Dict, List, Optional, Tuple

from .. import protocol as P
from .namespaces import PR_SET_PDEATHSIG, libc

TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414


def children_of(pid: int) -> List[int]:
    """List the direct children of *pid* (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(name))
    return out


def kill_descendants(exclude: Tuple[int, ...] = ()) -> None:
    """Kill and reap every descendant of this (subreaper) process."""
    me = os.getpid()
    for _ in range(50):
        victims = [pid for pid in children_of(me) if pid not in exclude]
        if not victims:
            return
        for pid in victims:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in victims:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass


def command_user(mode: str, boot: Dict[str, Any]) -> Optional[Tuple[int, int, List[int]]]:
    """The ids the command runs with when they are not this agent's own: (uid, gid, groups) or None.

    The command runs as the local user, so the host's kernel makes the
    permission checks the local kernel would make for that user: in a user
    namespace the local ids are already the agent's; as root on the host, a
    local user other than root gets its uid, gid and supplementary groups.
    """
    if mode != "root":
        return None
    try:
        uid, gid = int(boot.get("uid", 0)), int(boot.get("gid", 0))
        groups = [int(g) for g in boot.get("groups") or [gid]][:256]
    except (TypeError, ValueError):
        return None
    if uid == 0 or uid < 0 or gid < 0:
        return None
    return uid, gid, groups


class Command:
    """The command: spawned chrooted (or not), stdio wired to fds or pipes."""

    def __init__(self, spec: Dict[str, Any], root: Optional[str],
                 stdio: Optional[Tuple[int, int, int]] = None,
                 user: Optional[Tuple[int, int, List[int]]] = None, tmpdir: Optional[str] = None) -> None:
        self.spec = spec
        self.root = root
        self.tty = bool(spec.get("tty")) and stdio is None
        self.master: Optional[int] = None
        argv = [P.name_from_wire(a) for a in spec["argv"]]
        env = {P.name_from_wire(k): P.name_from_wire(v) for k, v in (spec.get("env") or {}).items()}
        if tmpdir is not None and os.path.normpath(env.get(b"TMPDIR") or b"/tmp") in (b"/tmp", b"/var/tmp"):
            env[b"TMPDIR"] = os.fsencode(tmpdir)  # the host's (scratch.py), unless the user chose one
        cwd = P.name_from_wire(spec.get("cwd") or "/")
        root_b = os.fsencode(root) if root else None
        slave: Optional[int] = None
        if stdio is not None:
            stdin, stdout, stderr = stdio
        elif self.tty:
            self.master, slave = os.openpty()
            set_winsize(self.master, int(spec.get("rows") or 24), int(spec.get("cols") or 80))
            stdin = stdout = stderr = slave
        else:
            stdin = stdout = stderr = subprocess.PIPE
        tty = self.tty
        umask = int(spec.get("umask", 0o022))

        def prepare() -> None:
            # Runs in the child between fork and exec: only plain syscalls here.
            os.umask(umask)
            if root_b is not None:
                os.chroot(root_b)
            try:
                os.chdir(cwd)
            except OSError:
                os.chdir(b"/")
            if user is not None:  # before PR_SET_PDEATHSIG: a change of ids clears it
                os.setgroups(user[2])
                os.setgid(user[1])
                os.setuid(user[0])
            if tty:
                import fcntl
                fcntl.ioctl(0, TIOCSCTTY, 0)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

        try:
            self.proc = subprocess.Popen(
                argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env,
                start_new_session=True, preexec_fn=prepare, close_fds=True)
        finally:
            if slave is not None:
                os.close(slave)

    def signal(self, signum: int) -> None:
        """Deliver *signum* to the command's process group."""
        try:
            os.killpg(self.proc.pid, signum)
        except OSError:
            try:
                self.proc.send_signal(signum)
            except OSError:
                pass

    def kill_group(self) -> None:
        """SIGKILL whatever is left of the command's process group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Set a terminal's window size."""
    import fcntl
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def exit_code(returncode: int) -> int:
    """Turn a Popen return code into a shell-style status."""
    return 128 - returncode if returncode < 0 else returncode
