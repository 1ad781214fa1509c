"""How the bench reaches our own features, and whether they exist yet.

Our features are used only through their public command lines, exactly as a
user would: ``remote_runner.py -c CONFIG -F SSH_CONFIG`` (deploy, start-up,
scale) and ``remote-runner exec -F SSH_CONFIG HOST CMD`` (mirror). A feature
that is not there (module missing, or its command not registered) makes its
scenario rows "skipped" with that reason instead of failing the bench.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from typing import List, Optional

#: Runs the classic CLI in this interpreter (works without the console script on PATH).
RUNNER = [sys.executable, "-c", "import sys; from remote_runner.cli.classic import main; sys.exit(main())"]
#: Runs ``remote-runner`` subcommands in this interpreter.
TOOL = [sys.executable, "-m", "remote_runner"]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


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


def runner_argv(config: str, ssh_config: str, screen: str, extra: Optional[List[str]] = None) -> List[str]:
    """Return the command line that runs *config* against the hosts of *ssh_config*."""
    return RUNNER + ["-c", config, "-F", ssh_config, "--screen", screen, "-l", "WARNING"] + list(extra or [])


def exec_argv(ssh_config: str, host: str, command: List[str]) -> List[str]:
    """Return the command line that runs *command* on *host* inside our mirror."""
    return TOOL + ["exec", "-F", ssh_config, host] + command
