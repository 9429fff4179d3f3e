"""`llama3`: Llama 3.1 scaling, long wavelengths divided by `factor`, short ones kept, a smooth band between."""

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
class Llama3Config:
    factor: float = option(4.0, "s: long wavelengths are divided by s")
    low_freq_factor: float = option(1.0, "wavelengths longer than L / low_freq_factor are divided by s")
    high_freq_factor: float = option(4.0, "wavelengths shorter than L / high_freq_factor are kept")
    n_hat: int = option(0, N_HAT_HELP)
    original_max_position_embeddings: int | None = option(None, LENGTH_HELP)
    shipped: str = option("compose", SHIPPED_HELP)

    def __post_init__(self) -> None:
        check_factor("llama3 factor", self.factor)
        check_factor("llama3 low_freq_factor", self.low_freq_factor, 1e-9)
        if not isinstance(self.high_freq_factor, (int, float)) or self.high_freq_factor <= self.low_freq_factor:
            raise UserError(f"llama3 high_freq_factor must exceed low_freq_factor ({self.low_freq_factor}), "
                             f"got {self.high_freq_factor!r}")
        check_common("llama3", self)


def llama3_plan(config: Llama3Config, g: RopeGeometry) -> FrequencyPlan:
    result = scaling.llama3_inv_freq(g, config.factor, config.low_freq_factor, config.high_freq_factor)
    return static_plan(g, result, config.n_hat)


def llama3_parameters(config: Llama3Config, target: ExportTarget) -> dict[str, Any]:
    return {"rope_type": "llama3", "factor": float(config.factor), "original_max_position_embeddings": target.length,
            "low_freq_factor": float(config.low_freq_factor), "high_freq_factor": float(config.high_freq_factor)}


METHOD = RopeMethod("llama3", Llama3Config, llama3_plan, llama3_parameters,
                    "Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, smooth band between.",
                    "Meta 2024, The Llama 3 Herd of Models, arXiv 2407.21783",
                    shipped_type="llama3",
                    shipped_kept=("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
                    shipped_needs_length=True)
