"""Argument checks shared by every module: one error message per kind of bad value.

The bottom of the import graph (it imports nothing of linbias), so any module can check its
arguments without pulling in the configs.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_int", "check_positive_float", "check_real", "is_finite_number"]


def check_int(name: str, value: Any, low: int = 1, high: int | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
        high is not None and value > high
    ):
        bound = (f"an integer in {low}..{high}" if high is not None else
                 "a positive integer" if low == 1 else "a non-negative integer" if low == 0 else
                 f"an integer >= {low}")
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_positive_float(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number above 0."""
    # inf passes "> 0" yet poisons everything it touches (inf * 0 = nan), so finiteness is checked.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def check_real(name: str, value: Any, low: float, high: float = math.inf, *,
               low_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number in range."""
    if not is_finite_number(value) or value < low or (low_open and value == low) or value > high:
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def is_finite_number(value: Any) -> bool:
    """A real number, not a bool, neither nan nor infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
