"""Deferred imports of what paramiko loads but a run almost never uses.

Every command pays the interpreter's start-up before its first packet, and a
rerun is dominated by fixed costs. paramiko's ``config`` module imports
``invoke`` at import time only to run ``Match exec`` lines of an ssh_config; that
package (and the ``unittest.mock``, ``yaml`` and ``asyncio`` it pulls in) is
nearly half of paramiko's import time (about 80 of 180 ms here). And paramiko
sets its ``__version__`` with ``importlib.metadata.version``, a module (and an
``email`` parser) of 15-25 ms here, for a string nobody reads during a run.

:func:`defer` puts a stand-in module under the name: ``import invoke`` finds it
and returns at once, and the first attribute anyone asks of it imports the real
package, puts it in its place in :data:`sys.modules` and answers from it. So an
ssh_config with ``Match exec`` still gets the real thing, and nothing else pays
for it. (The standard library's ``LazyLoader`` cannot do this on Python 3.11: the
import statement itself reads the module's ``__spec__``, which loads it.)
The stand-in for ``importlib.metadata`` answers ``version()`` from the name of
the distribution's ``NAME-VERSION.dist-info`` directory (the name pip gives it),
and asks the real module for anything else, or when there is no such directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import types
from typing import Any, Optional

#: Modules our dependencies import at import time that a run rarely uses.
DEFERRED = ("invoke", "importlib.metadata")


class _StandIn(types.ModuleType):
    """A module that imports the real one on its first attribute lookup."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__") and attr != "__path__":
            raise AttributeError(attr)
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})
        return getattr(real, attr)


class _Metadata(_StandIn):
    """``importlib.metadata`` whose ``version()`` reads a dist-info directory's name."""

    def version(self, distribution_name: str) -> str:
        found = dist_info_version(distribution_name)
        if found is not None:
            return found
        return self.__getattr__("version")(distribution_name)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def dist_info_version(name: str) -> Optional[str]:
    """The version in the first ``NAME-VERSION.dist-info`` on ``sys.path`` (None: none found)."""
    want = _normalized(name)
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for found in names:
            if found.endswith(".dist-info"):
                project, _, version = found[:-len(".dist-info")].partition("-")
                if version and _normalized(project) == want:
                    return version
    return None


def defer(name: str) -> bool:
    """Make *name* load on first use; False when it is missing or already imported."""
    if name in sys.modules:
        return False
    try:
        if importlib.util.find_spec(name) is None:
            return False
    except (ImportError, ValueError):
        return False
    standin = (_Metadata if name == "importlib.metadata" else _StandIn)(name)
    sys.modules[name] = standin
    package, _, child = name.rpartition(".")
    if package:  # `import a.b` then `a.b.x` reads the package's attribute
        setattr(sys.modules[package], child, standin)
    return True


def defer_all() -> None:
    """Defer every module in :data:`DEFERRED`."""
    for name in DEFERRED:
        defer(name)
