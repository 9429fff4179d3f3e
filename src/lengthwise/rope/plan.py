"""Frequency plans: what a RoPE rescaling method does to the rotary frequencies, independent of how it is patched in.

A method's plan function (`lengthwise.rope.methods`) takes its config and the model's geometry and returns a
`FrequencyPlan`, built from the pure maths of `lengthwise.rope.scaling`. Static plans hold one frequency set;
dynamic-ntk's follows the current length, and longrope with short factors switches at L. Nothing here touches a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lengthwise.rope import scaling
from lengthwise.rope.scaling import RopeGeometry

# attribute set on the rotary module while a position-dependent plan is patched in (value: the method's name)
POSITION_DEPENDENT_MARK = "_lengthwise_position_dependent"


@dataclass(frozen=True)
class FrequencyPlan:
    """`scaled(seq_len) -> (inv_freq (d/2,), attention factor)`; `regime(seq_len)` names the frequency set in use (it
    changes exactly when `scaled` does); positions < `n_hat` keep `original`.
    """

    original: torch.Tensor  # (d/2,) float32
    scaled: Callable[[int], tuple[torch.Tensor, float]]
    regime: Callable[[int], Any] = lambda seq_len: 0
    n_hat: int = 0
    length_dependent: bool = False

    @property
    def static(self) -> bool:
        return not self.length_dependent and self.n_hat == 0

    def angles(self, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, float]:
        """positions (B, T) -> angles (B, T, d/2) float32 (as the rotary module computes them), attention factor."""
        inv_freq, factor = self.scaled(seq_len)
        pos = positions[..., None].float()  # (B, T, 1)
        angles = pos * inv_freq.to(positions.device)
        if self.n_hat:
            original = pos * self.original.to(positions.device)
            angles = torch.where(pos < self.n_hat, original, angles)
        return angles, factor


def original_inv_freq(g: RopeGeometry) -> torch.Tensor:
    return scaling.base_inv_freq(g.rotary_dim, g.base)


def static_plan(g: RopeGeometry, result: tuple[torch.Tensor, float], n_hat: int) -> FrequencyPlan:
    """One frequency set at every length (`result` = (inv_freq, attention factor))."""
    inv_freq, factor = result
    return FrequencyPlan(original_inv_freq(g), lambda seq_len: (inv_freq, factor), n_hat=n_hat)
