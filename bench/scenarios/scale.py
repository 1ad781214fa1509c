"""Scale: what each added host costs, from 1 to 200 hosts, against parallel-ssh and an ssh loop.

Every run starts from scratch (destination wiped, sessions quit) and does, on
every host: connect, copy one small file, start one long-lived component and
confirm it runs. Ours is one ``remote_runner.py`` run (``-f`` given, see
:data:`FORKS`); the peers send the file over the same connection that starts
the window: ``parallel-ssh -I`` (pssh) and a shell loop of ``ssh ... &`` with one
``wait`` per host. The case "start only" leaves the file out (the "connect and
start one component per host" target of the deploy work). The last case,
1,000 components over 200 hosts (five per host, each copying the file into its
own directory), is ours alone: it shows that components cost no threads.

Each row's note gives the median per host and, from 16 hosts on, per host added
after the first 16 (the goal: flat, at most 0.05 s); rows of ours also give the
runner's peak threads, RSS and file descriptors (:mod:`bench.procstat`) and the
connect / copy / start phases from its ``--json``. Host counts the lab cannot
hold (``Lab.up`` fails) become "skipped" rows that say why.
"""

from __future__ import annotations

import json
import os
import shlex
from typing import Callable, Dict, List, Optional, Sequence

from bench import ours
from bench.context import Context, write_random
from bench.measure import BenchError, repeat, run as sh, skipped
from bench.procstat import Peaks
from bench.results import OURS, Measurement

SCENARIO = "scale"
COUNTS = (1, 16, 64, 200)
START_COUNTS = (1, 16)
#: The 1,000-component case: this many components on each of that many hosts.
MANY = (200, 5)
#: ``-f`` for ours and ``-p`` for parallel-ssh: hosts handled at once.
FORKS = 64
DEST = "/root/rr-bench-scale"
SMALL = 4096
COPY, START = "connect + copy + start", "connect + start"
PSSH, LOOP = "parallel-ssh -I", "ssh & loop (one per host)"


def small_file(ctx: Context) -> str:
    path = os.path.join(ctx.work_dir, "scale-data", "small.dat")
    write_random(path, SMALL)
    return path


def runner_config(ctx: Context, hosts: List[str], per_host: int, data: Optional[str]) -> str:
    """Write the config: *per_host* /bin/sleep components on every host, each copying *data*."""
    path = ctx.path("configs", f"scale-{len(hosts)}x{per_host}{'-copy' if data else ''}.py")
    files = f"{{{data!r}: 'small.dat'}}" if data else "{}"
    with open(path, "w") as handle:
        handle.write("# bench: long-lived components, each with one small file\n"
                     f"for host in {hosts!r}:\n"
                     f"    for i in range({per_host}):\n"
                     "        c = Component()\n"
                     "        c.name = 'w%d' % i\n"
                     "        c.host = host\n"
                     "        c.executable = '/bin/sleep'\n"
                     "        c.args = ['3600']\n"
                     f"        c.base_dir = {DEST + '/ours/'!r} + c.name\n"
                     f"        c.files = {files}\n"
                     "        c.start_index = 1\n"
                     "        config.add_component(c)\n")
    return path


def peer_script(screen: str, copy: bool) -> str:
    """Return what a peer runs on each host: store stdin as the file, start, confirm the window."""
    q = shlex.quote(screen)
    store = "cat > small.dat && " if copy else ""
    return (f"mkdir -p {DEST}/peer && cd {DEST}/peer && {store}screen -dmS {q} /bin/sleep 3600 && "
            f"i=0 && until screen -S {q} -Q windows >/dev/null; do i=$((i+1)); "
            "[ $i -lt 400 ] || exit 1; sleep 0.02; done")


def pssh_step(ctx: Context, cfg: str, hosts: List[str], script: str,
              data: Optional[str]) -> Callable[[], None]:
    """parallel-ssh over every host, the file (if any) on each one's stdin."""
    host_file = ctx.path("scale", f"hosts-{len(hosts)}")
    with open(host_file, "w") as handle:
        handle.write("".join(h + "\n" for h in hosts))
    # -t: a host whose script hangs (seen once: `screen -Q` never answering on one of 200 hosts)
    # fails the row in two minutes, not at the step limit.
    argv = ["parallel-ssh", "-h", host_file, "-p", str(FORKS), "-t", "120", "-x", f"-F {cfg}",
            "-O", "BatchMode=yes"] + (["-I"] if data else []) + [script]
    stdin = open(data, "rb").read() if data else None

    def step() -> None:
        sh(argv, timeout=ctx.step_timeout, stdin=stdin)
    return step


def loop_step(ctx: Context, cfg: str, hosts: List[str], script: str,
              data: Optional[str]) -> Callable[[], None]:
    """The shell loop a user writes: ``ssh host script &`` for every host, then wait for each."""
    redirect = f"< {shlex.quote(data)}" if data else "-n"
    body = (f"rc=0; pids=; for h in {' '.join(map(shlex.quote, hosts))}; do "
            f"ssh -F {shlex.quote(cfg)} -o BatchMode=yes {redirect} \"$h\" {shlex.quote(script)} & "
            "pids=\"$pids $!\"; done; for p in $pids; do wait $p || rc=1; done; exit $rc")

    def step() -> None:
        sh(["sh", "-c", body], timeout=ctx.step_timeout)
    return step


def ours_step(ctx: Context, argv: List[str], peaks: Peaks, phases: Dict[str, float]) -> Callable[[], None]:
    """Our runner, watched for peaks; its ``--json`` phases kept from the last run."""
    def step() -> None:
        done = sh(argv, timeout=ctx.step_timeout, peaks=peaks)
        phases.clear()
        try:
            listed = json.loads(done.stdout.decode()).get("phases", [])
        except ValueError:
            return
        for phase in listed if isinstance(listed, list) else []:
            if isinstance(phase, dict) and isinstance(phase.get("seconds"), (int, float)):
                phases[str(phase.get("name"))] = float(phase["seconds"])
    return step


def ours_note(peaks: Peaks, phases: Dict[str, float]) -> str:
    parts = [peaks.describe()] if peaks.samples else []
    shown = [f"{p} {phases[p]:.2f} s" for p in ("connect", "prepare", "copy", "start") if p in phases]
    if shown:
        parts.append("last run: " + ", ".join(shown))
    return "; ".join(parts)


def case_rows(ctx: Context, delay: float, count: int, per_host: int, data: Optional[str],
              peers: bool, variants: Sequence[tuple] = (("remote_runner", []),)
              ) -> List[Measurement]:
    """Measure one case (hosts x components, with or without the file) for ours and the peers.

    *variants* are our runs: (tool label, extra flags).
    """
    what = COPY if data else START
    case = (f"{count * per_host:,} components on {count} hosts: {what}" if per_host > 1
            else f"{count} host{'s' if count > 1 else ''}: {what}")
    tools = ([(label, OURS) for label, _ in variants] +
             ([(PSSH, "peer"), (LOOP, "peer")] if peers else []))
    try:
        hosts = ctx.testbed.hosts(count)
        if len(hosts) < count:
            raise BenchError(f"only {len(hosts)} of {count} hosts came up")
    except Exception as exc:  # the lab may not hold this many hosts
        return [skipped(SCENARIO, case, tool, delay, f"lab cannot hold {count} hosts: {exc}", role)
                for tool, role in tools]
    cfg = ctx.testbed.ssh_config(delay)
    screen = ctx.screen_name(f"scale{count}x{per_host}{'c' if data else 's'}")

    def reset() -> None:
        ctx.quit_screens(delay, hosts, screen)
        ctx.on_hosts(delay, hosts, f"rm -rf {DEST}")

    rows: List[Measurement] = []
    missing = ours.runner_missing()
    for label, extra in variants:
        if missing:
            rows.append(skipped(SCENARIO, case, label, delay, missing, OURS))
            continue
        peaks, phases = Peaks(), {}  # type: ignore[var-annotated]
        # in-process (no standby): the peaks watched are those of the process doing the work,
        # and "from scratch" includes the runner's own start
        argv = ours.runner_argv(runner_config(ctx, hosts, per_host, data), cfg, screen,
                                ["-f", str(FORKS), "--json"] + list(extra), standby=False)
        m = repeat(Measurement(SCENARIO, case, label, delay, OURS),
                   ours_step(ctx, argv, peaks, phases), ctx.reps, reset, ctx.slow_after)
        m.note = "; ".join(x for x in (m.note, ours_note(peaks, phases)) if x)
        rows.append(m)
    if peers:
        script = peer_script(screen, data is not None)
        for tool, make in ((PSSH, pssh_step), (LOOP, loop_step)):
            rows.append(repeat(Measurement(SCENARIO, case, tool, delay),
                               make(ctx, cfg, hosts, script, data), ctx.reps, reset, ctx.slow_after))
    try:
        reset()
    except BenchError:
        pass
    return rows


def per_host_notes(rows: Sequence[Measurement]) -> None:
    """Add seconds per host, and per host added after 16, to each measured row's note."""
    by_key = {(m.tool, m.case.split(": ", 1)[-1], m.case.split()[0]): m for m in rows}
    for m in rows:
        if m.median is None or " components " in m.case:
            continue
        count = int(m.case.split()[0])
        extra = [f"{m.median / count:.3f} s per host"]
        base = by_key.get((m.tool, m.case.split(": ", 1)[-1], "16"))
        if count > 16 and base is not None and base.median is not None:
            extra.append(f"{(m.median - base.median) / (count - 16):.3f} s per host added after 16")
        m.note = "; ".join(x for x in extra + [m.note] if x)


def run(ctx: Context) -> List[Measurement]:
    """Measure every host count at the largest delay, then start-only, then 1,000 components."""
    delay = max(ctx.delays)
    data = small_file(ctx)
    counts = (1, 16) if ctx.quick else COUNTS
    ctx.notes.append(f"scale: at {delay:g} ms each way, from scratch every run; one {SMALL // 1024} KiB "
                     f"file and one /bin/sleep window per host; ours with -f {FORKS} and no standby, parallel-ssh "
                     f"with -p {FORKS}, the ssh loop with every host at once; the peers send the file "
                     "on the ssh that starts the window and confirm it with screen -Q")
    rows: List[Measurement] = []
    for count in counts:
        rows += case_rows(ctx, delay, count, 1, data, peers=True)
    for count in START_COUNTS:  # also with --settle 0: the peers' check only (see startup)
        rows += case_rows(ctx, delay, count, 1, None, peers=True,
                          variants=(("remote_runner", []),
                                    ("remote_runner --settle 0", ["--settle", "0"])))
    if not ctx.quick:
        rows += case_rows(ctx, delay, MANY[0], MANY[1], data, peers=False)
    per_host_notes(rows)
    return rows
