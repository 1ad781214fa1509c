"""Timing runs: repeat a step, keep every wall time, stop repeating what is too slow.

A scenario hands :func:`repeat` a ``prepare`` step (untimed: wipe a target,
drop a cache) and a ``step`` (timed). A failure does not abort the bench: the
row is marked skipped with the error so the table says what broke. A step
that takes longer than ``slow_after`` is not repeated, and the row says so,
which keeps a full run inside its time budget when a peer is pathologically
slow (scp over a delayed link, sshfs walking thousands of files).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from bench.procstat import Peaks, Sampler
from bench.results import Measurement

logger = logging.getLogger(__name__)


class BenchError(RuntimeError):
    """A benchmark step failed (the tool, not the measurement)."""


class StepTimeout(BenchError):
    """A benchmark step did not finish within its time limit."""

    def __init__(self, argv: Sequence[str], seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"`{' '.join(argv)[:200]}` did not finish within {seconds:g} s")


def run(argv: Sequence[str], timeout: float = 600, env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None, stdin: Optional[bytes] = None,
        peaks: Optional[Peaks] = None) -> subprocess.CompletedProcess:
    """Run *argv*; raise BenchError on failure or timeout (killing its process group).

    With *peaks*, the process is watched while it runs (see :mod:`bench.procstat`).
    """
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env) if env else None,
                            cwd=cwd, start_new_session=True)
    sampler = Sampler(proc.pid, peaks) if peaks is not None else None
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise StepTimeout(argv, timeout)
    finally:
        if sampler is not None:
            sampler.stop()
    if proc.returncode != 0:
        tail = " / ".join((err or out).decode(errors="replace").strip().splitlines()[-5:])
        if len(tail) > 600:  # keep the end: that is where the reason is
            tail = "…" + tail[-600:]
        raise BenchError(f"`{' '.join(argv)[:200]}` exited {proc.returncode}: {tail}")
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill *proc*'s process group (it was started in a new session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        proc.kill()


def repeat(m: Measurement, step: Callable[[], None], reps: int,
           prepare: Optional[Callable[[], None]] = None, slow_after: float = 120.0) -> Measurement:
    """Time *step* up to *reps* times into *m* (prepare runs untimed before each)."""
    for index in range(reps):
        if not _time_once(m, step, prepare, index) or _enough(m, index, reps, slow_after):
            break
    return m


def repeat_in_turns(entries: Sequence[Tuple[Measurement, Callable[[], None], Optional[Callable[[], None]]]],
                    reps: int, slow_after: float = 120.0) -> List[Measurement]:
    """:func:`repeat` for several tools doing one case, in turns: each round times each tool once.

    The hosts share this machine's cores, and its load drifts by more than
    the differences measured: tools timed one after the other meet different
    loads, and their ratio then says more about the drift than about them.
    Timed in turns, every round's runs meet the same load. *entries* are
    (row, step, prepare); a tool that failed, or is too slow to repeat,
    leaves the turns.
    """
    active = list(entries)
    for index in range(reps):
        for entry in list(active):
            m, step, prepare = entry
            if not _time_once(m, step, prepare, index) or _enough(m, index, reps, slow_after):
                active.remove(entry)
    return [m for m, _, _ in entries]


def _time_once(m: Measurement, step: Callable[[], None], prepare: Optional[Callable[[], None]],
               index: int) -> bool:
    """Time one run of *step* into *m*; False (*m* then says why it is skipped) when it failed."""
    try:
        if prepare is not None:
            prepare()
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
    except StepTimeout as exc:
        logger.warning("%s / %s / %s @ %g ms: over %g s", m.scenario, m.case, m.tool, m.delay_ms, exc.seconds)
        m.skipped = f"did not finish within {exc.seconds:g} s (stopped; > {exc.seconds:g} s)"
        m.runs.clear()
        return False
    except Exception as exc:  # a broken tool is a result, not a crash of the bench
        logger.warning("%s / %s / %s @ %g ms failed: %s", m.scenario, m.case, m.tool, m.delay_ms, exc)
        m.skipped = f"failed: {exc}"
        m.runs.clear()
        return False
    m.runs.append(elapsed)
    logger.info("%s / %s / %s @ %g ms: run %d: %.2f s", m.scenario, m.case, m.tool, m.delay_ms,
                index + 1, elapsed)
    return True


def _enough(m: Measurement, index: int, reps: int, slow_after: float) -> bool:
    """Whether *m* is not repeated: every run so far was slow (not one outlier), and says so."""
    if min(m.runs) > slow_after and index + 1 < reps:
        m.note = (m.note + "; " if m.note else "") + (
            f"{len(m.runs)} run(s) only: over {slow_after:g} s, not repeated")
        return True
    return False


def skipped(scenario: str, case: str, tool: str, delay_ms: float, reason: str, role: str = "peer") -> Measurement:
    """Return a row that records why nothing was measured."""
    return Measurement(scenario, case, tool, delay_ms, role=role, skipped=reason)
