"""The reference entry: the unpatched model (the sliding-window baseline is a scoring strategy: `lengthwise.scoring`)."""

from __future__ import annotations

from dataclasses import dataclass

from lengthwise.patching import Undo
from lengthwise.registry import register


@dataclass(frozen=True)
class VanillaConfig:
    pass


@register(
    "vanilla",
    VanillaConfig,
    role="none",
    summary="The unpatched model: full causal attention at every length (fails past the training length).",
    encodings=("rope", "alibi", "other"),  # changes nothing, so any model (e.g. the PE lab's) may use it
)
def apply_vanilla(model, config: VanillaConfig) -> Undo:
    return Undo()
