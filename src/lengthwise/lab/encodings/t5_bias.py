"""T5 relative position bias (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", sec. 2.1; learned relative positions after Shaw et al. 2018): a learned scalar per
(head, bucket) added to the logits; distances are bucketed exactly below num_buckets/2 and logarithmically up to
max_distance, and every larger distance shares the last bucket (which is what lets it run past training length)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lengthwise.lab.encodings.base import PositionEncoding, distance
from lengthwise.errors import UserError


@dataclass(frozen=True)
class T5BiasConfig:
    num_buckets: int = 32
    max_distance: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.num_buckets, int) or self.num_buckets < 4:
            raise UserError(f"t5-bias num_buckets must be an integer >= 4, got {self.num_buckets!r}")
        if not isinstance(self.max_distance, int) or self.max_distance <= self.num_buckets // 2:
            raise UserError(
                f"t5-bias max_distance must be an integer > num_buckets/2 ({self.num_buckets // 2}), "
                f"got {self.max_distance!r}"
            )


def relative_bucket(dist: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Causal (unidirectional) bucket of each non-negative distance; long tensor like `dist`."""
    exact = num_buckets // 2
    d = dist.long()
    log_part = exact + (
        torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    ).long()
    log_part = log_part.clamp(max=num_buckets - 1)
    return torch.where(d < exact, d, log_part)


class T5Bias(PositionEncoding):
    name = "t5-bias"

    def __init__(self, heads, head_dim, d_model, train_length, config: T5BiasConfig = T5BiasConfig()):
        super().__init__(heads, head_dim, d_model, train_length)
        self.config = config
        self.table = nn.Embedding(config.num_buckets, heads)
        nn.init.zeros_(self.table.weight)

    def bias(self, q_pos, k_pos):
        buckets = relative_bucket(distance(q_pos, k_pos), self.config.num_buckets, self.config.max_distance)
        return self.table(buckets).permute(2, 0, 1)  # (Tq, Tk, H) -> (H, Tq, Tk)
