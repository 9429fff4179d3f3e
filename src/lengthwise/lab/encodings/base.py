"""The interface every position encoding implements; the attention in `lab.model` calls these hooks.

An encoding acts at (at most) three places:
- `embed(positions)`: an absolute vector added to the token embeddings (sinusoidal);
- `rotate(x, positions, is_query)`: a transform of q or k before the dot product (RoPE, XPOS);
- `bias(q_pos, k_pos)`: an additive (heads, q, k) term on the attention logits (T5, ALiBi, KERPLE, Sandwich).
`positions(T, training)` gives the position ids of a length-T input (randomized encodings differ at training time).
"""

from __future__ import annotations

import torch
from torch import nn

from lengthwise.attention.alibi import alibi_slopes  # noqa: F401 - the lab's encodings import it from here


class PositionEncoding(nn.Module):
    name = "base"

    def __init__(self, heads: int, head_dim: int, d_model: int, train_length: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.d_model, self.train_length = heads, head_dim, d_model, train_length

    def positions(self, length: int, training: bool, device=None) -> torch.Tensor:
        # (T,) position ids; only randomized encodings depart from 0..T-1, and only while training
        return torch.arange(length, device=device)

    def embed(self, positions: torch.Tensor) -> torch.Tensor | None:
        return None  # (T, d_model) or None

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, is_query: bool) -> torch.Tensor:
        return x  # x: (B, H, T, Dh)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        return None  # (H, Tq, Tk) or None


def distance(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(Tq, Tk) causal distance q - k clamped at 0 (future keys are masked anyway), float."""
    return (q_pos[:, None] - k_pos[None, :]).clamp(min=0).float()


