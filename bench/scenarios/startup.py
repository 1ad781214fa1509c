"""Start-up: 100 and 400 components (half short-lived, half long-lived) over 4 hosts,
and a rerun of an unchanged 100-component experiment.

The clock stops when every window is confirmed running: for our runner that
is when ``remote_runner.py`` returns (it confirms each window before moving
on); for the hand-written peer it is one ssh per host that creates the
session, opens every window and lists them back with ``screen -Q windows``.
SPAR's remote_runner sleeps one second after every component, so it needs at
least 100 s for this; it is shown as a reference, not run.

The rerun is the full ``remote_runner.py -c`` run a user repeats all day: the
same config again, its files unchanged on the hosts, the previous session
replaced. Its peer does the same by hand, per host: ``rsync -a`` of the files,
then one ssh that quits the old session and starts the new one. Our rows
note how many remote commands (exec channels) and SFTP sessions and requests
each host got (the run's ``--json``).
"""

from __future__ import annotations

import shlex
from typing import List

import os

from bench import ours
from bench.context import Context, parallel, write_random
from bench.measure import repeat, run as sh, skipped
from bench.results import OURS, REFERENCE, Measurement

SCENARIO = "startup"
HOSTS = 4
COMPONENTS = 100
#: (full, quick) component counts of the start-up cases
SIZES = ((100, 40), (400, 160))
#: files each host's first component carries in the rerun case
RERUN_FILES = 20
#: our runs: (tool label, extra flags, note). The default waits ``--settle`` (1 s)
#: to see that no program died right after starting, a check the peers don't make;
#: ``--settle 0`` makes the peers' check only (every window there, its program
#: started), so that row compares the same work.
VARIANTS = (
    ("remote_runner", [], "default: alive after a 1 s settle"),
    ("remote_runner --settle 0", ["--settle", "0"], "every window confirmed started, no settle"),
)


def components(count: int, hosts: List[str]) -> List[tuple]:
    """Return (name, host, argv) for *count* components spread over *hosts*."""
    out = []
    for i in range(count):
        long_lived = (i // len(hosts)) % 2 == 1
        argv = ["/bin/sleep", "3600"] if long_lived else ["/bin/true"]
        out.append((f"c{i:03d}", hosts[i % len(hosts)], argv))
    return out


def runner_config(ctx: Context, comps: List[tuple], name: str = "startup", files: str = "",
                  base_dir: str = "/tmp") -> str:
    """Write a runner config starting *comps*; return its path.

    With *files* (a local directory), each host's first component carries it.
    """
    path = ctx.path("configs", f"{name}.py")
    with open(path, "w") as handle:
        handle.write("# bench: many short- and long-lived components\n"
                     "seen = set()\n"
                     f"for name, host, argv in {comps!r}:\n"
                     "    c = Component()\n"
                     "    c.name = name\n"
                     "    c.host = host\n"
                     "    c.executable = argv[0]\n"
                     "    c.args = list(argv[1:])\n"
                     f"    c.base_dir = {base_dir!r}\n"
                     "    c.start_index = 1\n"
                     f"    if {files!r} and host not in seen:\n"
                     f"        c.files = util.recursive_files_dict({files!r}, 'data')\n"
                     "    seen.add(host)\n"
                     "    config.add_component(c)\n")
    return path


def counted(argv: List[str], box: dict):  # type: ignore[no-untyped-def]
    """Return a step running *argv* (with ``--json``) that keeps its per-host counts in box."""
    def step() -> None:
        box["traffic"] = ours.traffic_note(sh(argv, timeout=600).stdout)
    return step


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


def replace_script(screen: str) -> str:
    """Return the shell text quitting the old session *screen* and waiting until it is gone.

    Without the wait, ``screen -dmS`` may start the new session while the old
    one still answers to the name, and the script's ``-X`` commands go to the
    old one or find none ("No screen session found"): the peer then fails.
    """
    q = shlex.quote(screen)
    return (f"screen -S {q} -X quit >/dev/null 2>&1; i=0; "
            f"while screen -ls {q} >/dev/null 2>&1 && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; ")


def run(ctx: Context) -> List[Measurement]:
    """Measure ours and the hand-written peer at every delay."""
    hosts = ctx.testbed.hosts(HOSTS)
    rows: List[Measurement] = []
    for full, quick in SIZES:
        count = quick if ctx.quick else full
        rows += start_case(ctx, hosts, count)
    ctx.notes.append(f"startup: components over {HOSTS} hosts, every other one /bin/sleep 3600, "
                     "the rest /bin/true")
    rows += rerun_case(ctx, hosts, SIZES[0][1] if ctx.quick else SIZES[0][0])
    return rows


def start_case(ctx: Context, hosts: List[str], count: int) -> List[Measurement]:
    """Start *count* components from nothing: ours, the hand-written peer, SPAR's reference."""
    comps = components(count, hosts)
    case = f"{count} components"
    rows: List[Measurement] = []
    for delay in ctx.delays:
        cfg = ctx.testbed.ssh_config(delay)
        screen = ctx.screen_name(f"startup{count}")
        reset = lambda: ctx.quit_screens(delay, hosts, screen)
        missing = ours.runner_missing()
        for tool, extra, note in VARIANTS:
            if missing:
                rows.append(skipped(SCENARIO, case, tool, delay, missing, OURS))
                continue
            box: dict = {}
            argv = ours.runner_argv(runner_config(ctx, comps), cfg, screen, ["--json"] + extra)
            m = repeat(Measurement(SCENARIO, case, tool, delay, OURS),
                       counted(argv, box), ctx.reps, reset, ctx.slow_after)
            m.note = "; ".join(x for x in (m.note, note, box.get("traffic", "")) if x)
            rows.append(m)
        peer = [["ssh", "-F", cfg, "-o", "BatchMode=yes", h, peer_script(screen, comps, h)] for h in hosts]
        rows.append(repeat(Measurement(SCENARIO, case, "ssh + screen (one script per host)",
                                       delay, note="hand-written: no files, no per-window confirmation"),
                           lambda: parallel(peer, 600), ctx.reps, reset, ctx.slow_after))
        rows.append(Measurement(SCENARIO, case, "SPAR remote_runner", delay, REFERENCE,
                                note=f"not run: sleeps 1 s after every component, so >= {count} s"))
        reset()
    return rows


def rerun_case(ctx: Context, hosts: List[str], count: int) -> List[Measurement]:
    """Run an unchanged experiment again (files in place, old session replaced)."""
    comps = components(count, hosts)
    case = f"rerun, unchanged, {count} components"
    data = ctx.path("startup-rerun-data", "x")
    data = os.path.dirname(data)
    for i in range(RERUN_FILES):
        write_random(os.path.join(data, f"f{i:02d}.bin"), 4096)
    rows: List[Measurement] = []
    for delay in ctx.delays:
        cfg = ctx.testbed.ssh_config(delay)
        screen = ctx.screen_name("rerun")
        base = f"/tmp/{screen}"
        reset = lambda: ctx.quit_screens(delay, hosts, screen)
        missing = ours.runner_missing()
        for tool, extra, note in VARIANTS:
            if missing:
                rows.append(skipped(SCENARIO, case, tool, delay, missing, OURS))
                continue
            box: dict = {}
            argv = ours.runner_argv(runner_config(ctx, comps, "rerun", data, base), cfg, screen,
                                    ["--json"] + extra)
            step = counted(argv, box)
            try:
                reset()
                step()  # the first run, untimed: every later one is a rerun
                m = repeat(Measurement(SCENARIO, case, tool, delay, OURS), step,
                           ctx.reps, None, ctx.slow_after)
            except Exception as exc:  # noqa: BLE001 - a broken tool is a result
                m = skipped(SCENARIO, case, tool, delay, f"failed: {exc}", OURS)
            m.note = "; ".join(x for x in (m.note, "full -c run, old session replaced", note,
                                           box.get("traffic", "")) if x)
            rows.append(m)
        reset()
        peer = [["sh", "-c", f"rsync -a -e {shlex.quote(f'ssh -F {cfg} -o BatchMode=yes')} "
                 f"{shlex.quote(data + '/')} {h}:{shlex.quote(base + '/data/')} && "
                 f"ssh -F {shlex.quote(cfg)} -o BatchMode=yes {h} "
                 f"{shlex.quote(replace_script(screen) + peer_script(screen, comps, h))}"]
                for h in hosts]
        tool = "rsync + ssh + screen (per host)"
        try:
            parallel(peer, 600)  # the first run, untimed
        except Exception as exc:  # noqa: BLE001 - a broken tool is a result
            rows.append(skipped(SCENARIO, case, tool, delay, f"failed: {exc}"))
        else:
            rows.append(repeat(Measurement(SCENARIO, case, tool, delay,
                                           note="hand-written: rsync, quit, start; no confirmation"),
                               lambda: parallel(peer, 600), ctx.reps, None, ctx.slow_after))
        reset()
        ctx.on_hosts(delay, hosts, f"rm -rf {shlex.quote(base)}")
    return rows
