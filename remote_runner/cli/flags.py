"""Argument types shared by the subcommands' parsers.

argparse's ``type=float`` accepts ``nan`` and ``inf``, which then slip past
every ``<= 0`` check and surface later as internal errors (after hosts were
already touched). A type function rejects them at parse time, with argparse's
usual ``argument --flag: ...`` message and exit status 2.
"""

from __future__ import annotations

import argparse
import math


def seconds(text: str) -> float:
    """A finite, positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds above 0")
    return value


def seconds_or_zero(text: str) -> float:
    """A finite number of seconds, 0 allowed (``--settle 0`` turns the settle time off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds, 0 or more")
    return value
