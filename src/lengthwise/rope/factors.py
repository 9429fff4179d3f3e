"""LongRoPE per-dimension factors: read from a list or a JSON file, write to a JSON file.

A factors file is either a JSON list of rotary_dim/2 numbers, or an object holding `long_factors` (or transformers'
spelling `long_factor`) and optionally `short_factors`/`short_factor`, `n_hat`, `factor` and anything else (kept as
metadata). Files written by `save_factors` use the first spellings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lengthwise.io import atomic_write_json
from lengthwise.errors import UserError

_KEYS = {"long": ("long_factors", "long_factor"), "short": ("short_factors", "short_factor")}


def check_factors(values: Any, what: str = "factors") -> tuple[float, ...]:
    """A non-empty sequence of positive finite numbers -> tuple of floats, or a clear ValueError."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise UserError(f"{what} must be a list of positive numbers or a path to a JSON file, got {values!r}")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UserError(f"{what}[{i}] must be a positive finite number, got {value!r}")
        out.append(float(value))
    if not out:
        raise UserError(f"{what} is empty; give one factor per rotary frequency (rotary_dim/2 numbers)")
    return tuple(out)


def read_factors_file(path: str | Path, regime: str = "long") -> tuple[float, ...] | None:
    """Factors of `regime` ("long" | "short") from a JSON file; None if the file is an object without that regime."""
    if regime not in _KEYS:
        raise UserError(f"unknown LongRoPE regime {regime!r}; accepted: long, short")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LongRoPE factors file {path} does not exist (expected JSON: a list, or "
                                f"{{\"long_factors\": [...], \"short_factors\": [...]}})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"LongRoPE factors file {path} is not valid JSON: {err}") from err
    if isinstance(data, list):
        return check_factors(data, f"{path}") if regime == "long" else None
    if not isinstance(data, dict):
        raise UserError(f"LongRoPE factors file {path} must hold a list or an object, got {type(data).__name__}")
    for key in _KEYS[regime]:
        if key in data:
            return check_factors(data[key], f"{path}:{key}")
    if regime == "long":
        raise UserError(f"LongRoPE factors file {path} has no 'long_factors' (keys: {', '.join(data) or 'none'})")
    return None


def resolve_factors(value: Any, regime: str, what: str) -> tuple[float, ...] | None:
    """A list (kept), a path string (read), or None (None)."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return read_factors_file(value, regime)
    return check_factors(value, what)


def save_factors(path: str | Path, long_factors, short_factors=None, **metadata: Any) -> Path:
    """Write factors (and metadata such as n_hat, factor, fitness) atomically as JSON; returns the path."""
    data: dict[str, Any] = {"long_factors": list(check_factors(long_factors, "long_factors"))}
    if short_factors is not None:
        data["short_factors"] = list(check_factors(short_factors, "short_factors"))
    data.update(metadata)
    atomic_write_json(Path(path), data)
    return Path(path)
