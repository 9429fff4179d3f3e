"""log-n attention scaling: the query at position p is multiplied by max(1, log(p+1) / log(L)).

Why: past the training length a query attends over more keys, so its attention entropy grows; scaling the logits by
log n / log L keeps the entropy near what the model saw in training (Chiang & Cholak 2022, arXiv 2202.12172; Su 2023).

How: a forward pre-hook on every attention module stashes that call's `position_ids`; a forward hook on the query
projection (`q_proj`, the query part of `qkv_proj` / `query_key_value`, or `q_norm` where the model normalises
queries after projecting them) scales each query row. Rotation is linear, so scaling before RoPE equals scaling
after it, and the attention function itself is untouched: logn composes with any attention implementation
(lm-infinite included) and with any rope rescaling method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lengthwise.models.families import model_info
from lengthwise.patching import Undo
from lengthwise.registry import option, register
from lengthwise.rope.scaling import logn_scale
from lengthwise.errors import UserError


@dataclass(frozen=True)
class LognConfig:
    original_max_position_embeddings: int | None = option(None, "L in log(p+1)/log(L); default: the model's "
                                                           "training length")

    def __post_init__(self) -> None:
        length = self.original_max_position_embeddings
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 2):
            raise UserError(f"logn original_max_position_embeddings must be an integer >= 2, got {length!r}")


def _query_target(attention: nn.Module, config) -> tuple[nn.Module, str, int, int] | None:
    """(module whose output holds the queries, layout, heads, head_dim) for one attention module, or None."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    head_dim = getattr(attention, "head_dim", None) or getattr(attention, "head_size", None)
    if isinstance(getattr(attention, "q_norm", None), nn.Module):
        return attention.q_norm, "heads-last", heads, head_dim  # output (..., H, head_dim) or (..., H*head_dim)
    if isinstance(getattr(attention, "q_proj", None), nn.Linear):
        return attention.q_proj, "all", heads, head_dim
    if isinstance(getattr(attention, "qkv_proj", None), nn.Linear):
        return attention.qkv_proj, "prefix", heads, head_dim  # [q (H*hd) | k | v]
    if isinstance(getattr(attention, "query_key_value", None), nn.Linear) and config.model_type == "gpt_neox":
        return attention.query_key_value, "per-head-thirds", heads, head_dim  # per head [q | k | v]
    return None


def _scaled(output: torch.Tensor, scale: torch.Tensor, layout: str, heads: int, head_dim: int) -> torch.Tensor:
    """Multiply the query part of `output` (B, T, ...) by `scale` (B or 1, T)."""
    s = scale.to(output.dtype)
    if layout in ("all", "heads-last"):
        shape = (*s.shape, *([1] * (output.dim() - 2)))
        return output * s.view(shape)
    if layout == "prefix":
        q_width = heads * head_dim
        return torch.cat([output[..., :q_width] * s[..., None], output[..., q_width:]], dim=-1)
    # per-head-thirds: (B, T, H * 3 * hd) viewed as (B, T, H, 3 * hd); the first hd of each head block is q
    view = output.view(*output.shape[:-1], heads, 3 * head_dim)
    q, rest = view[..., :head_dim] * s[..., None, None], view[..., head_dim:]
    return torch.cat([q, rest], dim=-1).view(output.shape)


@register(
    "logn",
    LognConfig,
    role="query-scale",
    summary="log-n scaling: each query multiplied by max(1, log(p+1)/log(L)), keeping attention entropy near "
    "training values past L; composes with rope methods and lm-infinite.",
    paper="Chiang & Cholak 2022 (arXiv 2202.12172); Su 2023, log-n scaling in ReRoPE/NTK posts",
    encodings=("rope",),
)
def apply_logn(model, config: LognConfig) -> Undo:
    length = config.original_max_position_embeddings or model_info(model).pretrain_length
    undo, found = Undo(), 0
    for attention in model.modules():
        target = _query_target(attention, model.config)
        if target is None or not any(m is target[0] for m in attention.children()):
            continue
        module, layout, heads, head_dim = target
        state: dict = {}

        def stash(mod, args, kwargs, state=state):
            positions = kwargs.get("position_ids")
            if positions is None:
                raise UserError(f"logn: {type(mod).__name__} was called without position_ids; cannot scale queries")
            state["scale"] = logn_scale(positions, length)  # (B or 1, T)

        def scale(mod, args, output, state=state, layout=layout, heads=heads, head_dim=head_dim):
            return _scaled(output, state["scale"].to(output.device), layout, heads, head_dim)

        undo.add(attention.register_forward_pre_hook(stash, with_kwargs=True).remove)
        undo.add(module.register_forward_hook(scale).remove)
        found += 1
    if not found:
        undo.remove()
        raise UserError(
            f"logn found no query projection (q_proj, qkv_proj, query_key_value, q_norm) in this "
            f"{model.config.model_type!r} model"
        )
    return undo
