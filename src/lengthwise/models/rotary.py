"""Where a transformers model keeps its rotary settings: the one module holding an `inv_freq` buffer (found by its
buffer, not by a name), its rotated dimensions, layout and base; GPT-J's sin/cos table read from its config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lengthwise.errors import UnsupportedModelError
from lengthwise.rope.scaling import base_inv_freq


@dataclass(frozen=True)
class RotaryLayout:
    owner: nn.Module | None  # the module whose attribute `slot` is the rotary module (None for GPT-J: sin/cos table)
    slot: str
    rotary_dim: int  # rotated dimensions per head
    head_dim: int
    style: str  # "half" | "interleaved"
    base: float  # rope theta

    @property
    def rotary_module(self) -> nn.Module | None:
        """The rotary module the model runs now: looked up at each call, since a static RoPE plan swaps it."""
        return getattr(self.owner, self.slot) if self.owner is not None else None

    @property
    def inv_freq(self) -> torch.Tensor:
        """Current inverse frequencies (rotary_dim/2,), as the model uses them now (a patched method's included)."""
        if self.rotary_module is not None:
            return self.rotary_module.inv_freq.float()
        return base_inv_freq(self.rotary_dim, self.base)


def find_rotary_slot(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(owner, attribute name) of the model's one rotary-embedding module: the module holding an `inv_freq` buffer.
    None when there is none, or several (one per layer type, or per sub-model): then no single module to rescale."""
    found = [name for name, module in model.named_modules() if "inv_freq" in getattr(module, "_buffers", {})]
    if len(found) != 1 or not found[0]:
        return None
    owner_name, _, slot = found[0].rpartition(".")
    return model.get_submodule(owner_name), slot


def rotary_layout(model: nn.Module) -> RotaryLayout:
    config = model.config
    if config.model_type == "gptj":
        head_dim = config.n_embd // config.n_head
        return RotaryLayout(None, "", config.rotary_dim or head_dim, head_dim, "interleaved", 10000.0)
    found = find_rotary_slot(model)
    if found is None:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} has no single rotary-embedding module (a module with an `inv_freq` "
            f"buffer) to rescale: none, or one frequency set per layer type (Gemma 3, OLMo 3)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    owner, slot = found
    module = getattr(owner, slot)
    return RotaryLayout(
        owner=owner,
        slot=slot,
        rotary_dim=2 * module.inv_freq.shape[-1],
        head_dim=head_dim,
        style="half",
        base=float(rope_parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
    )
