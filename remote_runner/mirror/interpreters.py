"""What an interpreter reads before the first line of its script: sent with the interpreter.

A first run of ``python3`` on a host spends most of its start in round trips
that have nothing to do with the script: CPython's path configuration probes
for ``pyvenv.cfg`` beside the executable and above it, for the zipped
standard library and for ``os.py`` (the landmark of its library directory);
``site`` then looks at the user's and the system's site directories, lists
each for ``.pth`` files and reads them; the first import lists
``lib-dynload``; the ``encodings`` package and the library's compiled modules
are opened one by one. Each is a lookup or a listing in a directory no lookup has
listed yet: 15 round trips on Debian 12 before the script's first import.
None of it depends on the script, only on the interpreter's layout, which
is the same for every run of it; so when the host opens a CPython
executable, these names, the listings of those directories, the small
``.pth`` files and the library's bytecode come with its libraries
(:mod:`.elf`); the bytecode as siblings are (a profile keeps only what the
program then opened).

Paths are derived the way CPython derives them from the executable's real
path (``<prefix>/bin/pythonX.Y`` -> ``<prefix>/lib/pythonX.Y``), with the
site directories of upstream builds and of Debian's (``dist-packages``).
A wrong guess costs a name answered for nothing; a missed one is asked for
as before.
"""

from __future__ import annotations

import os
import re
from typing import List, Mapping

#: The executable's name once its symlinks are followed: ``python3.11``.
_CPYTHON = re.compile(r"python(\d)\.(\d+)")
#: The library's compiled modules sent with the interpreter, at most this many bytes per
#: directory: what the open of the first of them would bring anyway (its siblings, see
#: :meth:`~.sendahead.SendAhead._add_siblings`), but before the program waits for it.
BYTECODE_BYTES = 8 << 20


def startup_files(program: str, environ: Mapping[str, str]) -> List[str]:
    """What CPython at *program* reads at start: names, and directories (ending in ``/``) to list.

    [] when *program* is not a CPython interpreter.
    """
    real = os.path.realpath(program)
    found = _CPYTHON.fullmatch(os.path.basename(real))
    if found is None:
        return []
    major, minor = found.groups()
    version, tag = f"{major}.{minor}", f"{major}{minor}"
    bindir = os.path.dirname(real)
    prefix = os.path.dirname(bindir)
    stdlib = os.path.join(prefix, "lib", f"python{version}")
    # ``._pth`` beside the executable is looked for under the name it was started by
    out = [os.path.join(bindir, f"{name}._pth") for name in ("python", f"python{major}", f"python{version}")]
    out += [os.path.join(bindir, "pybuilddir.txt"), os.path.join(bindir, "Modules", "Setup.local"),
            os.path.join(bindir, "lib", f"python{version}", "os.py"),  # landmarks are searched upwards
            os.path.join(bindir, "pyvenv.cfg"), os.path.join(prefix, "pyvenv.cfg"),
            os.path.join(prefix, "lib", f"python{tag}.zip"), os.path.join(stdlib, "os.py"),
            stdlib + "/", os.path.join(stdlib, "lib-dynload") + "/",
            os.path.join(stdlib, "__pycache__") + "/",
            os.path.join(stdlib, "sitecustomize.py"),  # site imports it (Debian's: a link into /etc)
            os.path.join(stdlib, "encodings") + "/"]   # imported at start, then one codec or two
    out += bytecode(stdlib, tag) + bytecode(os.path.join(stdlib, "encodings"), tag)
    sites = [os.path.join(prefix, "local", "lib", f"python{version}", "dist-packages"),
             os.path.join(prefix, "lib", f"python{major}", "dist-packages"),
             os.path.join(prefix, "lib", f"python{version}", "dist-packages"),
             os.path.join(stdlib, "site-packages")]
    home = environ.get("HOME")
    if home and home.startswith("/"):
        out.append(os.path.join(home, ".local", "lib", f"python{version}", "site-packages"))
    for site in sites:
        out.append(site)
        try:
            entries = sorted(os.listdir(site))
        except OSError:
            continue
        out.append(site + "/")
        out += [os.path.join(site, name) for name in entries if name.endswith(".pth")]
    return out


def bytecode(directory: str, tag: str) -> List[str]:
    """The ``__pycache__/*.cpython-<tag>.pyc`` files of *directory*, ``__init__`` first, within
    :data:`BYTECODE_BYTES`."""
    cache = os.path.join(directory, "__pycache__")
    suffix = f".cpython-{tag}.pyc"
    try:
        names = sorted((n for n in os.listdir(cache) if n.endswith(suffix)),
                       key=lambda n: (not n.startswith("__init__."), n))
    except OSError:
        return []
    out: List[str] = []
    total = 0
    for name in names:
        path = os.path.join(cache, name)
        try:
            size = os.lstat(path).st_size
        except OSError:
            continue
        if total + size > BYTECODE_BYTES:
            break
        total += size
        out.append(path)
    return out
