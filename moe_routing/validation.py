"""Argument checks shared by every constructor and setter: one message style, NaN/inf and bools rejected.

``True`` is an ``int`` and ``float('nan') < 0`` is False in Python, so the obvious ``isinstance(v, int)`` and
``v < 0`` checks accept a bool as a size and a NaN as a coefficient; these helpers do not.
"""
from __future__ import annotations

import math
from typing import Optional


def check_int(name: str, value: object, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as an int in ``[low, high]`` (either bound optional); TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int {_range_text(low, high, True, True)}, got {value!r}")
    return value


def check_float(name: str, value: object, low: Optional[float] = None, high: Optional[float] = None, *,
                low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    """``value`` as a finite float within the bounds; ints are accepted, bools, NaN and inf are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    rng = _range_text(low, high, low_inclusive, high_inclusive)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {rng}, got {value!r}".replace("  ", " "))
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        raise ValueError(f"{name} must be a finite number {rng}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _range_text(low, high, low_inclusive: bool, high_inclusive: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f">= {low}" if low_inclusive else f"> {low}"
    if low is None:
        return f"<= {high}" if high_inclusive else f"< {high}"
    return f"in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
