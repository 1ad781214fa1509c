"""Peak threads, resident memory and open files of a benchmarked process, from /proc.

The scale rows must show that our runner's cost grows with open connections and
``--forks``, not with hosts or components, so each of its runs is watched while
it runs: a side thread reads ``/proc/<pid>/status`` and lists ``/proc/<pid>/fd``
every few milliseconds. The kernel keeps the resident-set high-water mark
(``VmHWM``) itself, so memory is exact up to the last sample; threads and file
descriptors have no such mark, so theirs are the highest seen (a burst shorter
than the interval can be missed, never over-counted).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Optional

INTERVAL = 0.01


@dataclass
class Peaks:
    """The highest values seen while one process ran."""

    threads: int = 0
    rss_kib: int = 0
    fds: int = 0
    samples: int = 0

    def describe(self) -> str:
        """Return e.g. ``peak 212 threads, 96 MiB RSS, 430 fds``."""
        return f"peak {self.threads} threads, {self.rss_kib / 1024:.0f} MiB RSS, {self.fds} fds"


def read_status(pid: int) -> Optional[dict]:
    """Return ``Threads`` and ``VmHWM`` (KiB) of *pid*, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            text = handle.read()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


class Sampler:
    """Watch one process until :meth:`stop`; the result is in :attr:`peaks`."""

    def __init__(self, pid: int, peaks: Peaks, interval: float = INTERVAL) -> None:
        self.pid, self.peaks, self.interval = pid, peaks, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        """Take one sample (nothing when the process is gone)."""
        status = read_status(self.pid)
        if not status:
            return
        try:
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            fds = 0
        peaks = self.peaks
        peaks.threads = max(peaks.threads, status.get("Threads", 0))
        peaks.rss_kib = max(peaks.rss_kib, status.get("VmHWM", 0))
        peaks.fds = max(peaks.fds, fds)
        peaks.samples += 1

    def stop(self) -> None:
        """Stop sampling and wait for the side thread."""
        self._stop.set()
        self._thread.join()
