"""Rotary position embedding as pure functions, and where each model family keeps its rotary settings.

Two layouts exist in transformers: "half" (Llama, Mistral, Qwen2, Phi-3, GPT-NeoX: dimension i pairs with
i + rotary_dim/2) and "interleaved" (GPT-J: dimension 2i pairs with 2i+1). Only the first `rotary_dim` dimensions of
a head rotate (partial rotary); the rest pass through.

Rotating by an angle is a group action: rotate(rotate(x, a), b) == rotate(x, a + b). Methods use that to move an
already-rotated query or key to another position (distance limit of LM-Infinite) or to re-rotate cached keys under
new frequencies (dynamic NTK): rotate(x, new_angles - old_angles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lengthwise.errors import UnsupportedModelError, UserError
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


def rotation_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """positions (..., T) x inv_freq (d/2,) -> angles (..., T, d/2), in float32."""
    return positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)


def rotate(x: torch.Tensor, angles: torch.Tensor, style: str = "half", offset: int = 0) -> torch.Tensor:
    """Rotate dims [offset, offset + 2*angles.shape[-1]) of x (..., T, head_dim) by `angles` (broadcastable to
    (..., T, d/2)); the other dims pass through. offset > 0: the rotated part sits behind unrotated dims (multi-head
    latent attention concatenates [q_nope | q_rope])."""
    rotary_dim = 2 * angles.shape[-1]
    before, x_rot, after = x[..., :offset], x[..., offset:offset + rotary_dim], x[..., offset + rotary_dim:]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    if style == "half":
        first, second = x_rot[..., : rotary_dim // 2], x_rot[..., rotary_dim // 2 :]
        rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    elif style == "interleaved":
        even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    else:
        raise UserError(f"unknown rotary style {style!r}; accepted: 'half', 'interleaved'")
    kept = [part for part in (before, rotated, after) if part.shape[-1]]
    return torch.cat(kept, dim=-1) if len(kept) > 1 else rotated


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
