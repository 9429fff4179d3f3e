"""`ntk`: NTK-aware scaling, the rope base raised so that the lowest frequency is divided by `factor`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lengthwise.registry import option
from lengthwise.rope import scaling
from lengthwise.rope.export import ExportTarget
from lengthwise.rope.method import RopeMethod
from lengthwise.rope.options import LENGTH_HELP, N_HAT_HELP, check_common, check_factor
from lengthwise.rope.plan import FrequencyPlan, static_plan
from lengthwise.rope.scaling import RopeGeometry
from lengthwise.rope.shipped import SHIPPED_HELP


@dataclass(frozen=True)
class NtkConfig:
    factor: float = option(4.0, "s: rope base b' = b * s^(d/(d-2)); the lowest frequency is divided by s")
    n_hat: int = option(0, N_HAT_HELP)
    original_max_position_embeddings: int | None = option(None, LENGTH_HELP)
    shipped: str = option("compose", SHIPPED_HELP)

    def __post_init__(self) -> None:
        check_factor("ntk factor", self.factor)
        check_common("ntk", self)


def ntk_plan(config: NtkConfig, g: RopeGeometry) -> FrequencyPlan:
    return static_plan(g, scaling.ntk_inv_freq(g, config.factor), config.n_hat)


def ntk_parameters(config: NtkConfig, target: ExportTarget) -> dict[str, Any]:
    """The default rope with the NTK base (rope_theta = b s^(d/(d-2))): identical frequencies."""
    g = RopeGeometry(target.rotary_dim, target.params["rope_theta"], target.length)
    return {"rope_theta": scaling.ntk_base(g, config.factor)}


METHOD = RopeMethod("ntk", NtkConfig, ntk_plan, ntk_parameters,
                    "NTK-aware scaling: rope base b' = b*factor^(d/(d-2)); high frequencies kept.",
                    "bloc97 2023, NTK-aware scaled RoPE (reddit r/LocalLLaMA)")
