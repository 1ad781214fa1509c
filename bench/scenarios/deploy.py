"""Deploy: 1,000 files of 4 KiB plus 3 files of 64 MiB to 4 hosts.

Three cases, each timed for every tool: *cold* (the destination is empty),
*warm* (nothing changed since the last deploy) and *one changed* (one small
file rewritten locally). Ours is the classic runner with one no-op component
per host carrying the files (so its figure also includes connecting and the
screen start of that component); the peers are ``rsync -a`` over ssh and
``scp -r``, one process per host, all hosts at once. scp has no change
detection, so only its cold case is measured. Our rows' notes give the exec
channels, SFTP sessions and SFTP requests per host of the row's last run (from
``--json``): the round trips a slower link would pay for.
"""

from __future__ import annotations

import os
from typing import List

from bench import ours
from bench.context import Context, parallel, write_random
from bench.measure import repeat, run as sh, skipped
from bench.results import OURS, Measurement

SCENARIO = "deploy"
HOSTS = 4
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


def describe(ctx: Context) -> str:
    return ("200 x 4 KiB + 3 x 4 MiB (--quick)" if ctx.quick else "1,000 x 4 KiB + 3 x 64 MiB") + f" to {HOSTS} hosts"


def touch_one(data: str) -> None:
    """Rewrite one small file with new content (same size)."""
    path = os.path.join(data, "small", "00", "f0000.dat")
    with open(path, "wb") as handle:
        handle.write(os.urandom(4096))


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
    """Measure every tool and case at every delay."""
    data = dataset(ctx)
    hosts = ctx.testbed.hosts(HOSTS)
    rows: List[Measurement] = []
    ctx.notes.append(f"deploy: {describe(ctx)}")
    for delay in ctx.delays:
        cfg = ctx.testbed.ssh_config(delay)
        screen = ctx.screen_name("deploy")
        missing = ours.runner_missing()
        tools = [("remote_runner", OURS, f"{DEST}/ours"), ("rsync -a", "peer", f"{DEST}/rsync"),
                 ("scp -r", "peer", f"{DEST}/scp")]
        for tool, role, dest in tools:
            traffic: List[str] = []  # our runs' exec/SFTP counts per host, newest last
            wipe = lambda dest=dest: ctx.on_hosts(delay, hosts, f"rm -rf {dest} && mkdir -p {dest}")
            if tool == "remote_runner":
                if missing:
                    rows += [skipped(SCENARIO, case, tool, delay, missing, OURS) for case in ("cold", "warm", "one changed")]
                    continue
                argv = ours.runner_argv(runner_config(ctx, data, hosts, dest), cfg, screen, ["--json"])
                step = lambda argv=argv: traffic.append(ours.traffic_note(sh(argv, timeout=900).stdout))
            elif tool == "rsync -a":
                step = lambda dest=dest: parallel(
                    [["rsync", "-a", "-e", f"ssh -F {cfg}", data + "/", f"{h}:{dest}/"] for h in hosts], 900)
            else:
                step = lambda dest=dest: parallel(
                    [["scp", "-q", "-r", "-F", cfg, data + "/.", f"{h}:{dest}/"] for h in hosts], 900)
            cold = repeat(Measurement(SCENARIO, "cold", tool, delay, role), step, ctx.reps, wipe, ctx.slow_after)
            rows.append(cold)
            _note_traffic(cold, traffic)
            if not cold.skipped:
                check_copied(ctx, delay, hosts, data, dest, cold)
            if tool == "scp -r":
                note = "scp has no change detection: it re-copies everything (same as cold)"
                rows += [skipped(SCENARIO, case, tool, delay, note) for case in ("warm", "one changed")]
            else:
                rows.append(repeat(Measurement(SCENARIO, "warm", tool, delay, role), step, ctx.reps,
                                   None, ctx.slow_after))
                _note_traffic(rows[-1], traffic)
                rows.append(repeat(Measurement(SCENARIO, "one changed", tool, delay, role), step, ctx.reps,
                                   lambda: touch_one(data), ctx.slow_after))
                _note_traffic(rows[-1], traffic)
            ctx.on_hosts(delay, hosts, f"rm -rf {dest}")
        ctx.quit_screens(delay, hosts, screen)
    return rows
