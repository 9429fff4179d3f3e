"""`yarn`: YaRN, a per-dimension ramp between keeping and interpolating frequencies, and an attention factor."""

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
from lengthwise.errors import UserError


@dataclass(frozen=True)
class YarnConfig:
    factor: float = option(4.0, "s: the slowest dims are divided by s, the fastest kept, a ramp between")
    beta_fast: float = option(32.0, "dims rotating more than beta_fast times in L keep their frequency")
    beta_slow: float = option(1.0, "dims rotating fewer than beta_slow times in L are divided by s")
    attention_factor: float | None = option(None, "multiplies cos and sin; default 0.1 ln s + 1")
    truncate: bool = option(True, "round the ramp ends to whole dims (transformers' default)")
    n_hat: int = option(0, N_HAT_HELP)
    original_max_position_embeddings: int | None = option(None, LENGTH_HELP)
    shipped: str = option("compose", SHIPPED_HELP)

    def __post_init__(self) -> None:
        check_factor("yarn factor", self.factor)
        check_factor("yarn beta_slow", self.beta_slow, 1e-9)
        if not isinstance(self.beta_fast, (int, float)) or self.beta_fast <= self.beta_slow:
            raise UserError(f"yarn beta_fast must exceed beta_slow ({self.beta_slow}), got {self.beta_fast!r}")
        if self.attention_factor is not None:
            check_factor("yarn attention_factor", self.attention_factor, 1e-9)
        if not isinstance(self.truncate, bool):
            raise UserError(f"yarn truncate must be true or false, got {self.truncate!r}")
        check_common("yarn", self)


def yarn_plan(config: YarnConfig, g: RopeGeometry) -> FrequencyPlan:
    result = scaling.yarn_inv_freq(g, config.factor, config.beta_fast, config.beta_slow, config.attention_factor,
                                   config.truncate)
    return static_plan(g, result, config.n_hat)


def yarn_parameters(config: YarnConfig, target: ExportTarget) -> dict[str, Any]:
    params = {"rope_type": "yarn", "factor": float(config.factor), "original_max_position_embeddings": target.length,
              "beta_fast": float(config.beta_fast), "beta_slow": float(config.beta_slow), "truncate": config.truncate}
    if config.attention_factor is not None:
        params["attention_factor"] = float(config.attention_factor)
    return params


METHOD = RopeMethod("yarn", YarnConfig, yarn_plan, yarn_parameters,
                    "YaRN: per-dimension ramp between keeping and interpolating frequencies, attention factor "
                    "0.1 ln s + 1.",
                    "Peng et al. 2023, YaRN, arXiv 2309.00071",
                    shipped_type="yarn",
                    shipped_kept=("original_max_position_embeddings", "beta_fast", "beta_slow", "truncate"),
                    shipped_needs_length=True)
