"""One installer shared by `lm-infinite` and `streaming`: pattern -> reversible patch + bounded cache."""

from __future__ import annotations

from dataclasses import replace

from lengthwise.attention.cache import LambdaCache
from lengthwise.attention.hf import ATTN_NAME, LambdaState, install_states, use_cache_in_generate
from lengthwise.attention.middle import MiddleRetrieval
from lengthwise.attention.pattern import AlibiEncoding, LambdaPattern, RopeEncoding
from lengthwise.models.compat import gptj_uses_attention_interface, switch_attn_implementation
from lengthwise.models.families import attention_route, model_info
from lengthwise.patching import Undo


def require_single_frequency_set(rotary_module, method: str) -> None:
    """The distance limit moves rotated queries and keys with one set of inverse frequencies; a RoPE method whose
    frequencies depend on the position (n_hat > 0) or the length (dynamic-ntk, longrope short/long switch) patched
    before this one would make that move wrong, so refuse it now rather than at the first forward."""
    from lengthwise.methods.rope_scaling import POSITION_DEPENDENT_MARK  # noqa: PLC0415

    other = getattr(rotary_module, POSITION_DEPENDENT_MARK, None) if rotary_module is not None else None
    if other is not None:
        raise ValueError(
            f"{method!r} cannot follow {other!r} with per-position or length-dependent frequencies (n_hat > 0, "
            f"dynamic-ntk, longrope short_factors): the distance limit re-rotates keys with one set of frequencies. "
            f"Use a static setting (n_hat=0, no short_factors), e.g. 'yarn:factor=4+{method}'"
        )


def install_lambda(model, pattern: LambdaPattern, method: str, impl: str = "blocked", block: int = 256,
                   middle: MiddleRetrieval | None = None, middle_layers: range = range(0)) -> Undo:
    """Λ attention on every layer; the layers in `middle_layers` also attend to middle keys (`middle`), and their
    cache keeps every key."""
    from lengthwise.models import adapters  # noqa: PLC0415
    from lengthwise.rope.rotation import rotary_layout  # noqa: PLC0415

    info = model_info(model)
    route = attention_route(model)
    if info.position_encoding == "alibi":
        slopes = adapters.alibi_slopes(model)
        encoding = AlibiEncoding(slopes)

        def encoding_fn():
            return encoding
    else:
        layout = rotary_layout(model)
        require_single_frequency_set(layout.rotary_module, method)

        def encoding_fn():  # read inv_freq at call time, so a RoPE method patched later is honoured
            return RopeEncoding(layout.inv_freq, layout.style)

    undo = Undo()
    middle_layers = middle_layers if middle is not None else range(0)

    def make_state(layer_idx: int) -> LambdaState:
        layer_pattern = replace(pattern, middle=middle) if layer_idx in middle_layers else pattern
        return LambdaState(layer_pattern, encoding_fn, impl, block, method=method, model_type=info.model_type)

    install_states(model, make_state, undo, hook_cache=route == "interface")
    if route == "adapter":
        adapters.replace_attention_forward(model, undo)
    elif gptj_uses_attention_interface(model):
        adapters.gptj_rotary_from_formula(model, undo)
    switch_attn_implementation(model, ATTN_NAME, undo)  # also routes mask creation to our O(n) padding mask
    num_layers = info.num_layers

    def cache_factory(m):
        return LambdaCache(num_layers, pattern.n_global, pattern.n_local, owner=(method, info.model_type),
                           keep_all_layers=middle_layers)

    undo.cache_factory = cache_factory
    use_cache_in_generate(model, cache_factory, undo)
    return undo
