"""XPOS (Sun et al. 2023, "A Length-Extrapolatable Transformer"): RoPE with an exponential per-dimension decay,
q_m scaled by zeta^(m/s) and k_n by zeta^(-n/s), zeta_i = (2i/Dh + gamma) / (1 + gamma), so the score carries
zeta^((m-n)/s) and stays relative.  Its blockwise causal attention (each query sees its own block of
training-length keys and the previous one) is an inference option of the lab model (`blockwise=True`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lengthwise.lab.encodings.base import PositionEncoding
from lengthwise.lab.encodings.rope import apply_rotary, rope_angles
from lengthwise.errors import UserError


@dataclass(frozen=True)
class XPosConfig:
    base: float = 10000.0
    gamma: float = 0.4
    scale_base: float = 512.0

    def __post_init__(self) -> None:
        if not self.base > 1:
            raise UserError(f"xpos base must be > 1, got {self.base!r}")
        if not self.gamma > 0:
            raise UserError(f"xpos gamma must be > 0, got {self.gamma!r}")
        if not self.scale_base > 0:
            raise UserError(f"xpos scale_base must be > 0, got {self.scale_base!r}")


class XPos(PositionEncoding):
    name = "xpos"

    def __init__(self, heads, head_dim, d_model, train_length, config: XPosConfig = XPosConfig()):
        super().__init__(heads, head_dim, d_model, train_length)
        if head_dim % 2:
            raise UserError(f"xpos needs an even head dimension, got {head_dim}")
        self.config = config
        zeta = (torch.arange(0, head_dim, 2).float() / head_dim + config.gamma) / (1 + config.gamma)  # (Dh/2,)
        self.register_buffer("zeta", torch.cat([zeta, zeta]), persistent=False)  # (Dh,)

    def rotate(self, x, positions, is_query):
        cos, sin = rope_angles(positions, self.head_dim, self.config.base)
        # centre positions on the training window so the scales stay near 1 where the model was trained
        p = (positions.float() - self.train_length // 2)[:, None] / self.config.scale_base  # (T, 1)
        scale = self.zeta.to(x.device)[None, :] ** (p if is_query else -p)  # (T, Dh)
        return apply_rotary(x, cos.to(x.dtype), sin.to(x.dtype)) * scale.to(x.dtype)
