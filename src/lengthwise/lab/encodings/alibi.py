"""ALiBi (Press et al. 2022, "Train Short, Test Long: Attention with Linear Biases Enables Input Length
Extrapolation"): no position embedding; each head adds -slope_h * (q - k) to its attention logits."""

from __future__ import annotations

from dataclasses import dataclass

from lengthwise.lab.encodings.base import PositionEncoding, alibi_slopes, distance


@dataclass(frozen=True)
class ALiBiConfig:
    pass


class ALiBi(PositionEncoding):
    name = "alibi"

    def __init__(self, heads, head_dim, d_model, train_length, config: ALiBiConfig = ALiBiConfig()):
        super().__init__(heads, head_dim, d_model, train_length)
        self.config = config
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)  # (H,)

    def bias(self, q_pos, k_pos):
        return -self.slopes.to(q_pos.device)[:, None, None] * distance(q_pos, k_pos)[None]  # (H, Tq, Tk)
