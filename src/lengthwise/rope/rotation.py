"""Rotary position embedding as pure functions (where a model keeps its rotary module: `lengthwise.models.rotary`).

Two layouts exist in transformers: "half" (Llama, Mistral, Qwen2, Phi-3, GPT-NeoX: dimension i pairs with
i + rotary_dim/2) and "interleaved" (GPT-J: dimension 2i pairs with 2i+1). Only the first `rotary_dim` dimensions of
a head rotate (partial rotary); the rest pass through.

Rotating by an angle is a group action: rotate(rotate(x, a), b) == rotate(x, a + b). Methods use that to move an
already-rotated query or key to another position (distance limit of LM-Infinite) or to re-rotate cached keys under
new frequencies (dynamic NTK): rotate(x, new_angles - old_angles).
"""

from __future__ import annotations

import torch

from lengthwise.errors import UserError


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
