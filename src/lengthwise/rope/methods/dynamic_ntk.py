"""`dynamic-ntk`: the NTK base follows the current length; cached keys follow when it changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lengthwise.registry import option
from lengthwise.rope import scaling
from lengthwise.rope.export import ExportTarget
from lengthwise.rope.method import RopeMethod
from lengthwise.rope.options import LENGTH_HELP, N_HAT_HELP, ON_CHANGE_HELP, check_common, check_factor, check_on_change
from lengthwise.rope.plan import FrequencyPlan, original_inv_freq
from lengthwise.rope.scaling import RopeGeometry
from lengthwise.rope.shipped import SHIPPED_HELP
from lengthwise.errors import UserError


@dataclass(frozen=True)
class DynamicNtkConfig:
    factor: float = option(1.0, "s in b' = b((s n/L) - (s-1))^(d/(d-2)), n the current length; s = 1 scales the "
                           "base for exactly n/L")
    n_hat: int = option(0, N_HAT_HELP)
    original_max_position_embeddings: int | None = option(None, LENGTH_HELP)
    shipped: str = option("compose", SHIPPED_HELP)
    on_change: str = option("rebuild", ON_CHANGE_HELP)

    def __post_init__(self) -> None:
        check_factor("dynamic-ntk factor", self.factor)
        check_on_change("dynamic-ntk", self.on_change)
        check_common("dynamic-ntk", self)


def dynamic_ntk_plan(config: DynamicNtkConfig, g: RopeGeometry) -> FrequencyPlan:
    def scaled(seq_len: int) -> tuple[torch.Tensor, float]:
        return scaling.dynamic_ntk_inv_freq(g, config.factor, seq_len)

    # the base is the same for every length up to L, so those lengths share one regime
    return FrequencyPlan(original_inv_freq(g), scaled, lambda seq_len: max(seq_len, g.pretrain_length), config.n_hat,
                         True)


def dynamic_ntk_parameters(config: DynamicNtkConfig, target: ExportTarget) -> dict[str, Any]:
    """transformers' "dynamic" type: equal on a fresh forward pass; it keeps the largest base it has seen and does not
    re-rotate cached keys (the patch does both)."""
    if target.length != getattr(target.model_config, "max_position_embeddings", target.length):
        raise UserError(
            "transformers' dynamic rope reads L from max_position_embeddings; cannot export a different "
            f"original_max_position_embeddings ({target.length})"
        )
    return {"rope_type": "dynamic", "factor": float(config.factor)}


METHOD = RopeMethod("dynamic-ntk", DynamicNtkConfig, dynamic_ntk_plan, dynamic_ntk_parameters,
                    "Dynamic NTK: the base follows the current length n, b' = b((s n/L)-(s-1))^(d/(d-2)); cached keys "
                    "are re-rotated when it changes.",
                    "bloc97 2023, NTK-aware scaled RoPE (reddit r/LocalLLaMA)",
                    # a bounded or re-rotating attention cache cannot follow a base that changes with the length
                    composable_with=("query-scale",),
                    shipped_type="dynamic", shipped_kept=("original_max_position_embeddings",))
