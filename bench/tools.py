"""Install the peers the benchmark compares against (bench-only, never the test suite).

* rsync, sshfs, ffmpeg, git and parallel-ssh (Debian's ``pssh``) come from apt when missing.
* outrun 1.1.0 goes into a dedicated venv, :data:`OUTRUN_VENV`, built with the
  system Python (``/usr/bin/python3``) so that lab hosts, which see the local
  root through an overlay but not our own Python, can run it too. outrun must
  be installed on both ends and be on the remote's non-login PATH; instead of
  installing anything globally, a small ``ssh`` shim (first on outrun's local
  PATH) prefixes the remote ``outrun`` command with ``env PATH=...`` naming the
  venv and a directory holding an ``lsmod`` stand-in: this kernel has FUSE built
  in and no module support, and outrun refuses to start when ``lsmod`` is
  missing or does not list ``fuse``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import List, Optional

logger = logging.getLogger(__name__)

OUTRUN_VENV = "/opt/bench-outrun"
OUTRUN_VERSION = "1.1.0"
SYSTEM_PYTHON = "/usr/bin/python3"
APT_TOOLS = {"rsync": "rsync", "sshfs": "sshfs", "ffmpeg": "ffmpeg", "git": "git", "scp": "openssh-client",
             "parallel-ssh": "pssh"}

SSH_SHIM = """#!/usr/bin/python3
# bench shim: run outrun's remote side with the bench venv and lsmod stand-in on PATH.
import os, sys
args = sys.argv[1:]
if "outrun" in args:
    i = args.index("outrun")
    path = "{venv}/remote-bin:{venv}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    args[i:i] = ["env", "PATH=" + path]
os.execv("/usr/bin/ssh", ["ssh"] + args)
"""

LSMOD_STANDIN = """#!/bin/sh
# bench stand-in: this kernel has FUSE built in and no module support.
echo "Module                  Size  Used by"
echo "fuse                  0  0"
"""


@dataclass(frozen=True)
class Outrun:
    """Where the installed outrun lives and how to run it."""

    venv: str
    executable: str
    shim_dir: str

    def env(self) -> dict:
        """Return the environment outrun must run with (the ssh shim first on PATH)."""
        env = dict(os.environ)
        env["PATH"] = f"{self.shim_dir}:{self.venv}/bin:" + env.get("PATH", "/usr/bin:/bin")
        return env


def _run(argv: List[str], timeout: float = 900) -> None:
    logger.info("install: %s", " ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")


def ensure_apt_tools() -> List[str]:
    """Install missing apt tools; return the ones still missing afterwards."""
    missing = sorted({pkg for tool, pkg in APT_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        _run(["apt-get", "update", "-q"])
        _run(["apt-get", "install", "-y", "-q", *missing])
    return [tool for tool in APT_TOOLS if shutil.which(tool) is None]


def _write(path: str, content: str, mode: int = 0o755) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(content)
    os.chmod(path, mode)


def ensure_outrun(venv: str = OUTRUN_VENV) -> Optional[Outrun]:
    """Install outrun into *venv* (once) with its shims; return it, or None if impossible."""
    exe = os.path.join(venv, "bin", "outrun")
    if not os.path.exists(exe):
        if not os.path.exists(SYSTEM_PYTHON):
            logger.warning("outrun skipped: %s not found", SYSTEM_PYTHON)
            return None
        _run([SYSTEM_PYTHON, "-m", "venv", venv])
        _run([os.path.join(venv, "bin", "pip"), "install", "-q", f"outrun=={OUTRUN_VERSION}"])
    shim_dir = os.path.join(venv, "shim")
    _write(os.path.join(shim_dir, "ssh"), SSH_SHIM.format(venv=venv))
    _write(os.path.join(venv, "remote-bin", "lsmod"), LSMOD_STANDIN)
    return Outrun(venv, exe, shim_dir)
