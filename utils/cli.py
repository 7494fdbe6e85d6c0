"""Command-line helpers every script shares: argparse value types and one-line warnings.

A bad value is argparse's own error ("argument --rollouts: must be >= 1, got 0"), exit
status 2, never a traceback from deep inside a stage.
"""
from __future__ import annotations

import argparse
import warnings


def _number(kind: type, text: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes)."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds, patiences where 0 disables)."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number > 0 (learning rates, step sizes, timeouts, temperatures)."""
    value = _number(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = _number(float, text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def one_line_warnings() -> None:
    """Print warnings as `warning: message` (e.g. a skipped rollout file), without the
    source line Python adds by default: the user needs the file name, not our code."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
