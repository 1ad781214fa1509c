"""How the bench reaches our own features, and whether they exist yet.

Our features are used only through their public command lines, exactly as a
user would: ``remote_runner.py -c CONFIG -F SSH_CONFIG`` (deploy, start-up,
scale) and ``remote-runner exec -F SSH_CONFIG HOST CMD`` (mirror). A feature
that is not there (module missing, or its command not registered) makes its
scenario rows "skipped" with that reason instead of failing the bench.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

#: Runs the classic CLI in this interpreter as ``remote_runner.py`` does (works without the script
#: on PATH): a standby, once up, runs it (README "The standby").
RUNNER = [sys.executable, "-c", "from remote_runner.standby import launch; launch('classic')"]
#: Runs ``remote-runner`` subcommands in this interpreter.
TOOL = [sys.executable, "-m", "remote_runner"]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def compile_package() -> str:
    """Byte-compile our package, as ``pip install`` does; return a note for the report.

    An editable checkout run with ``PYTHONDONTWRITEBYTECODE`` set (CI, some
    shells) would otherwise compile every module from source in every run,
    about 0.1 s that no installed copy pays.
    """
    import compileall
    spec = importlib.util.find_spec("remote_runner")
    if spec is None or not spec.submodule_search_locations:
        return "our package not found: nothing byte-compiled"
    root = list(spec.submodule_search_locations)[0]
    ok = compileall.compile_dir(root, quiet=1)
    return f"our package byte-compiled first, as pip install does ({'ok' if ok else 'with errors'})"


def runner_missing() -> Optional[str]:
    """Return why our runner cannot be benchmarked yet, or None when it can."""
    for module in ("remote_runner.runner", "remote_runner.sync", "remote_runner.cli.classic"):
        if not _has_module(module):
            return f"our runner is not built yet ({module} missing)"
    return None


def mirror_missing() -> Optional[str]:
    """Return why our mirror cannot be benchmarked yet, or None when it can."""
    if not _has_module("remote_runner.cli.exec_"):
        return "our mirror is not built yet (remote_runner.cli.exec_ missing)"
    proc = subprocess.run(TOOL + ["exec", "--help"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return "our mirror is not built yet (`remote-runner exec` not registered)"
    return None


def runner_argv(config: str, ssh_config: str, screen: str, extra: Optional[List[str]] = None,
                standby: bool = True) -> List[str]:
    """Return the command line that runs *config* against the hosts of *ssh_config*
    (*standby* False: always in-process, as a first run or ``REMOTE_RUNNER_STANDBY=0`` is)."""
    prefix = [] if standby else ["env", "REMOTE_RUNNER_STANDBY=0"]
    return prefix + RUNNER + ["-c", config, "-F", ssh_config, "--screen", screen, "-l", "WARNING"] + list(extra or [])


def use_own_standby() -> str:
    """Give this bench's commands a standby directory of their own; return it (see stop_standbys)."""
    import tempfile
    folder = tempfile.mkdtemp(prefix="rrbench-sb-", dir="/tmp")
    os.environ["REMOTE_RUNNER_STANDBY_DIR"] = folder
    return folder


def stop_standbys(folder: str) -> int:
    """Stop the standbys our commands started in *folder* (by the pid each wrote), remove the
    folder; return how many were stopped."""
    import shutil
    from remote_runner.standby.server import stop_all
    stopped = stop_all(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return stopped


def exec_argv(ssh_config: str, host: str, command: List[str], stats: Optional[str] = None,
              options: Sequence[str] = ()) -> List[str]:
    """Return the command line that runs *command* on *host* inside our mirror (*stats*: counters file)."""
    return (TOOL + ["exec", "-F", ssh_config] + (["--stats", stats] if stats else []) + list(options)
            + [host] + command)


def traffic_note(stdout: bytes) -> str:
    """Summarise the per-host exec/SFTP counts of a ``--json`` run result for a row's note.

    ``each host: 3 execs, 1 steps, 0 sftp sessions, 0 sftp requests`` when every host
    did the same, else one entry per host; '' when the output has no counts
    (an older runner, or not JSON).
    """
    try:
        hosts = json.loads(stdout.decode("utf-8", "replace"))["hosts"]
        counts: Dict[str, str] = {
            h["host"]: f"{h['execs']} execs, {h.get('steps') or 0} steps, {h['sftp_sessions']} sftp "
                       f"sessions, {h['sftp_requests']} sftp requests"
            for h in hosts if h.get("execs") is not None}
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""
    if not counts:
        return ""
    if len(set(counts.values())) == 1:
        return "each host: " + next(iter(counts.values()))
    return "; ".join(f"{host}: {text}" for host, text in sorted(counts.items()))
