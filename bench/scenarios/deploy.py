"""Deploy: 1,000 files of 4 KiB plus 3 files of 64 MiB to 4 hosts, and a source tree.

The source tree is what most runs carry: 1,000 files of 2 KiB in 50
directories, nothing large; its rows are the cases with ``, source tree``.

Three cases, each timed for every tool, the tools in turns (a round runs each
once: see :func:`bench.measure.repeat_in_turns`): *cold* (the destination is empty),
*warm* (nothing changed since the last deploy) and *one changed* (one small
file rewritten locally). Ours is the classic runner with one no-op component
per host carrying the files (so its figure also includes connecting and the
screen start of that component); the peers are ``rsync -a`` over ssh and
``scp -r``, one process per host, all hosts at once. Our runs after the first
are served by the standby (a process with the runner loaded, README "The
standby"), as a user's reruns are; the ``remote_runner, no standby`` rows (warm
and one changed) run in-process, as a first run does. scp has no change
detection, so only its cold case is measured. Our rows' notes give the exec
channels, SFTP sessions and SFTP requests per host of the row's last run (from
``--json``): the round trips a slower link would pay for.
"""

from __future__ import annotations

import os
from typing import Dict, List

from bench import ours
from bench.context import Context, parallel, write_random
from bench.measure import repeat_in_turns, run as sh, skipped
from bench.results import OURS, Measurement

SCENARIO = "deploy"
HOSTS = 4
#: Our runner with the standby turned off: what a first run (or ``REMOTE_RUNNER_STANDBY=0``) costs.
NO_STANDBY = "remote_runner, no standby"
DEST = "/root/rr-bench-deploy"


def dataset(ctx: Context) -> str:
    """Create (once) the files to deploy; return their directory."""
    root = os.path.join(ctx.work_dir, "deploy-data")
    small, big = (200, 4096) if ctx.quick else (1000, 4096)
    big_size = (4 if ctx.quick else 64) << 20
    for i in range(small):
        write_random(os.path.join(root, "small", f"{i // 100:02d}", f"f{i:04d}.dat"), big)
    for i in range(3):
        write_random(os.path.join(root, "big", f"big{i}.bin"), big_size)
    return root


def source_tree(ctx: Context) -> str:
    """Create (once) a source tree: many small files in many directories; return its directory."""
    root = os.path.join(ctx.work_dir, "deploy-tree")
    dirs, files = (10, 20) if ctx.quick else (50, 20)
    for d in range(dirs):
        for i in range(files):
            write_random(os.path.join(root, f"pkg{d // 10}", f"mod{d:02d}", f"f{i:02d}.py"), 2048)
    return root


def describe(ctx: Context) -> str:
    return (("200 x 4 KiB + 3 x 4 MiB (--quick)" if ctx.quick else "1,000 x 4 KiB + 3 x 64 MiB")
            + f" to {HOSTS} hosts; source tree: "
            + ("200" if ctx.quick else "1,000") + " x 2 KiB in " + ("10" if ctx.quick else "50")
            + " directories")


def touch_one(data: str) -> None:
    """Rewrite one small file (the first in path order) with new content of the same size."""
    for dirpath, _dirs, files in sorted(os.walk(data)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            size = os.path.getsize(path)
            if size <= 64 << 10:
                with open(path, "wb") as handle:
                    handle.write(os.urandom(size))
                return


def runner_config(ctx: Context, data: str, hosts: List[str], dest: str) -> str:
    """Write a runner config that deploys *data* to *dest* on every host."""
    path = ctx.path("configs", "deploy.py")
    with open(path, "w") as handle:
        handle.write(
            "# bench: deploy a data set with a no-op component per host\n"
            f"for host in {hosts!r}:\n"
            "    c = Component()\n"
            "    c.name = 'deploy-' + host\n"
            "    c.host = host\n"
            "    c.executable = '/bin/true'\n"
            f"    c.base_dir = {dest!r}\n"
            f"    c.files = util.recursive_files_dict({data!r}, '.')\n"
            "    c.start_index = 1\n"
            "    config.add_component(c)\n")
    return path


def check_copied(ctx: Context, delay: float, hosts: List[str], data: str, dest: str, m: Measurement) -> None:
    """Mark *m* invalid unless every host has every file with the right total size."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs]
    want = f"{len(files)} {sum(os.path.getsize(f) for f in files)}"
    for host in hosts:
        got = ctx.testbed.ssh(delay, host, f"cd {dest} && find . -type f -printf '%s\\n' | "
                              "awk '{n++; s+=$1} END {print n+0, s+0}'", check=False).stdout.strip()
        if got != want:
            m.skipped = f"invalid: {host}:{dest} has {got or 'nothing'} (files bytes), expected {want}"
            return


def _note_traffic(m: Measurement, traffic: List[str]) -> None:
    """Add the exec/SFTP counts of the last of our runs to *m*'s note (and forget them)."""
    if traffic and traffic[-1]:
        m.note = (m.note + "; " if m.note else "") + traffic[-1]
    traffic.clear()


def run(ctx: Context) -> List[Measurement]:
    """Measure every tool and case at every delay, the tools in turns (see :func:`repeat_in_turns`)."""
    sets = [("", dataset(ctx), ""), (", source tree", source_tree(ctx), "-tree")]
    hosts = ctx.testbed.hosts(HOSTS)
    rows: List[Measurement] = []
    ctx.notes.append(f"deploy: {describe(ctx)}")
    for delay in ctx.delays:
        for label, data, where in sets:
            rows += _one_set(ctx, delay, hosts, label, data, where)
    return rows


def _one_set(ctx: Context, delay: float, hosts: List[str], label: str, data: str, where: str
             ) -> List[Measurement]:
    """Every tool and case for the data set *data* (its cases end with *label*)."""
    rows: List[Measurement] = []
    cfg = ctx.testbed.ssh_config(delay)
    screen = ctx.screen_name("deploy")
    missing = ours.runner_missing()
    tools = [("remote_runner", OURS, f"{DEST}{where}/ours"), (NO_STANDBY, OURS, f"{DEST}{where}/ours"),
             ("rsync -a", "peer", f"{DEST}{where}/rsync"), ("scp -r", "peer", f"{DEST}{where}/scp")]
    steps = []  # (tool, role, dest, step)
    traffic: Dict[str, List[str]] = {}  # per tool of ours: its runs' exec/SFTP counts, newest last
    for tool, role, dest in tools:
        if tool in (NO_STANDBY, "remote_runner"):
            if missing:
                rows += [skipped(SCENARIO, case + label, tool, delay, missing, OURS)
                         for case in ("cold", "warm", "one changed")]
                continue
            argv = ours.runner_argv(runner_config(ctx, data, hosts, dest), cfg, screen, ["--json"],
                                    standby=tool != NO_STANDBY)
            step = lambda argv=argv, mine=traffic.setdefault(tool, []): mine.append(  # noqa: E731
                ours.traffic_note(sh(argv, timeout=900).stdout))
        elif tool == "rsync -a":
            step = lambda dest=dest: parallel(
                [["rsync", "-a", "-e", f"ssh -F {cfg}", data + "/", f"{h}:{dest}/"] for h in hosts], 900)
        else:
            step = lambda dest=dest: parallel(
                [["scp", "-q", "-r", "-F", cfg, data + "/.", f"{h}:{dest}/"] for h in hosts], 900)
        steps.append((tool, role, dest, step))
    wipe = lambda dest: lambda: ctx.on_hosts(delay, hosts, f"rm -rf {dest} && mkdir -p {dest}")  # noqa: E731
    cold_steps = [s for s in steps if s[0] != NO_STANDBY]  # the same copy: measured warm only
    cold = repeat_in_turns([(Measurement(SCENARIO, "cold" + label, tool, delay, role), step, wipe(dest))
                            for tool, role, dest, step in cold_steps], ctx.reps, ctx.slow_after)
    for m, (tool, _, dest, _) in zip(cold, cold_steps):
        if tool == "remote_runner":
            _note_traffic(m, traffic[tool])
        if not m.skipped:
            check_copied(ctx, delay, hosts, data, dest, m)
    rows += cold
    note = "scp has no change detection: it re-copies everything (same as cold)"
    rows += [skipped(SCENARIO, case + label, tool, delay, note) for case in ("warm", "one changed")
             for tool, _, _, _ in steps if tool == "scp -r"]
    changing = [(tool, role, step) for tool, role, _, step in steps if tool != "scp -r"]
    for case, prepare in (("warm", None), ("one changed", lambda: touch_one(data))):
        # one changed: each tool's run follows a rewrite of the same file, so each finds
        # exactly that file changed since its own last run
        measured = repeat_in_turns([(Measurement(SCENARIO, case + label, tool, delay, role), step, prepare)
                                    for tool, role, step in changing], ctx.reps, ctx.slow_after)
        for m in measured:
            if m.tool in traffic:
                _note_traffic(m, traffic[m.tool])
        rows += measured
    for dest in sorted({dest for _, _, dest, _ in steps}):
        ctx.on_hosts(delay, hosts, f"rm -rf {dest}")
    ctx.quit_screens(delay, hosts, screen)
    return rows
