"""Argument checks of the cache engine and the samplers: one clear TypeError /
ValueError naming the argument and what was expected (never an OverflowError from
int(inf), nor a string or a bool taken for a number)."""

from __future__ import annotations

import math
import numbers


def _real(name: str, value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    return float(value)


def positive_int(name: str, value) -> int:
    """An integer >= 1 (an integral float such as 2.0 included)."""
    what = "an integer >= 1"
    v = _real(name, value, what)
    if not math.isfinite(v) or v != int(v) or v < 1:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(v)


SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1   # what torch.Generator.manual_seed takes


def seed(name: str, value) -> int:
    """A generator seed: an integer in -2**63 .. 2**64-1 (a bool or float is not one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if not SEED_MIN <= int(value) <= SEED_MAX:
        raise ValueError(f"{name} must be in {SEED_MIN}..{SEED_MAX} (a 64-bit generator seed), got {value}")
    return int(value)


def threshold(value) -> float | None:
    """SkipCache(threshold=): None (interval mode) or a number >= 0 (inf: the
    adaptive mode that refreshes only at the interval cap)."""
    if value is None:
        return None
    v = _real("threshold", value, "None or a number >= 0")
    if not v >= 0:  # NaN too
        raise ValueError(f"threshold must be None (the interval mode) or a number >= 0, got {value!r}")
    return v


def timestep_bound(name: str, value) -> float:
    """SkipCache(start= / stop=): a number, not NaN (+-inf allowed: never / always)."""
    v = _real(name, value, "a number (a timestep)")
    if math.isnan(v):
        raise ValueError(f"{name} must be a number (a timestep), got NaN")
    return value


def finite(name: str, value, minimum: float | None = None) -> float:
    """A finite number (>= minimum when given): sample()'s cfg_scale and eta."""
    what = "a finite number" + (f" >= {minimum}" if minimum is not None else "")
    v = _real(name, value, what)
    if not math.isfinite(v) or (minimum is not None and v < minimum):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def unit_interval(name: str, value) -> float:
    """A number in [0, 1]: DDIM's eta (above 1 its noise outgrows the step: NaN)."""
    v = _real(name, value, "a number in [0, 1]")
    if not 0 <= v <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return v
