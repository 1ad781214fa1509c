"""Python 2 user files (SPAR's configs, muddlers and arg parsers), run with their meaning.

:func:`compile_file` decides (or is told, ``--python2``/``--python3``) whether
a file is Python 2, translates it in memory and compiles it with the user's
own line numbers (:mod:`.source`); :func:`builtins_for` gives a translated
file the names Python 2 code expects at run time (:mod:`.runtime`). Nothing
is ever written next to the user's file.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from remote_runner.python2.source import CompiledFile, compile_file

__all__ = ["CompiledFile", "compile_file", "builtins_for", "DIALECTS"]

#: Values of ``--python2`` / ``--python3`` (None: decide per file).
DIALECTS = ("2", "3")


def builtins_for(compiled: CompiledFile) -> Optional[Dict[str, Any]]:
    """Return the builtins a compiled file runs with (None: the normal ones)."""
    if not compiled.python2:
        return None
    from remote_runner.python2.runtime import python2_builtins
    return python2_builtins()
