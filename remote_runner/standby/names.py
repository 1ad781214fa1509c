"""Where a standby lives, whether one is wanted at all, and what its socket is named after.

Why apart: the name is the standby's whole contract with its callers. A caller
is served only by a standby whose imports and process set-up are the ones it
would have had itself, so everything those depend on goes into the digest that
names the socket (:func:`fingerprint`); and the directory is checked to be this
user's alone before a socket in it is trusted (:func:`private_directory`).
"""

from __future__ import annotations

import os
import stat
import sys
from typing import Dict, List, Optional, Tuple

ENV = "REMOTE_RUNNER_STANDBY"
DIR_ENV = "REMOTE_RUNNER_STANDBY_DIR"
DEFAULT_IDLE = 600.0

#: Environment variables an import (or the interpreter's set-up) reads: part of the socket's name.
KEY_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONUTF8", "PYTHONIOENCODING",
           "PYTHONWARNINGS", "PYTHONHASHSEED", "LANG", "LC_ALL", "LC_CTYPE", "FUSE_LIBRARY_PATH")


def idle_seconds(environ: Optional[Dict[str, str]] = None) -> Optional[float]:
    """The standby's idle time from ``$REMOTE_RUNNER_STANDBY`` (None: turned off)."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if value in ("", "1", "on", "yes", "true"):
        return DEFAULT_IDLE
    if value in ("0", "off", "no", "false"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def directory(environ: Optional[Dict[str, str]] = None) -> str:
    """Where the sockets live (not created here)."""
    env = os.environ if environ is None else environ
    if env.get(DIR_ENV):
        return env[DIR_ENV]
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "remote-runner")
    return f"/tmp/remote-runner-{os.getuid()}"


def private_directory(path: str, create: bool) -> bool:
    """True when *path* is a directory of ours nobody else can enter (made 0700 if *create*)."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def package_files(root: str) -> List[Tuple[str, int, int]]:
    found = []
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                try:
                    st = os.stat(os.path.join(top, name))
                except OSError:
                    continue
                found.append((os.path.relpath(os.path.join(top, name), root), st.st_mtime_ns, st.st_size))
    return found


def identity(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"


def limits() -> list:
    """What the child inherits from the standby rather than from its caller: resource limits,
    priority, CPU affinity, control group. The standby had the caller's; the name keeps it so."""
    import resource
    found: list = [[name, resource.getrlimit(getattr(resource, name))]
                   for name in ("RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_STACK", "RLIMIT_AS",
                                "RLIMIT_CORE", "RLIMIT_DATA", "RLIMIT_CPU", "RLIMIT_FSIZE")
                   if hasattr(resource, name)]
    try:
        found.append(["nice", os.getpriority(os.PRIO_PROCESS, 0)])
        found.append(["cpus", sorted(os.sched_getaffinity(0))])
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/self/cgroup") as src:
            found.append(["cgroup", src.read()])
    except OSError:
        pass
    return found


def fingerprint(environ: Optional[Dict[str, str]] = None) -> str:
    """A digest of everything the standby's imports and set-up depend on (see the module's doc)."""
    env = os.environ if environ is None else environ
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # remote_runner/
    namespaces = []
    for name in ("mnt", "pid", "user", "net"):
        try:
            namespaces.append(os.readlink(f"/proc/self/ns/{name}"))
        except OSError:
            namespaces.append("-")
    path = search_path()
    parts = {
        "python": [sys.executable, sys.version, list(sys.flags)],
        "path": path,
        "installed": [identity(p) for p in path],
        "package": [package, package_files(package)],
        "env": {k: env.get(k) for k in KEY_ENV},
        "who": [os.getuid(), os.geteuid(), os.getgid(), sorted(os.getgroups())],
        "root": identity("/"),
        "namespaces": namespaces,
        "limits": limits(),
    }
    try:  # the built-in module: hashlib's OpenSSL binding takes ~2 ms to import, on every command
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:
        from hashlib import sha256
    return sha256(repr(sorted(parts.items())).encode()).hexdigest()[:20]


def socket_path(folder: str, key: str) -> str:
    return os.path.join(folder, f"standby-{key}.sock")


def search_path() -> List[str]:
    """``sys.path`` with ``python -c``'s '' (the working directory) spelled out: a standby, which
    works in ``/``, must import from where this process does."""
    return [p or os.getcwd() for p in sys.path]


def usable_path() -> bool:
    """Any other relative ``sys.path`` entry would import from another directory in the standby:
    such a set-up is never served."""
    return all(not p or os.path.isabs(p) for p in sys.path)
