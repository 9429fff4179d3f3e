"""`linear`: position interpolation (PI), every rotary frequency divided by `factor`."""

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
class LinearConfig:
    factor: float = option(4.0, "s: every frequency divided by s, i.e. position p is read as p / s")
    n_hat: int = option(0, N_HAT_HELP)
    original_max_position_embeddings: int | None = option(None, LENGTH_HELP)
    shipped: str = option("compose", SHIPPED_HELP)

    def __post_init__(self) -> None:
        check_factor("linear factor", self.factor)
        check_common("linear", self)


def linear_plan(config: LinearConfig, g: RopeGeometry) -> FrequencyPlan:
    return static_plan(g, scaling.linear_inv_freq(g, config.factor), config.n_hat)


def linear_parameters(config: LinearConfig, target: ExportTarget) -> dict[str, Any]:
    return {"rope_type": "linear", "factor": float(config.factor)}


METHOD = RopeMethod("linear", LinearConfig, linear_plan, linear_parameters,
                    "Position interpolation (PI): every rotary frequency divided by `factor`.",
                    "Chen et al. 2023, Extending Context Window via Positional Interpolation, arXiv 2306.15595",
                    shipped_type="linear")
