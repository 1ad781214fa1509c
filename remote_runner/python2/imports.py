"""Modules next to a config, imported as SPAR imported them: Python 2 ones translated too.

A config or muddler may ``import`` a helper module from its own directory
(that directory is first on ``sys.path`` while user code runs). Under SPAR
that helper was Python 2 as well; a plain Python 3 import would fail on it with
a SyntaxError pointing into a file the user never named. While user code runs,
:func:`importing_from` puts a finder first on ``sys.meta_path`` that takes
the ``.py`` modules (and packages) found in that directory and loads them
like the config itself: compiled by :func:`~remote_runner.python2.compile_file`,
with Python 2 builtins when translated. Nothing is written there (no
``__pycache__``), and modules found elsewhere are imported the normal way.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from types import ModuleType
from typing import Iterator, Optional, Sequence

from remote_runner.python2.source import compile_file

LOG = logging.getLogger(__name__)


class _Loader(importlib.abc.Loader):
    """Load one module file through :func:`compile_file` (no bytecode cache)."""

    def __init__(self, path: str, dialect: Optional[str]) -> None:
        self.path = path
        self.dialect = dialect

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        with open(self.path, "rb") as handle:
            source = handle.read()
        compiled = compile_file(source, self.path, self.dialect)
        if compiled.python2:
            from remote_runner.python2.runtime import python2_builtins
            LOG.info("%s: module %s read as Python 2 (%s), translated in memory", self.path,
                     module.__name__, compiled.reason)
            module.__dict__["__builtins__"] = python2_builtins()
        exec(compiled.code, module.__dict__)


class _Finder(importlib.abc.MetaPathFinder):
    """Find modules under *directory* and hand them to :class:`_Loader`."""

    def __init__(self, directory: str, dialect: Optional[str]) -> None:
        self.directory = os.path.realpath(directory)
        self.dialect = dialect

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        search = list(path) if path is not None else [self.directory]
        spec = importlib.machinery.PathFinder.find_spec(fullname, search)
        origin = getattr(spec, "origin", None) if spec is not None else None
        if not origin or not origin.endswith(".py"):
            return None
        if os.path.commonpath([os.path.realpath(origin), self.directory]) != self.directory:
            return None
        spec.loader = _Loader(origin, self.dialect)
        return spec


@contextlib.contextmanager
def importing_from(directory: str, dialect: Optional[str] = None) -> Iterator[None]:
    """While the block runs, import modules found in *directory* the way user files are read."""
    finder = _Finder(directory, dialect)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
