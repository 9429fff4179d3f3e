"""Install Λ attention in a transformers model through its extension points, reversibly.

- RoPE families whose attention calls `ALL_ATTENTION_FUNCTIONS` (Llama, Mistral, Qwen2, Phi-3, GPT-NeoX, ...): our
  function is registered with `AttentionInterface` under `ATTN_NAME`, its mask with `AttentionMaskInterface` (the mask
  is only the 2-D padding mask: O(n), never Tq x Tk), and `config._attn_implementation` is switched to it (`lengthwise.models.compat.switch_attn_implementation`).
- ALiBi families (Bloom, MPT) compute the bias inside their attention module: `lengthwise.models.adapters` replaces
  that module's `forward` and calls `attend()` below.
A forward pre-hook on each attention module hands the attention function the KV cache of the current call (the
function itself does not receive it), so a `LambdaCache` can record the positions of the keys it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from lengthwise.attention.blocked import lambda_attention_blocked
from lengthwise.attention.cache import LambdaCache
from lengthwise.attention.flex import lambda_attention_flex
from lengthwise.attention.middle import BlockIndex
from lengthwise.attention.pattern import LambdaPattern, lambda_attention_reference
from lengthwise.models.compat import CACHE_NAMES, PatchNotInForce, cache_from_kwargs, cache_kwargs

ATTN_NAME = "lengthwise_lambda"
IMPLEMENTATIONS = {"blocked": lambda_attention_blocked, "eager": lambda_attention_reference,
                   "flex": lambda_attention_flex}


@dataclass
class LambdaState:
    """What one attention module needs: the pattern, how positions enter the scores, which kernel."""

    pattern: LambdaPattern
    encoding_fn: Any  # () -> RopeEncoding | AlibiEncoding (read at call time: follows RoPE methods patched later)
    impl: str = "blocked"
    block: int = 256
    cache: Any = None  # the KV cache of the current forward call (set by the pre-hook)
    method: str = "lm-infinite"  # for error messages
    model_type: str = ""


def attend(state: LambdaState, module, query, key, value, mask2d, q_pos, scale: float) -> torch.Tensor:
    """Λ attention of one layer: query (B, H, Tq, D), key/value (B, Hk, Tk, D) after the cache update,
    mask2d (B, >= Tq) bool padding mask or None, q_pos (B or 1, Tq) -> (B, H, Tq, D)."""
    B, _, Tq, _ = query.shape
    Tk = key.shape[2]
    q_pos = q_pos.to(query.device).long().expand(B, Tq)
    q_valid = None if mask2d is None else mask2d[:, -Tq:].bool()
    cache = state.cache
    if cache is None and Tk > Tq:  # keys from a cache the pre-hook never saw: their positions are unknown
        raise PatchNotInForce(state.method, state.model_type, f"the attention layer got {Tk - Tq} cached keys but "
                              f"never the KV cache itself (the cache-stashing hook was not reached)")
    middle, index = state.pattern.middle, None
    if isinstance(cache, LambdaCache):
        layer = cache.layers[module.layer_idx]
        if middle is not None and not layer.keep_all:
            raise PatchNotInForce(state.method, state.model_type, f"layer {module.layer_idx} attends to middle keys "
                                  f"but its bounded cache drops them (a LambdaCache made without keep_all_layers)")
        layer.record(q_pos, torch.ones_like(q_pos, dtype=torch.bool) if q_valid is None else q_valid)
        k_pos, k_valid = layer.positions, layer.valid
        if middle is not None and middle.top_blocks:
            index = layer.middle_index = layer.middle_index or BlockIndex()  # boxes of filled blocks, kept
    elif Tk == Tq:
        k_pos, k_valid = q_pos, q_valid
    else:  # a foreign cache (e.g. DynamicCache) holding every earlier key: positions are contiguous
        k_pos = q_pos[:, -1:] - torch.arange(Tk - 1, -1, -1, device=query.device)
        k_valid = mask2d[:, -Tk:].bool() if mask2d is not None and mask2d.shape[1] >= Tk else None
    if k_valid is not None and bool(k_valid.all()):
        k_valid = None
    impl = state.impl
    if impl == "blocked" and torch.is_grad_enabled() and query.requires_grad:
        impl = "eager"  # training (Temp-LoRA) needs gradients; the fused CPU kernel gives none through its lse
    kernel = IMPLEMENTATIONS[impl]
    kwargs = {"block": state.block, "index": index} if impl == "blocked" else {}
    return kernel(query, key, value, q_pos, k_pos, k_valid, state.pattern, state.encoding_fn(), scale, **kwargs)


def lambda_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`AttentionInterface` entry: returns (output (B, Tq, H, D), None)."""
    state: LambdaState = module.__dict__["_lengthwise_lambda"]
    Tq, Tk = query.shape[2], key.shape[2]
    q_pos = kwargs.get("position_ids")
    if q_pos is None:
        q_pos = torch.arange(Tk - Tq, Tk, device=query.device)[None]
    mask2d = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 else None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(state, module, query, key, value, mask2d, q_pos, scale)
    return out.transpose(1, 2).contiguous(), None


def lambda_mask(batch_size=None, q_length=None, kv_length=None, attention_mask=None, device="cpu", **kwargs):
    """`AttentionMaskInterface` entry: the 2-D padding mask (B, kv_length) as given, all True without padding
    (some models, e.g. MPT, call `.to()` on the result); never a Tq x Tk mask."""
    if attention_mask is None or attention_mask.ndim != 2:
        return torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    return attention_mask.bool()


AttentionInterface.register(ATTN_NAME, lambda_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, lambda_mask)


def attention_modules(model) -> list:
    """The self-attention modules (one per layer, each with `layer_idx`)."""
    found = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not found:
        raise ValueError(f"found no attention modules with a layer_idx in {type(model).__name__}")
    return found


def _stash_cache(module, args, kwargs):
    state = module.__dict__["_lengthwise_lambda"]
    state.cache = cache_from_kwargs(kwargs, state.method, state.model_type)


def install_states(model, make_state, undo, hook_cache: bool) -> None:
    """Attach `make_state(layer_idx)` to every attention module (and the cache-stashing pre-hook), reversibly."""
    for module in attention_modules(model):
        undo.setattr(module, "_lengthwise_lambda", make_state(module.layer_idx))
        if hook_cache:
            handle = module.register_forward_pre_hook(_stash_cache, with_kwargs=True)
            undo.add(handle.remove)


def use_cache_in_generate(model, cache_factory, undo) -> None:
    """Make a plain `model.generate()` on the patched model use the bounded cache unless one is passed. While it
    runs, a forward call that gets no cache (Phi-3 drops it once to recompute the prompt under its long-context
    frequencies) gets a fresh bounded one instead of an unbounded DynamicCache."""
    original = model.generate

    def keep_bounded(module, args, kwargs):
        if kwargs.get("use_cache", True) and all(kwargs.get(name) is None for name in CACHE_NAMES):
            return args, {**kwargs, **cache_kwargs(model, cache_factory(model))}
        return None

    def generate(*args, **kwargs):
        cache = next((kwargs.pop(name) for name in CACHE_NAMES if kwargs.get(name) is not None), None)
        cache = cache_factory(model) if cache is None else cache
        if not isinstance(cache, LambdaCache):
            return original(*args, **kwargs, **cache_kwargs(model, cache))
        kwargs.setdefault("use_cache", True)  # some configs (e.g. MPT) default to use_cache=False
        hook = model.register_forward_pre_hook(keep_bounded, with_kwargs=True)
        try:
            return original(*args, **kwargs, **cache_kwargs(model, cache))
        finally:
            hook.remove()

    generate.__doc__ = original.__doc__
    shadow_method(model, "generate", generate, undo)


def shadow_method(obj, name: str, function, undo) -> None:
    """Shadow a method with an instance attribute; `undo` deletes it again (restoring the class's method exactly,
    where `Undo.setattr` would leave a bound copy behind in the instance)."""
    if name in obj.__dict__:
        raise RuntimeError(f"{type(obj).__name__}.{name} is already overridden on this instance")
    obj.__dict__[name] = function
    undo.add(lambda: obj.__dict__.pop(name, None))
