"""Install Λ attention in a transformers model through its extension points, reversibly.

- models whose attention calls `ALL_ATTENTION_FUNCTIONS` (every RoPE causal LM of transformers but a few): the
  function is registered with `AttentionInterface` under `ATTN_NAME`, its mask with `AttentionMaskInterface` (the mask
  is only the 2-D padding mask: O(n), never Tq x Tk), and `config._attn_implementation` is switched to it
  (`lengthwise.models.compat.switch_attn_implementation`). Each layer's call carries what the model does besides
  positions (its sliding window, soft-capping, sinks: `score_mods`); a keyword the kernels do not apply is refused.
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
from lengthwise.attention.cache import LambdaCache, LambdaCacheLayer
from lengthwise.attention.flex import lambda_attention_flex
from lengthwise.attention.middle import BlockIndex
from lengthwise.attention.pattern import NO_MODS, LambdaPattern, ScoreMods
from lengthwise.attention.reference import lambda_attention_reference
from lengthwise.models.compat import CACHE_NAMES, PatchNotInForce, cache_from_kwargs, cache_kwargs
from lengthwise.models.masks import NotCausalWithWindow, mask_window, tag, window_of
from lengthwise.models.probe import HARMLESS_KEYWORDS, SERVED_KEYWORDS

ATTN_NAME = "lengthwise_lambda"
IMPLEMENTATIONS = {"blocked": lambda_attention_blocked, "eager": lambda_attention_reference,
                   "flex": lambda_attention_flex}


@dataclass
class LambdaState:
    """What one attention layer needs: its pattern, how positions enter its scores, which kernel, and what its own
    calls carry (read by `lengthwise.models.probe` when the patch was made)."""

    pattern: LambdaPattern  # this layer's: Λ, intersected with the layer's own sliding window
    encoding_fn: Any  # () -> RopeEncoding | AlibiEncoding | None (read at call time: follows RoPE methods patched later)
    impl: str = "blocked"
    block: int = 256
    cache: Any = None  # the KV cache of the current forward call (set by the pre-hook)
    position_ids: Any = None  # the positions the attention module was called with (set by the pre-hook)
    method: str = "lm-infinite"  # for error messages
    model_type: str = ""
    window: int | None = None  # the sliding_window keyword the layer's calls carry (the pattern holds the window)

    def fail(self, what: str, todo: str = "") -> PatchNotInForce:
        return PatchNotInForce(self.method, self.model_type, what, todo)


def attend(state: LambdaState, module, query, key, value, mask2d, q_pos, scale: float,
           mods: ScoreMods = NO_MODS) -> torch.Tensor:
    """Λ attention of one layer: query (B, H, Tq, D), key (B, Hk, Tk, D), value (B, Hk, Tk, Dv) after the cache
    update, mask2d (B, >= Tq) bool padding mask or None, q_pos (B or 1, Tq), or None: the next Tq positions after
    the tokens the cache has seen -> (B, H, Tq, Dv)."""
    B, _, Tq, _ = query.shape
    Tk = key.shape[2]
    if q_pos is None:  # a bounded cache holds fewer keys than it has seen: count from what it has seen
        seen = state.cache.layers[module.layer_idx].seen if isinstance(state.cache, LambdaCache) else Tk
        q_pos = torch.arange(seen - Tq, seen, device=query.device)[None]
    q_pos = q_pos.to(query.device).long().expand(B, Tq)
    q_valid = None if mask2d is None else mask2d[:, -Tq:].bool()
    cache = state.cache
    if cache is None and Tk > Tq:  # keys from a cache the pre-hook never saw: their positions are unknown
        raise state.fail(f"the attention layer got {Tk - Tq} cached keys but never the KV cache itself (the "
                         f"cache-stashing hook was not reached)")
    middle, index = state.pattern.middle, None
    if isinstance(cache, LambdaCache):
        layer = cache.layers[module.layer_idx]
        if not isinstance(layer, LambdaCacheLayer):
            raise state.fail(f"cache layer {module.layer_idx} is a {type(layer).__name__}, not a bounded Λ layer")
        if middle is not None and not layer.keep_all:
            raise state.fail(f"layer {module.layer_idx} attends to middle keys but its bounded cache drops them (a "
                             f"LambdaCache made without keep_all_layers)")
        if layer.positions is not None and layer.positions.shape[1] == layer.keys.shape[-2]:
            pass  # a second attention call over the same cache update (differential attention): recorded already
        elif layer.positions is not None and layer.positions.numel() and \
                bool((q_pos.min(-1).values <= layer.positions.max(-1).values).any()):
            raise state.fail(f"this call's positions start at {int(q_pos.min())}, yet the cache holds keys up to "
                             f"position {int(layer.positions.max())} (the model numbers positions from 0 again)",
                             "pass position_ids (generate() does)")
        else:
            layer.record(q_pos, torch.ones_like(q_pos, dtype=torch.bool) if q_valid is None else q_valid)
        k_pos, k_valid = layer.positions, layer.valid
        if middle is not None and middle.top_blocks:
            index = layer.middle_index = layer.middle_index or BlockIndex()  # boxes of filled blocks, kept
    elif Tk == Tq:  # one pass (a cache transformers made for this call, or none)
        k_pos, k_valid = q_pos, q_valid
    else:
        raise state.fail(f"the KV cache passed in ({type(cache).__name__}) already holds {Tk - Tq} keys: only the "
                         f"method's own cache keeps its bound", "pass `handle.new_cache()`, or no cache to generate()")
    if k_valid is not None and bool(k_valid.all()):
        k_valid = None
    impl = state.impl
    if impl == "blocked" and torch.is_grad_enabled() and query.requires_grad:
        impl = "eager"  # training (Temp-LoRA) needs gradients; the fused CPU kernel gives none through its lse
    kernel = IMPLEMENTATIONS[impl]
    kwargs = {"block": state.block, "index": index} if impl == "blocked" else {}
    return kernel(query, key, value, q_pos, k_pos, k_valid, state.pattern, state.encoding_fn(), scale, mods=mods,
                  **kwargs)


def score_mods(state: LambdaState, kwargs: dict) -> ScoreMods:
    """The score modifications an attention call carries, checked against what the patch was made for: the layer's
    own sliding window, soft-capping, sinks; any other keyword lengthwise does not know is refused."""
    unknown = sorted(name for name, value in kwargs.items()
                     if value is not None and name not in HARMLESS_KEYWORDS | SERVED_KEYWORDS)
    if unknown:
        raise state.fail(f"the attention call carries {', '.join(unknown)}, which the Λ kernels do not apply")
    if kwargs.get("is_causal") is False:
        raise state.fail("the attention call is not causal (is_causal=False)")
    window = kwargs.get("sliding_window")
    if window != state.window:  # the keyword as the layer passed it when the patch was made (or None)
        raise state.fail(f"the attention call carries sliding_window={window!r}, the patch was made for "
                         f"{state.window!r}", "patch the model again")
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    return ScoreMods(None if softcap is None else float(softcap), sinks)


def lambda_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`AttentionInterface` entry: returns (output (B, Tq, H, Dv), None)."""
    state: LambdaState = module.__dict__["_lengthwise_lambda"]
    mods = score_mods(state, kwargs)
    built, window = window_of(attention_mask)
    if isinstance(window, str):
        raise state.fail(f"layer {module.layer_idx}: {window}")
    if not built or window != state.pattern.window:
        raise state.fail(f"layer {module.layer_idx} got an attention mask " + (
            f"with window {window!r}, the patch was made for {state.pattern.window!r}" if built else
            "the model built itself, outside transformers' mask interface"), "patch the model again")
    q_pos = kwargs.get("position_ids")
    if q_pos is None:  # some attention modules take position_ids themselves and do not pass them on
        q_pos = state.position_ids
    mask2d = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 else None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(state, module, query, key, value, mask2d, q_pos, scale, mods)
    return out.transpose(1, 2).contiguous(), None


def lambda_mask(batch_size=None, q_length=None, kv_length=None, attention_mask=None, device="cpu", mask_function=None,
                **kwargs):
    """`AttentionMaskInterface` entry: the 2-D padding mask (B, kv_length) as given, all True without padding
    (some models, e.g. MPT, call `.to()` on the result); never a Tq x Tk mask. The window of the mask function the
    model chose for the layers it is built for travels with it (`lengthwise.models.masks`)."""
    try:
        window = None if mask_function is None else mask_window(mask_function)
    except NotCausalWithWindow as err:  # refused by the layer that gets this mask (a model may build masks it never uses)
        window = f"its attention mask is not causal with a sliding window ({err})"
    if attention_mask is None or attention_mask.ndim != 2:
        mask = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    else:
        mask = attention_mask.bool().clone()  # a tensor of its own, whose window is known
    return tag(mask, window)


AttentionInterface.register(ATTN_NAME, lambda_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, lambda_mask)


def _stash_cache(module, args, kwargs):
    state = module.__dict__["_lengthwise_lambda"]
    state.cache = cache_from_kwargs(kwargs, state.method, state.model_type)
    state.position_ids = kwargs.get("position_ids")


def install_states(modules, make_state, undo, hook_cache: bool) -> None:
    """Attach `make_state(module)` to every attention module (and the cache-stashing pre-hook), reversibly."""
    for module in modules:
        undo.setattr(module, "_lengthwise_lambda", make_state(module))
        if hook_cache:
            handle = module.register_forward_pre_hook(_stash_cache, with_kwargs=True)
            undo.add(handle.remove)


def use_cache_in_generate(model, cache_factory, undo, owner: tuple[str, str]) -> None:
    """Make a plain `model.generate()` on the patched model use the bounded cache unless one is passed. While it
    runs, a forward call that gets no cache (Phi-3 drops it once to recompute the prompt under its long-context
    frequencies) gets a fresh bounded one instead of an unbounded DynamicCache. A cache of another kind passed to
    generate() or forward() is refused (`owner`: method and model type, for the message)."""
    original = model.generate

    def require_bounded(cache, where: str) -> None:
        """A cache handed to generate() or forward() must be the method's own: a DynamicCache (even empty) would keep
        every key of every call, without a word."""
        if not isinstance(cache, LambdaCache):
            raise PatchNotInForce(*owner, f"{where} got a {type(cache).__name__}, which keeps every key: only the "
                                  f"method's own cache keeps its bound", "pass `handle.new_cache()`, or no cache")

    def keep_bounded(module, args, kwargs):
        if kwargs.get("use_cache", True) and all(kwargs.get(name) is None for name in CACHE_NAMES):
            return args, {**kwargs, **cache_kwargs(model, cache_factory(model))}
        return None

    def generate(*args, **kwargs):
        cache = next((kwargs.pop(name) for name in CACHE_NAMES if kwargs.get(name) is not None), None)
        cache = cache_factory(model) if cache is None else cache
        require_bounded(cache, "generate()")
        kwargs.setdefault("use_cache", True)  # some configs (e.g. MPT) default to use_cache=False
        hook = model.register_forward_pre_hook(keep_bounded, with_kwargs=True)
        try:
            return original(*args, **kwargs, **cache_kwargs(model, cache))
        finally:
            hook.remove()

    generate.__doc__ = original.__doc__
    undo.shadow(model, "generate", generate)

    def refuse_foreign_cache(module, args, kwargs):
        cache = next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)
        if cache is not None:
            require_bounded(cache, "forward()")

    undo.add(model.register_forward_pre_hook(refuse_foreign_cache, with_kwargs=True).remove)
