"""The RoPE rescaling family as one table: per method its config class, plan function and rope_parameters export.

`lengthwise.methods.rope_scaling` registers every row as a method and patches its plan into a model;
`to_rope_parameters` (below) writes a row's export. Adding a method is adding a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lengthwise.models.families import context_length
from lengthwise.rope import export, plan
from lengthwise.rope.configs import DynamicNtkConfig, LinearConfig, Llama3Config, LongRopeConfig, NtkConfig, YarnConfig
from lengthwise.rope.plan import FrequencyPlan
from lengthwise.rope.scaling import RopeGeometry
from lengthwise.errors import UserError

PAPER_PI = "Chen et al. 2023, Extending Context Window via Positional Interpolation, arXiv 2306.15595"
PAPER_NTK = "bloc97 2023, NTK-aware scaled RoPE (reddit r/LocalLLaMA)"
PAPER_YARN = "Peng et al. 2023, YaRN, arXiv 2309.00071"
PAPER_LLAMA3 = "Meta 2024, The Llama 3 Herd of Models, arXiv 2407.21783"
PAPER_LONGROPE = "Ding et al. 2024, LongRoPE, arXiv 2402.13753"


@dataclass(frozen=True)
class RopeMethod:
    name: str
    config: type
    plan: Callable[[Any, RopeGeometry], FrequencyPlan]
    export: Callable[[Any, export.ExportTarget], dict[str, Any]]
    summary: str
    paper: str
    composable_with: tuple[str, ...] = ()  # roles it may be stacked with (registry semantics); empty: any other


_ROWS = (
    RopeMethod("linear", LinearConfig, plan.linear_plan, export.linear_parameters,
               "Position interpolation (PI): every rotary frequency divided by `factor`.", PAPER_PI),
    RopeMethod("ntk", NtkConfig, plan.ntk_plan, export.ntk_parameters,
               "NTK-aware scaling: rope base b' = b*factor^(d/(d-2)); high frequencies kept.", PAPER_NTK),
    RopeMethod("dynamic-ntk", DynamicNtkConfig, plan.dynamic_ntk_plan, export.dynamic_ntk_parameters,
               "Dynamic NTK: the base follows the current length n, b' = b((s n/L)-(s-1))^(d/(d-2)); cached keys are "
               "re-rotated when it changes.", PAPER_NTK,
               # a bounded or re-rotating attention cache cannot follow a base that changes with the length
               composable_with=("query-scale",)),
    RopeMethod("yarn", YarnConfig, plan.yarn_plan, export.yarn_parameters,
               "YaRN: per-dimension ramp between keeping and interpolating frequencies, attention factor "
               "0.1 ln s + 1.", PAPER_YARN),
    RopeMethod("llama3", Llama3Config, plan.llama3_plan, export.llama3_parameters,
               "Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, smooth band between.",
               PAPER_LLAMA3),
    RopeMethod("longrope", LongRopeConfig, plan.longrope_plan, export.longrope_parameters,
               "LongRoPE: per-dimension factors lambda_i (list or JSON file), start tokens < n_hat un-interpolated, "
               "optional short/long switch.", PAPER_LONGROPE),
)
ROPE_METHODS: dict[str, RopeMethod] = {row.name: row for row in _ROWS}


def rope_method(name: str) -> RopeMethod:
    if name not in ROPE_METHODS:
        raise UserError(f"unknown rope method {name!r}; accepted: {', '.join(ROPE_METHODS)}")
    return ROPE_METHODS[name]


def make_plan(method: str, config: Any, g: RopeGeometry) -> FrequencyPlan:
    """The frequency plan of a rope-family method for a model of geometry `g`."""
    return rope_method(method).plan(config, g)


def to_rope_parameters(method: str, config: Any, model_or_config: Any) -> dict[str, Any]:
    """`rope_parameters` for `method` with `config` (its dataclass) on a model (or its config)."""
    model_config = getattr(model_or_config, "config", model_or_config)
    params = export.base_rope_parameters(model_config)
    if method in export.NOT_EXPRESSIBLE:
        raise UserError(export.NOT_EXPRESSIBLE[method])
    if getattr(config, "n_hat", 0):
        raise UserError(
            f"transformers has no start-token rule (n_hat={config.n_hat}); {method} with n_hat > 0 cannot be written "
            f"as rope_parameters (use n_hat=0, or keep the lengthwise patch)"
        )
    if method not in ROPE_METHODS:
        raise UserError(f"no rope_parameters export for {method!r}; accepted: {', '.join(ROPE_METHODS)}")
    length = getattr(config, "original_max_position_embeddings", None) or context_length(model_config)
    params.update(ROPE_METHODS[method].export(config, export.ExportTarget(model_or_config, params, length)))
    return params
