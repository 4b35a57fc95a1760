"""argparse value types shared by every subcommand (one clear line per bad value; torch-free)."""

from __future__ import annotations

import argparse
from typing import Callable


def bounded(kind: type, lo: float | None, hi: float | None, what: str) -> Callable[[str], int | float]:
    """An argparse type: `kind` (int or float) parsed from text and checked against [lo, hi]."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


positive_int = bounded(int, 1, None, "a positive integer")
non_negative_int = bounded(int, 0, None, "an integer >= 0")
ratio = bounded(float, 0.0, 1.0, "a number in [0, 1]")
port = bounded(int, 1, 65535, "a port number in 1..65535")

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' or plain seconds -> seconds (> 0)."""
    t = text.strip().lower()
    unit = t[-1:] if t[-1:] in _DURATION_UNITS else "s"
    number = t[:-1] if t[-1:] in _DURATION_UNITS else t
    try:
        value = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 30m, 12h or 7d, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a duration > 0 like 90s, 30m, 12h or 7d, got {text!r}")
    return value


duration.__name__ = "a duration"
