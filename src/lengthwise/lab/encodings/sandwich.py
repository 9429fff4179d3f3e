"""Sandwich (Chi et al. 2023, "Dissecting Transformer Length Extrapolation via the Lens of Receptive Field
Analysis"): the inner product of two sinusoidal embeddings, p_m . p_n = sum_i cos((m - n) base^(-2i/d')), used as
a parameter-free logit bias, one compression per head as in ALiBi.  d'/2 (its value at distance 0) is subtracted so
the bias is 0 on the diagonal and negative elsewhere; a per-row constant does not change softmax."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lengthwise.lab.encodings.base import PositionEncoding, alibi_slopes, distance
from lengthwise.errors import UserError


@dataclass(frozen=True)
class SandwichConfig:
    dim: int = 128  # d' in the paper
    base: float = 10000.0

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim < 2 or self.dim % 2:
            raise UserError(f"sandwich dim must be an even integer >= 2, got {self.dim!r}")
        if not self.base > 1:
            raise UserError(f"sandwich base must be > 1, got {self.base!r}")


class Sandwich(PositionEncoding):
    name = "sandwich"

    def __init__(self, heads, head_dim, d_model, train_length, config: SandwichConfig = SandwichConfig()):
        super().__init__(heads, head_dim, d_model, train_length)
        self.config = config
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)  # (H,)

    def bias(self, q_pos, k_pos):
        d = distance(q_pos, k_pos)  # (Tq, Tk)
        inv = self.config.base ** (-torch.arange(0, self.config.dim, 2, device=d.device).float() / self.config.dim)
        kernel = torch.cos(d[..., None] * inv).sum(-1) - self.config.dim / 2  # (Tq, Tk), <= 0
        return self.slopes.to(d.device)[:, None, None] * kernel[None]
