"""Range checks for options and arguments, shared by every entry point (Python API, CLI, notebooks).

Each raises a ValueError that names the option, what came in and what is allowed.

>>> check_count(3, "batch_size", minimum=1)
3
>>> check_fraction(0.5, "k")
0.5
"""

from __future__ import annotations

import math

MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3


def is_real(value) -> bool:
    """A finite int or float (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_temperature(temperature) -> float:
    """ValueError unless `temperature` is a number in [1e-3, 1e3] (outside it, logits / T overflow or flatten)."""
    if not is_real(temperature) or not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got "
                         f"{temperature!r}; KD uses 1 (ATKD) to about 10.")
    return float(temperature)


def check_count(value, name: str, *, minimum: int) -> int:
    """ValueError unless `value` is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_fraction(value, name: str) -> float:
    """ValueError unless `value` is a number in (0, 1] (e.g. the fraction of hard tokens)."""
    if not is_real(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}.")
    return float(value)


def check_positive(value, name: str, *, hint: str = "") -> float:
    """ValueError unless `value` is a finite number > 0."""
    if not is_real(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.{' ' + hint if hint else ''}")
    return float(value)


def check_non_negative(value, name: str, *, hint: str = "") -> float:
    """ValueError unless `value` is a finite number >= 0."""
    if not is_real(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.{' ' + hint if hint else ''}")
    return float(value)


def check_choice(value, name: str, allowed) -> str:
    """ValueError unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}.")
    return value
