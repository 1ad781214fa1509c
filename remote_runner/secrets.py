"""Secret values (the SSH password) that no line the tool prints may contain.

SPAR's configs pass the SSH password to their own helpers as a component
argument (``c.args = [options.ssh_pass]`` for a sudo wrapper), so the
password is not only in the tool's hands: it is in the plan ``--dry-run``
prints, in the "started" lines, in an error that quotes an argv. Rather than
hoping every message avoids it, the password is registered here once and the
log formatter masks it as ``***`` in every finished line, whatever logger or
exception text produced it. The forms a value takes when quoted for a shell
(``shlex.quote``) or shown as a Python literal (``repr``) are masked too, since
that is how argv lists reach messages.
"""

from __future__ import annotations

import logging
import shlex
import threading
from typing import List

MASK = "***"

_lock = threading.Lock()
_variants: List[str] = []


def register(value: object) -> None:
    """Remember *value* (a password) so that :func:`mask` hides it; None or '' is ignored."""
    if not isinstance(value, str) or not value:
        return
    forms = {value, shlex.quote(value), repr(value)[1:-1], repr(value)}
    with _lock:
        for form in forms:
            if form and form not in _variants:
                _variants.append(form)
        _variants.sort(key=len, reverse=True)  # longest first: a quoted form before its core


def forget_all() -> None:
    """Forget every registered value (for tests and long-lived callers)."""
    with _lock:
        _variants.clear()


def mask(text: str) -> str:
    """Return *text* with every registered secret replaced by ``***``."""
    with _lock:
        variants = list(_variants)
    for form in variants:
        if form in text:
            text = text.replace(form, MASK)
    return text


class MaskingFormatter(logging.Formatter):
    """A formatter whose output (message, arguments, traceback) never shows a secret."""

    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))
