"""What an interpreter reads before the first line of its script: sent with the interpreter.

A first run of ``python3`` on a host spends most of its start in round trips
that have nothing to do with the script: CPython's path configuration probes
for ``pyvenv.cfg`` beside the executable and above it, for the zipped
standard library and for ``os.py`` (the landmark of its library directory);
``site`` then looks at the user's and the system's site directories, lists
each for ``.pth`` files and reads them; the first import lists
``lib-dynload``. Each is a lookup or a listing in a directory no lookup has
listed yet: 15 round trips on Debian 12 before the script's first import.
None of it depends on the script, only on the interpreter's layout, which
is the same for every run of it; so when the host opens a CPython
executable, these names, the listings of those directories and the small
``.pth`` files come with its libraries (:mod:`.elf`).

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
            os.path.join(stdlib, "sitecustomize.py")]  # site imports it (Debian's: a link into /etc)
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
