"""This machine's end of the command's terminal: raw mode, window size, signals and stdio carried over.

Why apart: ``remote-runner exec`` makes the remote command feel local (output
written in order off the reader thread, stdin pumped, SIGINT & co. and
SIGWINCH forwarded, the terminal restored); none of it concerns files.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from remote_runner.mirror import protocol as P

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.mirror.locallink import LocalLink

FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


class OutputWriter:
    """Write command output to local fds in order, off the reader thread."""

    def __init__(self) -> None:
        self.queue: "queue.Queue[Optional[Tuple[int, bytes]]]" = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="mirror-output")
        self.thread.start()

    def put(self, fd: int, data: bytes) -> None:
        self.queue.put((fd, data))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            fd, data = item
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                continue

    def finish(self, timeout: float = 30.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)


def winsize(fd: int) -> Tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
        return size.lines, size.columns
    except OSError:
        return 24, 80


def enter_raw_mode(fd: int) -> Optional[Callable[[], None]]:
    import termios
    import tty as ttymod
    try:
        saved = termios.tcgetattr(fd)
        ttymod.setraw(fd)
    except termios.error:
        return None
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def pump_stdin(link: LocalLink, fd: int) -> None:
    while not link.lost.is_set():
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        link.flush_changes()  # what changed here before this input reaches the host before it
        link.send({"t": P.STDIN}, data)
        if not data:
            return


def forward_signals(link: LocalLink, tty_fd: Optional[int]) -> Dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    old: Dict[int, Any] = {}

    def forward(signum: int, _frame: Any) -> None:
        link.send({"t": P.SIGNAL, "n": signum})

    for name in FORWARDED_SIGNALS:
        signum = getattr(signal, name)
        old[signum] = signal.signal(signum, forward)
    if tty_fd is not None:
        def winch(_signum: int, _frame: Any) -> None:
            rows, cols = winsize(tty_fd)
            link.send({"t": P.WINCH, "rows": rows, "cols": cols})
        old[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, winch)
    return old


def restore_signals(old: Dict[int, Any]) -> None:
    for signum, handler in old.items():
        try:
            signal.signal(signum, handler)
        except (ValueError, TypeError):
            pass
