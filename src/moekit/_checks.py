"""Argument checks that name the parameter, the value received and what is valid."""

from __future__ import annotations

import math


def check_number(name: str, value, *, lo=None, hi=None, lo_open=False, integer=False, owner="") -> None:
    """Raise TypeError/ValueError naming ``owner.name``, the value received and the valid range."""
    what = f"{owner}: {name}" if owner else name
    if integer:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and value > hi
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{what} must lie in {rng}, got {value!r}")


def arg_number(lo=None, hi=None, *, lo_open: bool = False, integer: bool = False):
    """An ``argparse`` type: a finite number (an int if ``integer``) in ``[lo, hi]`` (``(lo, hi]``
    if ``lo_open``); anything else is a one-line usage error naming the range."""
    import argparse

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if integer else 'a number'}, got {text!r}") from None
        try:
            check_number("value", value, lo=lo, hi=hi, lo_open=lo_open, integer=integer)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None
        return value

    parse.__name__ = "int" if integer else "number"
    return parse
