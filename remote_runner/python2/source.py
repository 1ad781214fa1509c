"""Reading a user's file as Python 2: detection, translation, and line numbers.

SPAR ran configs, muddlers and arg parsers with ``execfile`` under Python 2, so
the files its users have are Python 2: some do not even compile as Python 3
(``print x``, ``except E, e``, ``0755``), others compile and fail only when run
(``xrange``, ``d.iteritems()``, a float from ``/`` reaching ``range()``).

* **Detection.** A file is read as Python 2 when it does not compile as
  Python 3, or when it uses what only Python 2 has: a builtin Python 3 lacks
  (``xrange``, ``unicode``, ``raw_input``…) and the file does not define
  itself, a Python-2-only method (``.iteritems()``, ``.has_key()``…), a
  function the ``string`` module lost (``string.join``), ``sys.maxint``, or a
  ``print`` statement that happens to parse (``print``, ``print >>f, x``).
  ``--python2``/``--python3`` override the guess.
* **Translation** is done in memory by fissix (a maintained fork of lib2to3:
  its fixers know the Python 2 grammar and idioms far better than a home-made
  pass would), minus two fixers: ``import`` (it turns ``import helper`` into a
  package-relative import, which a config is not) and ``future`` (the
  ``__future__`` imports are valid Python 3 and tell us about ``division``).
* **Python 2 meaning** that no fixer restores: ``/`` between two ints floors
  (unless the file imports ``division`` from ``__future__``). An AST pass turns
  every ``a / b`` into a call of a runtime helper, and ``x /= y`` into
  ``x = helper(x, y)``.
* **Line numbers** must stay those of the user's file: tracebacks, our
  ``file:line`` errors and the source line we quote come from the original.
  Most fixers keep the line count; the few that add lines (an import added by
  a fixer, tuple parameters unpacked) are mapped back by aligning the two
  texts, and every AST node gets its original line before compiling.
"""

from __future__ import annotations

import ast
import atexit
import copy
import difflib
import io
import logging
import os
import shutil
import sys
import tempfile
import threading
import tokenize
from dataclasses import dataclass
from types import CodeType
from typing import Any, Dict, List, Optional, Set

#: The name of the runtime helper the division pass calls (see ``runtime``).
DIVISION_HELPER = "__remote_runner_py2_div__"

PY2_BUILTINS = frozenset({
    "xrange", "raw_input", "unicode", "basestring", "execfile", "long", "unichr", "reduce",
    "file", "cmp", "apply", "buffer", "intern", "coerce", "reload",
})
PY2_METHODS = frozenset({
    "iteritems", "itervalues", "iterkeys", "has_key", "viewitems", "viewkeys", "viewvalues",
    "getcwdu", "xreadlines",
})
PY2_STRING_FUNCTIONS = frozenset({
    "join", "joinfields", "split", "splitfields", "letters", "lowercase", "uppercase", "atoi",
    "atol", "atof", "strip", "lstrip", "rstrip", "replace", "lower", "upper", "find", "rfind",
    "index", "rindex", "count", "zfill", "ljust", "rjust", "center", "maketrans", "expandtabs",
    "capitalize", "swapcase",
})
_SKIPPED_FIXERS = ("fix_import", "fix_future")


@dataclass(frozen=True)
class CompiledFile:
    """A user's file compiled, and whether (and why) it was read as Python 2."""

    code: CodeType
    python2: bool = False
    reason: str = ""


def compile_file(source: bytes, path: str, dialect: Optional[str] = None) -> CompiledFile:
    """Compile *source* (the bytes of *path*) as Python 3, or as Python 2 when it needs that.

    *dialect* is ``"2"`` or ``"3"`` to force one, None to decide. Raises
    SyntaxError (with *path* and a line of the original file): the Python 3
    error for a file that is neither valid Python 3 nor Python 2, the Python 2
    error for a file forced to Python 2.
    """
    if dialect == "3":
        return CompiledFile(compile(source, path, "exec", dont_inherit=True))
    tree: Optional[ast.Module] = None
    py3_error: Optional[SyntaxError] = None
    reason = "--python2"
    if dialect != "2":
        try:
            tree = ast.parse(source, path)
        except SyntaxError as exc:
            py3_error = exc
            reason = f"not valid Python 3 at line {exc.lineno}"
        else:
            found = python2_only_use(tree)
            if not found:
                return CompiledFile(compile(tree, path, "exec", dont_inherit=True))
            reason = f"uses {found}"
    try:
        code = compile_python2(_decode(source), path)
    except SyntaxError:
        if py3_error is not None:
            raise py3_error from None
        if tree is None:  # forced to Python 2 and it is not
            raise
        logging.getLogger(__name__).debug("%s: not valid Python 2 either; read as Python 3", path)
        return CompiledFile(compile(tree, path, "exec", dont_inherit=True))
    return CompiledFile(code, True, reason)


# --------------------------------------------------------------------------- detection

def python2_only_use(tree: ast.Module) -> str:
    """Return what in valid-Python-3 *tree* only makes sense in Python 2 ('' if nothing)."""
    bound = _bound_names(tree)
    imported = {(alias.asname or alias.name) for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id in PY2_BUILTINS and node.id not in bound:
                return f"{node.id} (line {node.lineno})"
        elif isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if node.attr in PY2_METHODS:
                return f".{node.attr} (line {node.lineno})"
            if owner == "string" and node.attr in PY2_STRING_FUNCTIONS and "string" in imported:
                return f"string.{node.attr} (line {node.lineno})"
            if owner == "sys" and node.attr == "maxint":
                return f"sys.maxint (line {node.lineno})"
        elif isinstance(node, ast.Expr) and _is_print_statement(node.value):
            return f"a print statement (line {node.lineno})"
    return ""


def _is_print_statement(value: ast.expr) -> bool:
    """Tell whether an expression statement is Python 2's ``print`` / ``print >>f, x``."""
    first = value.elts[0] if isinstance(value, ast.Tuple) and value.elts else value
    if isinstance(first, ast.BinOp) and isinstance(first.op, ast.RShift):
        first = first.left
    return isinstance(first, ast.Name) and first.id == "print"


def _bound_names(tree: ast.Module) -> Set[str]:
    """Return every name the file binds anywhere (assignments, defs, imports, parameters)."""
    bound: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound


# --------------------------------------------------------------------------- translation

_tool_lock = threading.Lock()
_tools: Dict[bool, object] = {}


def compile_python2(text: str, path: str) -> CodeType:
    """Translate Python 2 *text* in memory and compile it with Python 2 meaning."""
    if not text.endswith("\n"):
        text += "\n"
    translated = translate(text, path)
    try:
        tree = ast.parse(translated, path)
    except TabError:  # Python 2 allowed mixing tabs and spaces: a tab reaches the next 8
        translated = "".join(_expand_indent_tabs(line)
                             for line in translated.splitlines(keepends=True))
        tree = ast.parse(translated, path)
    except SyntaxError as exc:
        exc.lineno = line_map(text, translated).get(exc.lineno or 0, exc.lineno)
        exc.text = None
        raise
    if not _imports_division(tree):
        tree = ClassicDivision().visit(tree)
    mapping = line_map(text, translated)
    if any(new != old for new, old in mapping.items()):
        _renumber(tree, mapping)
    ast.fix_missing_locations(tree)
    return compile(tree, path, "exec", dont_inherit=True)


def translate(text: str, path: str) -> str:
    """Return *text* translated by fissix's Python 2 fixers (raises SyntaxError)."""
    # The tool first: where the user's cache directory cannot be written, making
    # it imports fissix a second time, and only the second import's error
    # classes are the ones its parser raises.
    tool = _refactoring_tool()
    from fissix.pgen2.parse import ParseError
    from fissix.pgen2.tokenize import TokenError

    try:
        with _tool_lock:
            return str(tool.refactor_string(text, path))
    except ParseError as exc:
        line = exc.context[1][0] if exc.context else None
        raise _syntax_error(f"invalid Python 2 syntax near {exc.value!r}", path, line) from None
    except TokenError as exc:
        line = exc.args[1][0] if len(exc.args) > 1 else None
        raise _syntax_error(f"invalid Python 2: {exc.args[0]}", path, line) from None
    except (IndentationError, SyntaxError) as exc:
        raise _syntax_error(f"invalid Python 2: {exc.msg}", path, exc.lineno) from None


def _syntax_error(message: str, path: str, line: Optional[int]) -> SyntaxError:
    error = SyntaxError(message)
    error.filename, error.lineno = path, line
    return error


def _refactoring_tool() -> object:
    """Return the (cached) fissix refactoring tool; fissix's import-time logging is kept quiet."""
    with _tool_lock:
        tool = _tools.get(True)
        if tool is None:
            refactor = _import_fissix()

            class QuietTool(refactor.RefactoringTool):
                def log_message(self, msg: str, *args: object) -> None:
                    pass

                def log_debug(self, msg: str, *args: object) -> None:
                    pass

            fixers = [name for name in refactor.get_fixers_from_package("fissix.fixes")
                      if name.rsplit(".", 1)[-1] not in _SKIPPED_FIXERS]
            tool = _tools[True] = QuietTool(fixers)
        return tool


def _import_fissix() -> Any:
    """Import fissix's refactoring module, quietly, even where ~/.cache is not writable.

    fissix logs "Generating grammar tables" on the root logger the first time and
    keeps the generated tables in the user's cache directory; if that directory
    cannot be created, it is pointed at a private temporary one and tried again.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        try:
            from fissix import refactor
        except OSError:
            for name in [m for m in sys.modules if m == "fissix" or m.startswith("fissix.")]:
                del sys.modules[name]
            saved = os.environ.get("XDG_CACHE_HOME")
            private = tempfile.mkdtemp(prefix="remote-runner-fissix-")
            atexit.register(shutil.rmtree, private, True)  # (read until the end: gone with the process)
            os.environ["XDG_CACHE_HOME"] = private
            try:
                from fissix import refactor  # its cache path is fixed at import
            finally:
                if saved is None:
                    del os.environ["XDG_CACHE_HOME"]
                else:
                    os.environ["XDG_CACHE_HOME"] = saved
    finally:
        logging.disable(previous)
    return refactor


def _decode(source: bytes) -> str:
    """Decode a file's bytes by its coding cookie (UTF-8 by default; Latin-1 as a last resort)."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(source).readline)
        return source.decode(encoding)
    except (SyntaxError, LookupError, UnicodeDecodeError):
        return source.decode("latin-1")


def _expand_indent_tabs(line: str) -> str:
    stripped = line.lstrip(" \t")
    return line[:len(line) - len(stripped)].expandtabs(8) + stripped


# --------------------------------------------------------------------------- division

def _imports_division(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
               and any(alias.name == "division" for alias in node.names)
               for node in tree.body)


class ClassicDivision(ast.NodeTransformer):
    """Give ``/`` its Python 2 meaning: ints floor, anything else divides truly."""

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        if not isinstance(node.op, ast.Div):
            return node
        return ast.copy_location(_helper_call(node.left, node.right), node)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self.generic_visit(node)
        if not isinstance(node.op, ast.Div):
            return node
        current = copy.deepcopy(node.target)
        current.ctx = ast.Load()
        assign = ast.Assign(targets=[node.target], value=_helper_call(current, node.value))
        return ast.copy_location(assign, node)


def _helper_call(left: ast.expr, right: ast.expr) -> ast.Call:
    return ast.Call(func=ast.Name(id=DIVISION_HELPER, ctx=ast.Load()), args=[left, right],
                    keywords=[])


# --------------------------------------------------------------------------- line numbers

def line_map(original: str, translated: str) -> Dict[int, int]:
    """Map each line of *translated* (1-based) to the line of *original* it came from."""
    old: List[str] = original.splitlines()
    new: List[str] = translated.splitlines()
    if len(old) == len(new):
        return {n: n for n in range(1, len(new) + 1)}
    mapping: Dict[int, int] = {}
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        for offset, j in enumerate(range(j1, j2)):
            if tag == "equal":
                i = i1 + offset
            elif tag == "replace":
                i = min(i1 + offset, i2 - 1)
            else:  # inserted lines belong to the line they were inserted before
                i = min(i1, max(len(old) - 1, 0))
            mapping[j + 1] = i + 1
    return mapping


def _renumber(tree: ast.AST, mapping: Dict[int, int]) -> None:
    """Give every node of *tree* the original line numbers."""
    for node in ast.walk(tree):
        for attr in ("lineno", "end_lineno"):
            value = getattr(node, attr, None)
            if value is not None:
                setattr(node, attr, mapping.get(value, value))
        if getattr(node, "end_lineno", None) is None or getattr(node, "lineno", None) is None:
            continue
        if node.end_lineno < node.lineno:
            node.end_lineno = node.lineno
        if node.end_lineno == node.lineno and (node.end_col_offset or 0) < (node.col_offset or 0):
            node.end_col_offset = node.col_offset
