"""``python -m bench``: install the peers, bring up hosts, run the scenarios, write the results.

This is the only place that prints a report or exits; the rest of the bench
returns measurements. Progress goes to stderr as ``LEVEL: message`` lines.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
import uuid
from typing import List, Optional

from bench import ours
from bench.context import Context
from bench.results import Report, machine_facts
from bench.scenarios import SCENARIOS
from bench.testbed import Testbed

logger = logging.getLogger("bench")

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_WORK = "/var/tmp/rr-bench"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smaller data, fewer hosts and components, 1 run each (a smoke run, minutes)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    p.add_argument("--delays", default="0,10", help="link delays in ms each way (default: 0,10)")
    p.add_argument("--mirror-delays", default=None,
                   help="delays for the mirror scenario only (default: 10; it is the slow one)")
    p.add_argument("--reps", type=int, default=None, help="runs per measurement (default 3, --quick 1)")
    p.add_argument("--slow-after", type=float, default=15.0,
                   help="do not repeat a step that took longer than this many seconds (default 15)")
    p.add_argument("--mirror-timeout", type=float, default=90.0,
                   help="stop a mirror step after this many seconds and report it as '> N s' (default 90)")
    p.add_argument("--work-dir", default=DEFAULT_WORK, help=f"local data directory (default {DEFAULT_WORK})")
    p.add_argument("--out", default=DEFAULT_OUT, help="where results go (default bench/results)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get/pip install the peers")
    p.add_argument("-l", "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenario_list if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    try:
        args.delay_list = [float(d) for d in args.delays.split(",") if d.strip()]
        mirror = args.mirror_delays if args.mirror_delays is not None else str(max(args.delay_list))
        args.mirror_delay_list = [float(d) for d in mirror.split(",") if d.strip()]
    except ValueError:
        p.error("--delays/--mirror-delays take comma-separated numbers of milliseconds")
    if any(d < 0 for d in args.delay_list + args.mirror_delay_list):
        p.error("delays must be >= 0")
    args.reps = args.reps or (1 if args.quick else 3)
    return args


def install(report: Report, no_install: bool):  # type: ignore[no-untyped-def]
    """Install the peers (unless told not to); return the outrun install or None."""
    from bench import tools

    if no_install:
        report.notes.append("--no-install: peers used as found")
        return tools.ensure_outrun() if os.path.exists(tools.OUTRUN_VENV + "/bin/outrun") else None
    missing = tools.ensure_apt_tools()
    if missing:
        report.notes.append(f"could not install: {', '.join(missing)}")
    try:
        return tools.ensure_outrun()
    except Exception as exc:
        logger.warning("outrun install failed: %s", exc)
        report.notes.append(f"outrun install failed: {exc}")
        return None


def main(argv: Optional[List[str]] = None) -> int:
    """Run the bench; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        logger.error("the bench needs root (lab hosts are network and mount namespaces)")
        return 7
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    report = Report(started, machine_facts(), {
        "scenarios": ", ".join(args.scenario_list), "delays (ms each way)": args.delays,
        "mirror delays": ",".join(f"{d:g}" for d in args.mirror_delay_list),
        "runs per measurement": args.reps, "quick": args.quick,
        "not repeated when a run takes over (s)": args.slow_after, "mirror step limit (s)": args.mirror_timeout})
    tag = uuid.uuid4().hex[:6]
    report.settings["screen sessions"] = f"rrbench-{tag}-*"
    outrun = install(report, args.no_install)
    report.notes.append(ours.compile_package())
    os.makedirs(args.work_dir, exist_ok=True)
    all_delays = sorted(set(args.delay_list + args.mirror_delay_list))
    standby_dir = ours.use_own_standby()
    report.notes.append("our commands after the first are served by a standby process (README: "
                        "'The standby'), as a user's reruns are; 'no standby' rows run in-process")
    t0 = time.monotonic()
    try:
        _run_scenarios(args, report, outrun, all_delays, tag)
    finally:
        report.notes.append(f"standbys stopped at the end: {ours.stop_standbys(standby_dir)}")
    report.settings["total time (s)"] = round(time.monotonic() - t0)
    md, js = report.write(args.out)
    print(report.to_markdown())
    print(f"results: {md}\nraw data: {js}")
    return 0


def _run_scenarios(args: argparse.Namespace, report: Report, outrun, all_delays, tag: str) -> None:  # type: ignore[no-untyped-def]
    """Bring up the testbed and run each scenario, its failure a note of the report."""
    with Testbed(all_delays, 1) as testbed:
        for name in args.scenario_list:
            delays = args.mirror_delay_list if name == "mirror" else args.delay_list
            ctx = Context(testbed, delays, args.reps, args.quick, args.work_dir, outrun, args.slow_after,
                          args.mirror_timeout if name == "mirror" else 900.0, tag=tag)
            logger.info("scenario %s at %s ms", name, ",".join(f"{d:g}" for d in delays))
            t = time.monotonic()
            try:
                report.add(SCENARIOS[name].run(ctx))
            except Exception as exc:
                logger.error("scenario %s failed: %s", name, exc)
                logger.debug("%s", traceback.format_exc())
                report.notes.append(f"scenario {name} failed: {exc}")
            report.notes.extend(ctx.notes)
            report.notes.append(f"{name} took {time.monotonic() - t:.0f} s")
