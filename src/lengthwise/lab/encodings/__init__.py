"""The encodings of the lab, by name: one module each (see each module's docstring for its paper)."""

from __future__ import annotations

import dataclasses

from lengthwise.lab.encodings.alibi import ALiBi, ALiBiConfig
from lengthwise.lab.encodings.base import PositionEncoding
from lengthwise.lab.encodings.kerple import KerpleConfig, KerpleLog, KerplePower
from lengthwise.lab.encodings.nope import NoPE, NoPEConfig
from lengthwise.lab.encodings.randomized import Randomized, RandomizedConfig
from lengthwise.lab.encodings.rope import RoPE, RoPEConfig
from lengthwise.lab.encodings.sandwich import Sandwich, SandwichConfig
from lengthwise.lab.encodings.sinusoidal import Sinusoidal, SinusoidalConfig
from lengthwise.lab.encodings.t5_bias import T5Bias, T5BiasConfig
from lengthwise.lab.encodings.xpos import XPos, XPosConfig
from lengthwise.errors import UserError

ENCODINGS: dict[str, tuple[type, type]] = {
    "sinusoidal": (Sinusoidal, SinusoidalConfig),
    "t5-bias": (T5Bias, T5BiasConfig),
    "rope": (RoPE, RoPEConfig),
    "alibi": (ALiBi, ALiBiConfig),
    "kerple-power": (KerplePower, KerpleConfig),
    "kerple-log": (KerpleLog, KerpleConfig),
    "sandwich": (Sandwich, SandwichConfig),
    "xpos": (XPos, XPosConfig),
    "randomized": (Randomized, RandomizedConfig),
    "nope": (NoPE, NoPEConfig),
}


def encoding_config(name: str, options: dict | None = None):
    """The validated config dataclass of encoding `name` from a dict of options."""
    if name not in ENCODINGS:
        raise UserError(f"unknown position encoding {name!r}; accepted: {', '.join(ENCODINGS)}")
    cls = ENCODINGS[name][1]
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"{name} has no option {', '.join(unknown)}; accepted: {', '.join(sorted(known)) or 'none'}")
    return cls(**options)


def build_encoding(name: str, options: dict | None, heads: int, head_dim: int, d_model: int,
                   train_length: int) -> PositionEncoding:
    config = encoding_config(name, options)
    return ENCODINGS[name][0](heads, head_dim, d_model, train_length, config)


__all__ = ["ENCODINGS", "PositionEncoding", "build_encoding", "encoding_config"]
