"""Start-up: 100 components (half short-lived, half long-lived) over 4 hosts.

The clock stops when every window is confirmed running: for our runner that
is when ``remote_runner.py`` returns (it confirms each window before moving
on); for the hand-written peer it is one ssh per host that creates the
session, opens every window and lists them back with ``screen -Q windows``.
SPAR's remote_runner sleeps one second after every component, so it needs at
least 100 s for this; it is shown as a reference, not run.
"""

from __future__ import annotations

import shlex
from typing import List

from bench import ours
from bench.context import Context, parallel
from bench.measure import repeat, run as sh, skipped
from bench.results import OURS, REFERENCE, Measurement

SCENARIO = "startup"
HOSTS = 4
COMPONENTS = 100


def components(count: int, hosts: List[str]) -> List[tuple]:
    """Return (name, host, argv) for *count* components spread over *hosts*."""
    out = []
    for i in range(count):
        long_lived = (i // len(hosts)) % 2 == 1
        argv = ["/bin/sleep", "3600"] if long_lived else ["/bin/true"]
        out.append((f"c{i:03d}", hosts[i % len(hosts)], argv))
    return out


def runner_config(ctx: Context, comps: List[tuple]) -> str:
    """Write a runner config starting *comps*; return its path."""
    path = ctx.path("configs", "startup.py")
    with open(path, "w") as handle:
        handle.write("# bench: many short- and long-lived components\n"
                     f"for name, host, argv in {comps!r}:\n"
                     "    c = Component()\n"
                     "    c.name = name\n"
                     "    c.host = host\n"
                     "    c.executable = argv[0]\n"
                     "    c.args = list(argv[1:])\n"
                     "    c.base_dir = '/tmp'\n"
                     "    c.start_index = 1\n"
                     "    config.add_component(c)\n")
    return path


def peer_script(screen: str, comps: List[tuple], host: str) -> str:
    """Return the shell script that opens *host*'s windows and lists them back."""
    q = shlex.quote(screen)
    # screen -dmS returns before the session accepts commands: wait for it (no fixed sleep).
    lines = [f"screen -dmS {q}",
             f"i=0; until screen -S {q} -X zombie qr >/dev/null; do i=$((i+1)); [ $i -lt 400 ] || exit 1; "
             "sleep 0.02; done"]
    for name, h, argv in comps:
        if h == host:
            lines.append(f"screen -S {q} -X screen -t {name} {' '.join(shlex.quote(a) for a in argv)}")
    lines.append(f"screen -S {q} -Q windows >/dev/null")
    return " && ".join(lines)


def run(ctx: Context) -> List[Measurement]:
    """Measure ours and the hand-written peer at every delay."""
    hosts = ctx.testbed.hosts(HOSTS)
    count = 40 if ctx.quick else COMPONENTS
    comps = components(count, hosts)
    ctx.notes.append(f"startup: {count} components over {HOSTS} hosts, every other one /bin/sleep 3600, "
                     "the rest /bin/true")
    rows: List[Measurement] = []
    for delay in ctx.delays:
        cfg = ctx.testbed.ssh_config(delay)
        screen = ctx.screen_name("startup")
        reset = lambda: ctx.quit_screens(delay, hosts, screen)
        missing = ours.runner_missing()
        if missing:
            rows.append(skipped(SCENARIO, f"{count} components", "remote_runner", delay, missing, OURS))
        else:
            argv = ours.runner_argv(runner_config(ctx, comps), cfg, screen)
            rows.append(repeat(Measurement(SCENARIO, f"{count} components", "remote_runner", delay, OURS),
                               lambda: sh(argv, timeout=600), ctx.reps, reset, ctx.slow_after))
        peer = [["ssh", "-F", cfg, "-o", "BatchMode=yes", h, peer_script(screen, comps, h)] for h in hosts]
        rows.append(repeat(Measurement(SCENARIO, f"{count} components", "ssh + screen (one script per host)",
                                       delay, note="hand-written: no files, no per-window confirmation"),
                           lambda: parallel(peer, 600), ctx.reps, reset, ctx.slow_after))
        rows.append(Measurement(SCENARIO, f"{count} components", "SPAR remote_runner", delay, REFERENCE,
                                note=f"not run: sleeps 1 s after every component, so >= {count} s"))
        reset()
    return rows
