"""What a RoPE rescaling method is: one definition that the registry, the patch, the plan and the export read.

Each method is a module of `lengthwise.rope.methods` holding its config, its plan function, its `rope_parameters`
export and the `RopeMethod` row pairing them (`METHOD`); `lengthwise.rope.table` collects the rows and
`lengthwise.methods.rope_scaling` registers and patches them. Adding a method is adding such a module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lengthwise.rope.export import ExportTarget
from lengthwise.rope.plan import FrequencyPlan
from lengthwise.rope.scaling import RopeGeometry


@dataclass(frozen=True)
class RopeMethod:
    name: str
    config: type  # its frozen config dataclass
    plan: Callable[[Any, RopeGeometry], FrequencyPlan]  # (config, the model's geometry) -> frequencies by length
    export: Callable[[Any, ExportTarget], dict[str, Any]]  # (config, target) -> rope_parameters entries to set
    summary: str
    paper: str
    composable_with: tuple[str, ...] = ()  # roles it may be stacked with (registry semantics); empty: any other
    # On a model that ships scaled RoPE (`lengthwise.rope.shipped`): the transformers rope_type it composes with
    # (None: it never composes), the options a composed config takes from the shipped parameters (factor apart), and
    # whether a composed config starts from the shipped scaling's original length when the shipped parameters do
    # not name it (formulas that take L from original_max_position_embeddings).
    shipped_type: str | None = None
    shipped_kept: tuple[str, ...] = ()
    shipped_needs_length: bool = False
