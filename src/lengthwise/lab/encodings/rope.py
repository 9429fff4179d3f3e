"""Rotary position embedding (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding"):
q and k are rotated pairwise by angle p * base^(-2i/Dh), so q_m . k_n depends only on m - n.
Half layout (dims i and i + Dh/2 form a pair), the layout of Llama."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lengthwise.lab.encodings.base import PositionEncoding
from lengthwise.errors import UserError


@dataclass(frozen=True)
class RoPEConfig:
    base: float = 10000.0

    def __post_init__(self) -> None:
        if not self.base > 1:
            raise UserError(f"rope base must be > 1, got {self.base!r}")


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, Dh) (each frequency repeated for both halves)."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv[None, :]  # (T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, Dh)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, Dh); cos/sin: (T, Dh)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class RoPE(PositionEncoding):
    name = "rope"

    def __init__(self, heads, head_dim, d_model, train_length, config: RoPEConfig = RoPEConfig()):
        super().__init__(heads, head_dim, d_model, train_length)
        if head_dim % 2:
            raise UserError(f"rope needs an even head dimension, got {head_dim}")
        self.config = config

    def rotate(self, x, positions, is_query):
        cos, sin = rope_angles(positions, self.head_dim, self.config.base)
        return apply_rotary(x, cos.to(x.dtype), sin.to(x.dtype))
