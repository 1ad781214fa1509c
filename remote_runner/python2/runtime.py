"""What a translated Python 2 file finds at run time: its builtins and its ``string``.

The fixers rewrite what they can see in the text; some Python 2 behaviour
lives in names instead. A translated file therefore runs with a builtins
dictionary of its own (only its namespace gets it; nothing global changes):

* the helper the division pass calls, so ``7 / 2`` is 3 and ``7 / 2.0`` 3.5;
* Python 2 builtins a fixer can miss when they are passed around rather than
  called (``reduce``, ``cmp``, ``file``, ``unicode``, ``xrange``…);
* an ``__import__`` that gives ``import string`` a module which still has
  Python 2's functions (``string.join(words, ', ')``, ``string.atoi``,
  ``string.letters``…) on top of everything Python 3's ``string`` has.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import string as _string
import sys
import types
from typing import Any, Dict, Optional, Sequence

from remote_runner.python2.source import DIVISION_HELPER


def classic_division(left: Any, right: Any) -> Any:
    """Python 2's ``/``: floor division when both operands are ints, true division otherwise."""
    if isinstance(left, int) and isinstance(right, int):
        return left // right
    return left / right


def _cmp(a: Any, b: Any) -> int:
    return (a > b) - (a < b)


def _apply(func: Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
    return func(*args, **(kwargs or {}))


def _join(words: Sequence[str], sep: str = " ") -> str:
    return sep.join(words)


def _split(text: str, sep: Optional[str] = None, maxsplit: int = -1) -> list:
    return text.split(sep, maxsplit)


def _atoi(text: str, base: int = 10) -> int:
    return int(text, base)


def _replace(text: str, old: str, new: str, maxreplace: int = -1) -> str:
    return text.replace(old, new, maxreplace)


def _string_module() -> types.ModuleType:
    """Build Python 2's ``string``: Python 3's plus the functions Python 2 also had there."""
    module = types.ModuleType("string", _string.__doc__)
    module.__dict__.update({k: v for k, v in vars(_string).items() if not k.startswith("__")})
    module.__dict__.update(
        join=_join, joinfields=_join, split=_split, splitfields=_split, atoi=_atoi, atol=_atoi,
        atof=float, replace=_replace, letters=_string.ascii_letters,
        lowercase=_string.ascii_lowercase, uppercase=_string.ascii_uppercase,
        maketrans=str.maketrans, zfill=lambda text, width: str(text).zfill(width),
    )
    for name in ("strip", "lstrip", "rstrip", "lower", "upper", "find", "rfind", "index",
                 "rindex", "count", "ljust", "rjust", "center", "expandtabs", "capitalize",
                 "swapcase"):
        setattr(module, name, getattr(str, name))
    return module


STRING = _string_module()


def _import(name: str, globals: Any = None, locals: Any = None, fromlist: Sequence[str] = (),
            level: int = 0) -> Any:
    """``__import__`` for translated files: ``string`` is Python 2's."""
    if name == "string" and level == 0:
        return STRING
    return builtins.__import__(name, globals, locals, fromlist, level)


def python2_builtins() -> Dict[str, Any]:
    """Return a fresh builtins dictionary for one translated file."""
    names = dict(vars(builtins))
    names.update({
        DIVISION_HELPER: classic_division,
        "__import__": _import,
        "reduce": functools.reduce,
        "intern": sys.intern,
        "reload": importlib.reload,
        "cmp": _cmp,
        "apply": _apply,
        "file": open,
        "unicode": str,
        "basestring": str,
        "long": int,
        "xrange": range,
        "raw_input": input,
        "unichr": chr,
        "buffer": memoryview,
        "cmp_to_key": functools.cmp_to_key,
    })
    return names
