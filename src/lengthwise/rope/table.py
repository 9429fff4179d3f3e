"""The RoPE rescaling methods as one table, collected from their modules (`lengthwise.rope.methods`: one module per
method, each with its `METHOD` row), and what reads a row by name: the plan and the `rope_parameters` export.

`lengthwise.methods.rope_scaling` registers every row as a method and patches its plan into a model.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from lengthwise.models.families import context_length
from lengthwise.rope import export, methods
from lengthwise.rope.method import RopeMethod
from lengthwise.rope.plan import FrequencyPlan
from lengthwise.rope.scaling import RopeGeometry
from lengthwise.errors import UserError


def _collect() -> dict[str, RopeMethod]:
    rows = [importlib.import_module(f"{methods.__name__}.{module.name}").METHOD
            for module in pkgutil.iter_modules(methods.__path__)]
    return {row.name: row for row in sorted(rows, key=lambda row: row.name)}


ROPE_METHODS: dict[str, RopeMethod] = _collect()


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
