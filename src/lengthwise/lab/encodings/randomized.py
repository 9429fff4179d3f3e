"""Randomized positional encodings (Ruoss et al. 2023, "Randomized Positional Encodings Boost Length
Generalization of Transformers"): while training, a length-T input gets T sorted distinct positions drawn from
[0, max_position) (max_position >> T), so the model sees every position up to max_position; at inference the
positions are 0..T-1.  Underneath: RoPE (default) or sinusoidal, chosen by `underlying`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lengthwise.lab.encodings.base import PositionEncoding
from lengthwise.lab.encodings.rope import apply_rotary, rope_angles
from lengthwise.lab.encodings.sinusoidal import SinusoidalConfig, sinusoid_table
from lengthwise.errors import UserError


@dataclass(frozen=True)
class RandomizedConfig:
    underlying: str = "rope"  # "rope" | "sinusoidal"
    max_factor: int = 16  # max_position = max_factor * training length
    base: float = 10000.0

    def __post_init__(self) -> None:
        if self.underlying not in ("rope", "sinusoidal"):
            raise UserError(f"randomized underlying must be 'rope' or 'sinusoidal', got {self.underlying!r}")
        if not isinstance(self.max_factor, int) or self.max_factor < 1:
            raise UserError(f"randomized max_factor must be an integer >= 1, got {self.max_factor!r}")


class Randomized(PositionEncoding):
    name = "randomized"

    def __init__(self, heads, head_dim, d_model, train_length, config: RandomizedConfig = RandomizedConfig()):
        super().__init__(heads, head_dim, d_model, train_length)
        self.config = config

    def positions(self, length, training, device=None):
        if not training:
            return torch.arange(length, device=device)
        max_position = max(self.config.max_factor * self.train_length, length)
        # torch's global RNG: seeded by the trainer, so every run sees the same draws
        return torch.randperm(max_position)[:length].sort().values.to(device)

    def embed(self, positions):
        if self.config.underlying != "sinusoidal":
            return None
        return sinusoid_table(positions, self.d_model, self.config.base) * SinusoidalConfig().scale  # as `sinusoidal`

    def rotate(self, x, positions, is_query):
        if self.config.underlying != "rope":
            return x
        cos, sin = rope_angles(positions, self.head_dim, self.config.base)
        return apply_rotary(x, cos.to(x.dtype), sin.to(x.dtype))
