"""Mirror, real programs: a big ``git status``, ``make -j``, and two test suites, ours against local.

The main mirror rows (:mod:`bench.scenarios.mirror`) compare tools on program
starts. These rows ask what a user feels with whole programs that touch many
files: ``git status`` in a 50,000-file repository, ``make -j`` of a C project
of 50 files, ``chmod -R`` and ``rm -rf`` of a tree of 5,000 files made before the
session, and, over the ideal link (0 ms), five files of CPython's own test
suite and this project's ``pytest tests/test_config.py tests/test_muddle.py``.
Only our mirror and the local run are measured (the peers take minutes per
row); each of our rows notes the run's counters (``exec --stats``): requests,
waits, bytes each way and requests the host answered itself. The build and the
suites are measured with this machine's ``/tmp`` (the default: only ``$TMPDIR``
is the host's) and with ``--private-tmp``, where all their temporary files stay
on the host; the suites also with ``--local-tmpdir``, every temporary file this
machine's.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from typing import Callable, List, Optional, Sequence

from bench import ours
from bench.context import Context, git
from bench.measure import logger, repeat, run as sh, skipped
from bench.results import OURS, REFERENCE, Measurement
from remote_runner.mirror import protocol as P
from remote_runner.mirror.profile import ProfileSet

SCENARIO = "mirror"
TOOL = "remote-runner exec"
OURS_CACHE = "~/.cache/remote-runner"
PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPYTHON_TESTS = ["test_json", "test_textwrap", "test_shlex", "test_glob", "test_tempfile"]
#: The interpreter the CPython suite runs with (the host runs this machine's, through the mirror).
CPYTHON = "/usr/bin/python3"
#: Exits saying the suite ran, whatever its tests said. regrtest: 0 all passed, 2 some
#: failed, 3 the environment changed (1 is Python's own, "No module named test"; 4: none ran).
CPYTHON_RAN = (0, 2, 3)
#: pytest: 0 all passed, 1 some failed (2 interrupted, 3 internal error, 4 usage, 5 none
#: collected); "No module named pytest" is 1 too, so the module is looked for first.
PYTEST_RAN = (0, 1)
#: Options that make a different row of the same load (named in the tool column).
NAMED_OPTIONS = ("--local-tmpdir", "--private-tmp")


def ran(command: str, codes: Sequence[int]) -> str:
    """Shell text running *command* that succeeds when it exits with one of *codes*: timed
    whatever its tests say (a test failing only in the mirror is a semantics question, not a
    time), but a suite that did not run at all fails its row."""
    return f"{command}; s=$?; for ok in {' '.join(str(c) for c in codes)}; do [ $s = $ok ] && exit 0; done; exit $s"


def missing_module(python: str, module: str, how: str) -> Optional[str]:
    """Why *python* cannot run a suite needing *module* (*how*: how to get it), or None."""
    probe = [python, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"]
    try:
        found = subprocess.run(probe, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        found = False
    return None if found else f"not run: {python} has no module {module} ({how})"


def traffic(path: str) -> str:
    """Summarise (and remove) the counters ``exec --stats`` wrote for the last run; "" if none."""
    try:
        with open(path) as handle:
            stats = json.load(handle)
        os.unlink(path)
    except (OSError, ValueError):
        return ""
    host = stats.get("host") if isinstance(stats.get("host"), dict) else {}
    here = dict(host.get("answered_on_host") or {})
    own = here.pop("basis", 0)
    waited = host.get("waited_s")
    waits = f"{host.get('waits', '?')} waits" + (f", {waited:.2f} s waited" if isinstance(waited, (int, float)) else "")
    return (f"last run: {stats.get('requests', 0)} requests ({waits}), "
            f"{stats.get('bytes_sent', 0) // 1024} KiB to the host / {stats.get('bytes_received', 0) // 1024} KiB "
            f"back ({stats.get('codec') or 'uncompressed'}), {sum(here.values())} answered on the host"
            + (f", {own} files taken from the host's own disk (same release as this machine)" if own else ""))


def with_traffic(m: Measurement, stats_path: str) -> Measurement:
    """Add the last run's counters to *m*'s note."""
    line = traffic(stats_path)
    if line:
        m.note = (m.note + "; " if m.note else "") + line
    return m


def big_repo(ctx: Context) -> str:
    """A git repository of 50,000 files (2,000 in quick mode), made once; return its path."""
    count = 2000 if ctx.quick else 50000
    repo = os.path.join(ctx.work_dir, "mirror", f"repo{count}")
    make_repo(repo, count, lambda i: os.path.join(f"d{i // 500:03d}", f"s{(i // 50) % 10}", f"file{i:05d}.txt"))
    return repo


def make_repo(repo: str, count: int, name: Callable[[int], str]) -> None:
    """Make a committed git repository of *count* one-line files at *name(i)*, unless it exists."""
    marker = os.path.join(repo, ".bench-files")
    if os.path.exists(marker) and open(marker).read() == str(count):
        return
    subprocess.run(["rm", "-rf", repo], check=True)
    for i in range(count):
        path = os.path.join(repo, name(i))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(f"line {i}\n")
    git("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "bench", cwd=repo)
    with open(marker, "w") as handle:
        handle.write(str(count))


def old_tree(path: str, count: int, keep: bool) -> None:
    """*count* small files in *count* / 10 directories at *path* (kept if there with *keep*)."""
    if keep and os.path.isdir(path):
        return
    subprocess.run(["rm", "-rf", path], check=True)
    for i in range(count):
        directory = os.path.join(path, f"d{i // 100:03d}", f"s{(i // 10) % 10}")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"f{i % 10}"), "w") as handle:
            handle.write("x\n")


def c_project(ctx: Context, files: int = 50) -> str:
    """A C project of *files* sources and a Makefile, made once; return its path."""
    base = os.path.join(ctx.work_dir, "mirror", f"cproject{files}")
    os.makedirs(base, exist_ok=True)
    for i in range(files):
        with open(os.path.join(base, f"unit{i:02d}.c"), "w") as handle:
            handle.write(f'#include <stdio.h>\n#include <string.h>\n#include "common.h"\n'
                         f"int unit{i}(int x) {{ char b[64]; snprintf(b, sizeof b, \"%d\", x * {i + 1});"
                         f" return (int) strlen(b) + COMMON; }}\n")
    with open(os.path.join(base, "common.h"), "w") as handle:
        handle.write("#define COMMON 1\n")
    calls = " + ".join(f"unit{i}(argc)" for i in range(files))
    decls = "".join(f"int unit{i}(int);\n" for i in range(files))
    with open(os.path.join(base, "main.c"), "w") as handle:
        handle.write(f"{decls}int main(int argc, char **argv) {{ (void) argv; return ({calls}) == 0; }}\n")
    objects = " ".join(f"unit{i:02d}.o" for i in range(files))
    with open(os.path.join(base, "Makefile"), "w") as handle:
        handle.write(f"OBJS = main.o {objects}\nprog: $(OBJS)\n\tcc -o $@ $(OBJS)\n"
                     f"%.o: %.c common.h\n\tcc -O1 -c $< -o $@\nclean:\n\trm -f prog *.o\n")
    return base


def run(ctx: Context, host: str, delay: float, stats_path: str) -> List[Measurement]:
    """The programs at *delay* (git status, make) and, over a 0 ms link, the two test suites."""
    rows: List[Measurement] = []
    missing = ours.mirror_missing()
    repo = big_repo(ctx)
    project = c_project(ctx)
    files = f"{(2000 if ctx.quick else 50000):,} files"
    clean = lambda: sh(["make", "-s", "clean"], cwd=project)  # noqa: E731 - objects are on the local disk
    # Cold only where the first run is the question; every row is one run once over slow_after.
    rows += _measure(ctx, host, delay, [(f"git status ({files})", ["git", "status", "--porcelain"], repo, None)],
                     stats_path, missing, cold=True)
    build = [("make -j (50 C files)", ["make", "-s", "-j4"], project, clean)]
    rows += _measure(ctx, host, delay, build, stats_path, missing, cold=False)
    # A tree made here before the session: its modes changed, then the tree removed (each run
    # removes a fresh copy), as a clean-up of an old build tree or of a test suite's old runs.
    tree, count = os.path.join(ctx.work_dir, "mirror", "old-tree"), 1000 if ctx.quick else 5000
    trees = [(f"chmod -R ({count:,} files made before)", ["chmod", "-R", "g+w", tree], ctx.work_dir,
              lambda: old_tree(tree, count, keep=True)),
             (f"rm -rf ({count:,} files made before)", ["rm", "-rf", tree], ctx.work_dir,
              lambda: old_tree(tree, count, keep=False))]
    rows += _measure(ctx, host, delay, trees, stats_path, missing, cold=False)
    # The compiler's temporary files (cc1's .s for as) in the host's own /tmp.
    rows += _measure(ctx, host, delay, build, stats_path, missing, cold=False, options=["--private-tmp"],
                     local=False)
    if 0 in getattr(ctx.testbed, "delays", []):
        # Lab tests cannot reach the lab from a host (``not lab``).
        cpython = " ".join([CPYTHON, "-m", "test", "-q", *CPYTHON_TESTS])
        pytest = (f"{shlex.quote(sys.executable)} -m pytest -q -p no:cacheprovider -m 'not lab' "
                  "tests/test_config.py tests/test_muddle.py")
        suites, absent = [], []
        for name, command, codes, cwd, lacks in (
                ("CPython tests (5 files)", cpython, CPYTHON_RAN, ctx.work_dir,
                 missing_module(CPYTHON, "test." + CPYTHON_TESTS[0], "Debian: the libpython3.N-testsuite package of its version")),
                ("pytest config + muddle", pytest, PYTEST_RAN, PROJECT,
                 missing_module(sys.executable, "pytest", "pip install pytest beside the bench"))):
            if lacks:
                absent += [skipped(SCENARIO, f"{name} / warm", tool, 0, lacks, role)
                           for tool, role in (("local run", REFERENCE), (TOOL, OURS),
                                              (TOOL + " --local-tmpdir", OURS),
                                              (TOOL + " --private-tmp", OURS))]
            else:
                suites.append((name, ["/bin/sh", "-c", ran(command, codes)], cwd, None))
        rows += absent
        # The shell is the program, so this interpreter's own tree (and its venv, which may
        # lie in /tmp, not served with --private-tmp) is served by name.
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
        served = ["--export", prefix + ":ro", "--export", sys.prefix + ":ro"]
        rows += _measure(ctx, host, 0, suites, stats_path, missing, cold=False, options=served)
        # Every temporary file this machine's, as before the host's $TMPDIR (mirror/tmpdir.py).
        rows += _measure(ctx, host, 0, suites, stats_path, missing, cold=False,
                         options=served + ["--local-tmpdir"], local=False)
        # The same suites with the host's own scratch trees: their temporary files stay there.
        rows += _measure(ctx, host, 0, suites, stats_path, missing, cold=False,
                         options=served + ["--private-tmp"], local=False)
    else:
        rows += [skipped(SCENARIO, f"{name} / warm", TOOL, 0, "no 0 ms link in this bench run", OURS)
                 for name in ("CPython tests (5 files)", "pytest config + muddle")]
    return rows


def _untimed(case: str, prepare: Optional[Callable[[], None]], step: Callable[[], None]) -> None:
    """Run *step* once, untimed (a warm row's warm-up); a failure shows in the timed runs after it."""
    try:
        if prepare is not None:
            prepare()
        step()
    except Exception as exc:  # noqa: BLE001 - reported by the timed runs that follow
        logger.warning("%s / %s: warm-up run failed: %s", SCENARIO, case, exc)


def _measure(ctx: Context, host: str, delay: float, loads, stats_path: str, missing: Optional[str],
             cold: bool, options: Sequence[str] = (), local: bool = True) -> List[Measurement]:
    """Rows for each load: the local run (unless not *local*), then ours with *options*.

    ``--private-tmp`` or ``--local-tmpdir`` in *options* is named in the
    tool column: it is a different way to run the same load.
    """
    rows = []
    tool = " ".join([TOOL] + [o for o in options if o in NAMED_OPTIONS])
    for name, argv, cwd, prepare in loads:
        here = lambda argv=argv, cwd=cwd: sh(argv, cwd=cwd, timeout=ctx.step_timeout)
        if local:
            rows.append(repeat(Measurement(SCENARIO, f"{name} / warm", "local run", delay, REFERENCE),
                               here, ctx.reps, prepare, ctx.slow_after))
        if missing:
            rows.append(skipped(SCENARIO, f"{name} / warm", tool, delay, missing, OURS))
            continue
        cfg = ctx.testbed.ssh_config(delay)
        step: Callable[[], None] = lambda argv=argv, cwd=cwd: sh(
            ours.exec_argv(cfg, host, argv, stats=stats_path, options=options), cwd=cwd, timeout=ctx.step_timeout)
        if cold:
            def wipe(prepare=prepare, argv=argv, cwd=cwd) -> None:  # type: ignore[no-untyped-def]
                ctx.on_hosts(delay, [host], f"rm -rf {OURS_CACHE}")
                # Nothing known on either side: this machine's profiles of the command go too.
                for path in ProfileSet.for_command([P.name_to_wire(os.fsencode(a)) for a in argv], False, cwd).paths:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                if prepare is not None:
                    prepare()
            rows.append(with_traffic(repeat(Measurement(SCENARIO, f"{name} / cold", tool, delay, OURS,
                                                        note="host cache and local profiles removed"),
                                            step, ctx.reps, wipe, ctx.slow_after), stats_path))
        if not cold:
            # Warm means what an earlier run left on the host; the rows before these (every cold
            # row) removed the host's whole cache, so one untimed run comes first. (Without it a
            # 0 ms suite's first timed run was a first-ever run: 274 MB sent in one such row.)
            _untimed(f"{name} / warm", prepare, step)
        rows.append(with_traffic(repeat(Measurement(SCENARIO, f"{name} / warm", tool, delay, OURS),
                                        step, ctx.reps, prepare, ctx.slow_after), stats_path))
    return rows
