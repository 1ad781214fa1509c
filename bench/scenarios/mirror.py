"""Mirror: run local programs on a host through a mirror of the local file system.

Five workloads (``cat``, ``ffmpeg -version``, Python imports, a 2 s ffmpeg
encode, ``git status`` in a 5,000-file repository), each *cold* (remote caches
emptied, or a fresh mount) and *warm* (run again right after) — and, for ours,
*new host* (only the host's cache emptied: this machine's profile of the
command seeds the host) — for our
``remote-runner exec``, outrun 1.1.0, sshfs + chroot, and the plain local run
as the reference. Everything the programs read and write is on the local disk
(in the bench work directory); only the link delay differs per row. Each of
our rows notes its last run's counters (requests, waits, bytes each way,
requests answered on the host); whole programs (a big ``git status``, ``make
-j``, two test suites) are in :mod:`bench.scenarios.mirror_programs`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional

from bench import ours
from bench.scenarios import mirror_programs
from bench.context import Context
from bench.measure import repeat, run as sh, skipped
from bench.results import OURS, REFERENCE, Measurement
from bench.sshfs import SshfsMount, sftp_server
from remote_runner.mirror import protocol as P
from remote_runner.mirror.profile import ProfileSet, profiles_dir

SCENARIO = "mirror"
MIRROR_HOST_INDEX = 4
OURS_CACHE = "~/.cache/remote-runner"
OUTRUN_CACHE = "~/.outrun"


@dataclass(frozen=True)
class Workload:
    """One program to run, with the local directory it runs in."""

    name: str
    argv: List[str]
    cwd: str


def prepare_files(ctx: Context) -> str:
    """Create the input text, the 2 s clip and the git repository (once); return their directory."""
    base = os.path.join(ctx.work_dir, "mirror")
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "in.txt"), "w") as handle:
        handle.write("hello from the local disk\n" * 100)
    clip = os.path.join(base, "clip.mp4")
    if not os.path.exists(clip):
        sh(["ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
             "testsrc=duration=2:size=640x360:rate=25", "-pix_fmt", "yuv420p", clip], timeout=300)
    repo = os.path.join(base, "repo")
    mirror_programs.make_repo(repo, repo_size(ctx), lambda i: os.path.join(f"d{i // 100:02d}", f"file{i:05d}.txt"))
    return base


def repo_size(ctx: Context) -> int:
    return 500 if ctx.quick else 5000


def workloads(ctx: Context, base: str) -> List[Workload]:
    """Return the workloads, all reading and writing under *base*."""
    return [
        Workload("cat", ["cat", os.path.join(base, "in.txt")], base),
        Workload("ffmpeg -version", ["ffmpeg", "-version"], base),
        Workload("python imports", ["/usr/bin/python3", "-c",
                                    "import json, email.parser, http.client, decimal, sqlite3"], base),
        Workload("ffmpeg encode 2 s", ["ffmpeg", "-y", "-loglevel", "error", "-i", os.path.join(base, "clip.mp4"),
                                       "-c:v", "libx264", "-preset", "veryfast", os.path.join(base, "out.mp4")],
                 base),
        Workload(f"git status ({repo_size(ctx):,} files)", ["git", "status", "--porcelain"],
                 os.path.join(base, "repo")),
    ]


def measure_tool(ctx: Context, tool: str, role: str, delay: float, loads: List[Workload],
                 step_for: Callable[[Workload], Callable[[], None]],
                 cold_prepare: Callable[[Workload], Callable[[], None]],
                 warm_prepare: Optional[Callable[[], None]] = None,
                 cold_step_for: Optional[Callable[[Workload], Callable[[], None]]] = None,
                 note: str = "", extra: Optional[Callable[[Workload], List[Measurement]]] = None,
                 after: Callable[[Measurement], Measurement] = lambda m: m
                 ) -> List[Measurement]:
    """Time every workload cold (after *cold_prepare(load)*), then warm, then any *extra* rows.

    *after* sees each row as soon as it is measured (ours adds the run's counters).
    """
    rows = []
    for load in loads:
        cold = (cold_step_for or step_for)(load)
        rows.append(after(repeat(Measurement(SCENARIO, f"{load.name} / cold", tool, delay, role, note=note),
                                 cold, ctx.reps, cold_prepare(load), ctx.slow_after)))
        rows.append(after(repeat(Measurement(SCENARIO, f"{load.name} / warm", tool, delay, role, note=note),
                                 step_for(load), ctx.reps, warm_prepare, ctx.slow_after)))
        if extra is not None:
            rows += extra(load)
    return rows


def run_local(ctx: Context, loads: List[Workload]) -> List[Measurement]:
    """Time the workloads locally (the floor every mirror is compared with)."""
    rows = []
    for load in loads:
        m = repeat(Measurement(SCENARIO, f"{load.name} / warm", "local run", 0, REFERENCE),
                   lambda load=load: sh(load.argv, cwd=load.cwd, timeout=300), ctx.reps)
        rows.append(m)
    return rows


def run(ctx: Context) -> List[Measurement]:
    """Measure every tool over every delay."""
    base = prepare_files(ctx)
    loads = workloads(ctx, base)
    # The last of four hosts: the test suites of others use h1..h3, and cold runs delete caches.
    host = ctx.testbed.hosts(MIRROR_HOST_INDEX)[-1]
    rows: List[Measurement] = run_local(ctx, loads)
    stats_path = os.path.join(ctx.work_dir, f"mirror-stats-{ctx.tag}.json")
    counted = lambda m: mirror_programs.with_traffic(m, stats_path)  # noqa: E731
    ctx.notes.append(f"mirror: workloads run on {host} with cwd and files in the local {base}; cold = "
                     f"remote caches removed ({OURS_CACHE} for ours, and our local profile of the command in "
                     f"{profiles_dir()}; {OUTRUN_CACHE} for outrun) or a fresh sshfs mount (mount time "
                     f"included); 'new host' = ours with only the host's cache removed (a command this "
                     f"machine ran before, on a host that never did); a step is stopped after "
                     f"{ctx.step_timeout:g} s")
    for delay in ctx.delays:
        cfg = ctx.testbed.ssh_config(delay)
        wipe = lambda path: (lambda: ctx.on_hosts(delay, [host], f"rm -rf {path}"))
        # ours
        missing = ours.mirror_missing()
        if missing:
            rows += [skipped(SCENARIO, f"{l.name} / {c}", "remote-runner exec", delay, missing, OURS)
                     for l in loads for c in ("cold", "warm")]
        else:
            step = lambda l: (lambda: sh(ours.exec_argv(cfg, host, l.argv, stats=stats_path), cwd=l.cwd,
                                         timeout=ctx.step_timeout))

            def wipe_ours(load: Workload) -> Callable[[], None]:
                def wipe_both() -> None:  # cold: nothing known on either side
                    wipe(OURS_CACHE)()
                    argv = [P.name_to_wire(os.fsencode(a)) for a in load.argv]
                    # Its own profile and those it shares (its executable's, its directory tree's).
                    for path in ProfileSet.for_command(argv, False, load.cwd).paths:
                        try:
                            os.unlink(path)
                        except FileNotFoundError:
                            pass
                return wipe_both

            # Then a host that never ran the command, from a machine that has (its profile is kept).
            new_host = lambda l: [counted(repeat(Measurement(SCENARIO, f"{l.name} / new host", "remote-runner exec",
                                                             delay, OURS, note="host cache removed, local profile kept"),
                                                 step(l), ctx.reps, wipe(OURS_CACHE), ctx.slow_after))]
            rows += measure_tool(ctx, "remote-runner exec", OURS, delay, loads, step, wipe_ours, extra=new_host,
                                 after=counted)
        # outrun
        if ctx.outrun is None:
            rows += [skipped(SCENARIO, f"{l.name} / {c}", "outrun 1.1.0", delay, "outrun could not be installed")
                     for l in loads for c in ("cold", "warm")]
        else:
            o = ctx.outrun
            rows += measure_tool(ctx, "outrun 1.1.0", "peer", delay, loads,
                                 lambda l: (lambda: sh([o.executable, "--ssh", f"-F {cfg}", host, *l.argv],
                                                       cwd=l.cwd, env=o.env(), timeout=ctx.step_timeout)),
                                 lambda l: wipe(OUTRUN_CACHE))
        # sshfs + chroot
        if sftp_server() is None:
            rows += [skipped(SCENARIO, f"{l.name} / {c}", "sshfs + chroot", delay, "no local sftp-server")
                     for l in loads for c in ("cold", "warm")]
        else:
            mount = SshfsMount(cfg, host, f"/tmp/rr-bench-sshfs-{ctx.tag}")

            def cold_step(load: Workload):  # type: ignore[no-untyped-def]
                def step() -> None:
                    mount.mount()
                    sh(mount.run_argv(load.argv, load.cwd), timeout=ctx.step_timeout)
                return step

            try:
                rows += measure_tool(ctx, "sshfs + chroot", "peer", delay, loads,
                                     lambda l: (lambda: sh(mount.run_argv(l.argv, l.cwd), timeout=ctx.step_timeout)),
                                     lambda l: mount.unmount, cold_step_for=cold_step,
                                     note="cold includes the mount")
            finally:
                mount.unmount()
    # The local run is the same for every delay: show it in every group.
    extra = []
    for m in list(rows):
        if m.tool == "local run":
            for delay in ctx.delays:
                for case in (m.case, m.case.replace("/ warm", "/ cold")):
                    if (case, delay) != (m.case, m.delay_ms):
                        extra.append(Measurement(SCENARIO, case, m.tool, delay, REFERENCE, list(m.runs),
                                                 note="no link: same local runs in every row"))
    rows = [m for m in rows if m.tool != "local run"] + extra
    rows += mirror_programs.run(ctx, host, max(ctx.delays), stats_path)
    order = {load.name: i for i, load in enumerate(loads)}
    return sorted(rows, key=lambda m: (m.delay_ms, order.get(m.case.split(" / ")[0], 99),
                                       m.case.endswith("warm"), m.role != OURS, m.role == REFERENCE))
