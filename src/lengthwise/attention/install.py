"""One installer shared by `lm-infinite` and `streaming`: pattern -> reversible patch + bounded cache.

On models whose attention runs through transformers' AttentionInterface, each layer is read from the model's own
calls (`lengthwise.models.probe`): a sliding layer keeps its window (Λ ∩ window, its cache bounded by the window), a
NoPE layer gets the pattern without a rotation to limit, soft-capping and sinks come with every call, and on hybrid
models the layers that are not attention keep the cache layers transformers makes for them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from transformers.cache_utils import LinearAttentionCacheLayerMixin

from lengthwise.attention.cache import LambdaCache, LambdaCacheLayer, LambdaHybridLayer
from lengthwise.attention.hf import ATTN_NAME, LambdaState, install_states, use_cache_in_generate
from lengthwise.attention.middle import MiddleRetrieval
from lengthwise.attention.pattern import AlibiEncoding, LambdaPattern, RopeEncoding
from lengthwise.errors import UnsupportedModelError, UserError
from lengthwise.models import adapters
from lengthwise.models.compat import (PatchNotInForce, cache_kwargs, cache_layers_of, gptj_uses_attention_interface,
                                      switch_attn_implementation)
from lengthwise.models.families import attention_route, model_info
from lengthwise.models.probe import probe_attention
from lengthwise.patching import Undo
from lengthwise.rope.plan import POSITION_DEPENDENT_MARK
from lengthwise.models.rotary import rotary_layout


def require_single_frequency_set(model, method: str) -> None:
    """The distance limit moves rotated queries and keys with one set of inverse frequencies; a RoPE method whose
    frequencies depend on the position (n_hat > 0) or the length (dynamic-ntk, longrope short/long switch) patched
    before this one would make that move wrong, so refuse it now rather than at the first forward."""
    other = next((getattr(m, POSITION_DEPENDENT_MARK) for m in model.modules() if hasattr(m, POSITION_DEPENDENT_MARK)),
                 None)
    if other is not None:
        raise UserError(
            f"{method!r} cannot follow {other!r} with per-position or length-dependent frequencies (n_hat > 0, "
            f"dynamic-ntk, longrope short_factors): the distance limit re-rotates keys with one set of frequencies. "
            f"Use a static setting (n_hat=0, no short_factors), e.g. 'yarn:factor=4+{method}'"
        )


def _adapter_layers(model, info):
    """(module, layer pattern window, encoding_fn) of every layer of an adapter family (Bloom, MPT, GPT-J <= 5.23)."""
    if info.position_encoding == "alibi":
        encoding = AlibiEncoding(adapters.alibi_slopes(model))

        def encoding_fn():
            return encoding
    else:
        layout = rotary_layout(model)

        def encoding_fn():
            return RopeEncoding(layout.inv_freq, layout.style)
    return [(module, None, encoding_fn) for module in adapters.adapter_attention_modules(model)]


def _interface_layers(model, method: str, info):
    """(module, window, encoding_fn) of every attention layer read from the model's calls, the layer types, and the
    sliding_window keyword each layer's calls carry."""
    if info.position_encoding == "alibi":
        raise UnsupportedModelError(f"{method}: ALiBi is served for {', '.join(adapters.ATTENTION_CLASSES)} (their "
                                    f"attention adds the bias itself), not for {info.model_type!r}")
    gptj = gptj_uses_attention_interface(model)
    probe = probe_attention(model, method, rotations=not gptj)
    layers, call_windows = [], {}
    for layer in probe.layers:
        rotation = layer.rotation
        if rotation is None:
            def encoding_fn():
                return None  # a NoPE layer: the rule applies, no rotation to limit
        else:
            def encoding_fn(rotation=rotation):  # inv_freq read at call time: a RoPE method patched later is followed
                return RopeEncoding(rotation.inv_freq(model), rotation.style, rotation.offset)
        layers.append((layer.module, layer.sliding_window, encoding_fn))
        call_windows[layer.layer_idx] = layer.call_window
    if gptj:  # its shared sin/cos table ends at n_positions: use the formula
        layout = rotary_layout(model)
        layers = [(module, window, lambda: RopeEncoding(layout.inv_freq, layout.style)) for module, window, _ in layers]
    return layers, probe.layer_types, call_windows


def install_lambda(model, pattern: LambdaPattern, method: str, impl: str = "blocked", block: int = 256,
                   middle: MiddleRetrieval | None = None, middle_layers: range = range(0)) -> Undo:
    """Λ attention on every attention layer; the layers in `middle_layers` also attend to middle keys (`middle`), and
    their cache keeps every key."""
    info = model_info(model)
    route = attention_route(model)
    if info.position_encoding == "rope":
        require_single_frequency_set(model, method)
    if route == "adapter":
        layers, layer_types, call_windows = _adapter_layers(model, info), None, {}
    else:
        layers, layer_types, call_windows = _interface_layers(model, method, info)
    middle_layers = middle_layers if middle is not None else range(0)
    if middle is not None and any(window is not None for _, window, _ in layers):
        raise UnsupportedModelError(f"{method} middle retrieval (top_k / top_blocks) on a model with sliding-window "
                                    f"layers is not served: their windows drop the middle keys")
    layer_patterns = {}
    for module, window, _ in layers:
        layer_pattern = pattern.within_window(window)
        if module.layer_idx in middle_layers:
            layer_pattern = replace(layer_pattern, middle=middle)
        layer_patterns[module.layer_idx] = layer_pattern
    encodings = {module.layer_idx: encoding_fn for module, _, encoding_fn in layers}

    def make_state(module) -> LambdaState:
        index = module.layer_idx
        return LambdaState(layer_patterns[index], encodings[index], impl, block, method=method,
                           model_type=info.model_type, window=call_windows.get(index))

    undo = Undo()
    install_states([module for module, _, _ in layers], make_state, undo, hook_cache=route == "interface")
    if route == "adapter":
        adapters.replace_attention_forward(model, undo)
    elif gptj_uses_attention_interface(model):
        adapters.gptj_rotary_from_formula(model, undo)
    switch_attn_implementation(model, ATTN_NAME, undo)  # also routes mask creation to lengthwise's O(n) padding mask
    owner = (method, info.model_type)
    num_layers = len(layer_types) if layer_types is not None else info.num_layers

    def cache_factory(m):
        # the layers that are not Λ attention (linear attention, Mamba...) keep the cache layers transformers makes
        # (on hybrid layers beside the attention's own keys, with as many states as transformers gives them)
        others = cache_layers_of(m.config) if route == "interface" else [None] * num_layers
        cache_layers = []
        for index, other in zip(range(num_layers), others):
            if index not in layer_patterns:
                cache_layers.append(other)
                continue
            p = layer_patterns[index]
            bounds = dict(owner=owner, keep_all=index in middle_layers, sliding=p.window is not None)
            if isinstance(other, LinearAttentionCacheLayerMixin):
                cache_layers.append(LambdaHybridLayer(p.n_global, p.n_local, other.number_of_states, **bounds))
            else:
                cache_layers.append(LambdaCacheLayer(p.n_global, p.n_local, **bounds))
        return LambdaCache.of_layers(cache_layers)

    undo.cache_factory = cache_factory
    use_cache_in_generate(model, cache_factory, undo, owner)
    try:
        _run_once(model, cache_factory)
    except Exception as err:
        undo.remove()
        if isinstance(err, (UnsupportedModelError, PatchNotInForce)):
            raise
        raise UnsupportedModelError(f"{method} on model type {info.model_type!r}: the patched model fails on a "
                                    f"first call through its bounded cache ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''})") from err
    return undo


def _run_once(model, cache_factory) -> None:
    """Three tokens and then one more through a fresh bounded cache: a model whose code cannot take the cache (a
    cache class of its own, a check on the cache's type) fails here, at patch time, not in the user's first run."""
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    ids = torch.arange(1, 5, device=device)[None] % vocab
    cache = cache_factory(model)
    with torch.no_grad():
        for start, end in ((0, 3), (3, 4)):
            model(input_ids=ids[:, start:end], position_ids=torch.arange(start, end, device=device)[None],
                  use_cache=True, **cache_kwargs(model, cache))
