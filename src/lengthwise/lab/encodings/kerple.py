"""KERPLE (Chi et al. 2022, "KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation"):
conditionally positive definite kernels turned into logit biases with learnable per-head r1, r2 > 0:
power: -r1 * |m - n|^r2 (0 < r2 <= 2);  log: -r1 * log(1 + r2 * |m - n|).  The log variant is the paper's best."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lengthwise.lab.encodings.base import PositionEncoding, distance
from lengthwise.errors import UserError


@dataclass(frozen=True)
class KerpleConfig:
    init_r1: float = 1.0
    init_r2: float = 1.0

    def __post_init__(self) -> None:
        for name in ("init_r1", "init_r2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise UserError(f"kerple {name} must be a positive number, got {value!r}")


class _Kerple(PositionEncoding):
    def __init__(self, heads, head_dim, d_model, train_length, config: KerpleConfig = KerpleConfig()):
        super().__init__(heads, head_dim, d_model, train_length)
        self.config = config
        # stored unconstrained; the positive values are obtained in `params` (clamped as in the paper's code: > 0)
        self.r1 = nn.Parameter(torch.full((heads,), float(config.init_r1)))
        self.r2 = nn.Parameter(torch.full((heads,), float(config.init_r2)))

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.r1.clamp(min=1e-2), self.r2.clamp(min=1e-2)


class KerplePower(_Kerple):
    name = "kerple-power"

    def bias(self, q_pos, k_pos):
        r1, r2 = self.params()
        r2 = r2.clamp(max=2.0)
        # clamp: d^r2 at d = 0 has an undefined gradient in r2 (0 * log 0); 1e-6^r2 is ~0 for r2 >= 0.01
        d = distance(q_pos, k_pos).clamp(min=1e-6)[None]  # (1, Tq, Tk)
        return -r1[:, None, None] * d.pow(r2[:, None, None])


class KerpleLog(_Kerple):
    name = "kerple-log"

    def bias(self, q_pos, k_pos):
        r1, r2 = self.params()
        d = distance(q_pos, k_pos)[None]
        return -r1[:, None, None] * torch.log1p(r2[:, None, None] * d)
