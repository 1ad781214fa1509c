"""Scale: connect, deploy and start on 1, 4 and 16 hosts, to see the cost per host.

Each run starts from scratch (destination wiped, sessions quit): connect,
copy a small file set (50 x 4 KiB), start one long-lived component per host.
Ours is one ``remote_runner.py`` run; the peer is, per host and all hosts at
once, ``rsync -a`` followed by one ssh that starts the screen session and
confirms its window. The note of each row gives the median divided by the
number of hosts.
"""

from __future__ import annotations

import os
import shlex
from typing import Callable, List

from bench import ours
from bench.context import Context, parallel, write_random
from bench.measure import BenchError, repeat, run as sh, skipped
from bench.results import OURS, Measurement

SCENARIO = "scale"
COUNTS = (1, 4, 16)
FILES = 50
DEST = "/root/rr-bench-scale"


def dataset(ctx: Context) -> str:
    root = os.path.join(ctx.work_dir, "scale-data")
    for i in range(FILES):
        write_random(os.path.join(root, f"f{i:03d}.dat"), 4096)
    return root


def runner_config(ctx: Context, data: str, hosts: List[str]) -> str:
    path = ctx.path("configs", f"scale-{len(hosts)}.py")
    with open(path, "w") as handle:
        handle.write("# bench: one long-lived component with a small file set per host\n"
                     f"for host in {hosts!r}:\n"
                     "    c = Component()\n"
                     "    c.name = 'worker-' + host\n"
                     "    c.host = host\n"
                     "    c.executable = '/bin/sleep'\n"
                     "    c.args = ['3600']\n"
                     f"    c.base_dir = {DEST + '/ours'!r}\n"
                     f"    c.files = util.recursive_files_dict({data!r}, '.')\n"
                     "    c.start_index = 1\n"
                     "    config.add_component(c)\n")
    return path


def peer_step(cfg: str, data: str, hosts: List[str], screen: str) -> Callable[[], None]:
    """Return the hand-written peer: rsync then start-and-confirm, per host, all hosts at once."""
    q = shlex.quote(screen)
    start = (f"cd {DEST}/peer && screen -dmS {q} /bin/sleep 3600 && i=0 && "
             f"until screen -S {q} -Q windows >/dev/null; do i=$((i+1)); [ $i -lt 400 ] || exit 1; "
             "sleep 0.02; done")
    argvs = [["sh", "-c", f"rsync -a -e {shlex.quote('ssh -F ' + cfg)} {shlex.quote(data + '/')} "
              f"{h}:{DEST}/peer/ && ssh -F {shlex.quote(cfg)} -o BatchMode=yes {h} {shlex.quote(start)}"]
             for h in hosts]
    return lambda: parallel(argvs, 600)


def run(ctx: Context) -> List[Measurement]:
    """Measure ours and the peer for every host count at the largest delay."""
    data = dataset(ctx)
    delay = max(ctx.delays)
    counts = (1, 4) if ctx.quick else COUNTS
    rows: List[Measurement] = []
    ctx.notes.append(f"scale: at {delay:g} ms each way; {FILES} x 4 KiB files and one /bin/sleep component "
                     "per host, from scratch every run; ours with -f 32 so that, like the peer, every host "
                     "is handled at once")
    for count in counts:
        try:
            hosts = ctx.testbed.hosts(count)
        except Exception as exc:  # the lab may not fit this many hosts
            rows.append(skipped(SCENARIO, f"{count} hosts", "all tools", delay, f"lab: {exc}"))
            continue
        cfg = ctx.testbed.ssh_config(delay)
        screen = ctx.screen_name(f"scale{count}")

        def reset(hosts: List[str] = hosts, screen: str = screen) -> None:
            ctx.quit_screens(delay, hosts, screen)
            ctx.on_hosts(delay, hosts, f"rm -rf {DEST} && mkdir -p {DEST}/peer")

        missing = ours.runner_missing()
        if missing:
            rows.append(skipped(SCENARIO, f"{count} hosts", "remote_runner", delay, missing, OURS))
        else:
            argv = ours.runner_argv(runner_config(ctx, data, hosts), cfg, screen, ["-f", "32"])
            rows.append(repeat(Measurement(SCENARIO, f"{count} hosts", "remote_runner", delay, OURS),
                               lambda argv=argv: sh(argv, timeout=600), ctx.reps, reset, ctx.slow_after))
        rows.append(repeat(Measurement(SCENARIO, f"{count} hosts", "rsync + ssh screen (per host, parallel)",
                                       delay), peer_step(cfg, data, hosts, screen), ctx.reps, reset,
                           ctx.slow_after))
        try:
            reset()
            ctx.on_hosts(delay, hosts, f"rm -rf {DEST}")
        except BenchError:
            pass
    for m in rows:
        if m.median is not None:
            per_host = m.median / int(m.case.split()[0])
            m.note = (m.note + "; " if m.note else "") + f"{per_host:.2f} s per host"
    return rows
