"""The one place that knows transformers' internals: every name read here that is not a documented extension point.

Supported range: `SUPPORTED_TRANSFORMERS` (pyproject declares the same; `make test-compat` runs the default tier on
both ends). The differences handled here, each found by feature detection rather than by version number:

- the KV-cache keyword: 5.24 renamed `past_key_values` to `cache` in model and attention-layer forwards (the old
  name is deprecated until 5.40); Bloom's attention layer still calls it `layer_past`. `cache_from_kwargs` reads
  any of them and raises on a `Cache` passed under a name it does not know; `cache_kwargs` builds the right one.
- GPT-J: up to 5.23 every attention layer rotates q/k itself from a sin/cos table of `n_positions` rows
  (`GPTJAttention._get_embed_positions`), so lengthwise replaces that layer's forward; from 5.24 the model holds one
  `transformer.rotary_emb` table and its attention runs through `ALL_ATTENTION_FUNCTIONS`, so lengthwise takes the
  standard attention path and only replaces the table lookup by the formula (any position, no table).
- the attention-implementation switch: `PreTrainedModel.set_attn_implementation` where the model supports it;
  Bloom and MPT (attention not yet on `AttentionInterface`) refuse it, and for them the config's internal
  `_attn_implementation_internal` is written (it only routes their mask creation to lengthwise's O(n) padding mask).
- cache layers: `generate()` asks `is_croppable` (5.24) before assisted decoding; bounded layers say False.
- cache layers that hold keys at positions 0..n-1 (`DynamicLayer`, not the sliding kind): the only ones a change
  of frequencies during decoding may rebuild or re-rotate (`full_dynamic_layers`).
- static RoPE rescaling: a new rotary module of the model's own class, built from a copy of its config with
  `rope_parameters` set (transformers computes the frequencies), replaces the live one; nothing is written into
  the live module. Its constructor takes `config=` in every supported release.

`PatchNotInForce` is the error every run-time check raises when a patch finds it is not doing what it promised.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import transformers
from packaging.version import Version

from lengthwise.errors import UserError

TRANSFORMERS_VERSION = transformers.__version__
SUPPORTED_TRANSFORMERS = ">=5.20,<5.26"  # keep equal to pyproject's dependency (a test checks)
CACHE_NAMES = ("cache", "past_key_values", "layer_past")  # model / attention forward keywords that carry the KV cache


class PatchNotInForce(RuntimeError):
    """A patch found at run time that it is not in force (a hook not reached, a bound not kept)."""

    def __init__(self, method: str, model_type: str, what: str, todo: str = "") -> None:
        supported = "" if version_supported() else f" (outside the supported range {SUPPORTED_TRANSFORMERS})"
        advice = todo or (f"install a supported release (pip install 'transformers{SUPPORTED_TRANSFORMERS}') "
                          f"or report this with the versions")
        super().__init__(f"{method} on model type {model_type!r} with transformers {TRANSFORMERS_VERSION}"
                         f"{supported}: {what}; {advice}")


def version_supported(version: str = TRANSFORMERS_VERSION) -> bool:
    from packaging.specifiers import SpecifierSet  # noqa: PLC0415

    return Version(version) in SpecifierSet(SUPPORTED_TRANSFORMERS)


# ------------------------------------------------------------------------------------------------------- KV cache
@functools.cache
def _cache_keyword(forward) -> str:
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model) -> str:
    """The keyword this model's forward (and generate) takes the KV cache under."""
    return _cache_keyword(type(model).forward)


def cache_kwargs(model, cache) -> dict[str, Any]:
    """`model(**inputs, **cache_kwargs(model, cache))`: the cache under the name this release expects."""
    return {} if cache is None else {cache_keyword(model): cache}


def cache_from_kwargs(kwargs: dict, method: str, model_type: str):
    """The KV cache among a forward's keyword arguments, or None. A `Cache` under an unknown name means the release
    renamed the keyword again: raise rather than run without the cache the patch must see."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    from transformers.cache_utils import Cache  # noqa: PLC0415

    for name, value in kwargs.items():
        if isinstance(value, Cache):
            raise PatchNotInForce(method, model_type, f"the KV cache arrives as keyword {name!r}, which lengthwise "
                                  f"does not know (known: {', '.join(CACHE_NAMES)})")
    return None


def output_cache(outputs):
    """The cache a model call returned (`cache` from 5.24, `past_key_values` before)."""
    for name in ("cache", "past_key_values"):
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None


# ---------------------------------------------------------------------------------------------------------- GPT-J
def gptj_rotary_table(model):
    """From 5.24: GPT-J's shared `rotary_emb` (a sin/cos table of n_positions rows); None where each attention layer
    keeps its own table (<= 5.23)."""
    return getattr(getattr(model, "transformer", None), "rotary_emb", None)


def gptj_uses_attention_interface(model) -> bool:
    return model.config.model_type == "gptj" and gptj_rotary_table(model) is not None


def gptj_layer_table(attention_module, positions):
    """<= 5.23 only: the per-layer sin/cos table lookup (tests compare lengthwise's rotation with the family's)."""
    return attention_module._get_embed_positions(positions)


# ------------------------------------------------------------------------------------------- attention implementation
def switch_attn_implementation(model, name: str, undo) -> None:
    """Point the model and its sub-models at attention implementation `name`; `undo` restores the previous one."""
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs[id(config)] = config
    if model._can_set_attn_implementation():
        # restored field by field, not by a second set_attn_implementation: that one validates the name and refuses
        # an implementation the model runs under but transformers does not list (set on the config directly)
        previous = [(config, config._attn_implementation_internal) for config in configs.values()]
        model.set_attn_implementation(name)
        undo.add(lambda: [setattr(config, "_attn_implementation_internal", value) for config, value in previous])
        return
    for config in configs.values():  # Bloom, MPT: no public switch; only their mask creation reads it
        undo.setattr(config, "_attn_implementation_internal", name)


def layer_types_of(config) -> list[tuple[str, int | None]]:
    """(type, sliding window) of every layer, as transformers' `DynamicCache(config=...)` reads them
    (`cache_utils.get_layer_types_and_kwargs`: explicit `layer_types`, else inferred from the sliding window). Types:
    "full_attention", "sliding_attention", "chunked_attention", "linear_attention", "mamba", "dummy" (KV-sharing or
    attention-free layers)...; the window is the one a sliding (or chunked) layer's cache keeps."""
    from transformers.cache_utils import get_layer_types_and_kwargs  # noqa: PLC0415

    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return [(kind, extra.get("sliding_window")) for kind, extra in zip(types, kwargs)]


def cache_layers_of(config) -> list:
    """The cache layers transformers builds for this config, one per model layer (`DynamicCache(config=...)`)."""
    from transformers import DynamicCache  # noqa: PLC0415

    return list(DynamicCache(config=config).layers)


def standard_rope_frequencies(config, rope_parameters: dict[str, Any]):
    """(inv_freq, attention factor) of transformers' standard function for `rope_parameters`
    (`modeling_rope_utils.ROPE_INIT_FUNCTIONS`, on a copy of `config`), or None for a type it has no function for."""
    import copy  # noqa: PLC0415

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: PLC0415

    function = ROPE_INIT_FUNCTIONS.get(rope_parameters.get("rope_type", "default"))
    if function is None:
        return None
    config = copy.copy(config.get_text_config(decoder=True))
    config.rope_parameters = dict(rope_parameters)
    return function(config, None)


def rotary_from_rope_parameters(rotary, rope_parameters: dict[str, Any]):
    """A rotary module of `rotary`'s class, on its device and dtype, built from its config with `rope_parameters`
    instead of its own (the config is copied; the model's is untouched)."""
    import copy  # noqa: PLC0415

    config = copy.copy(rotary.config)
    config.rope_parameters = dict(rope_parameters)
    built = type(rotary)(config=config)
    return built.to(device=rotary.inv_freq.device, dtype=rotary.inv_freq.dtype)


def full_dynamic_layers(cache) -> None:
    """Refuse caches whose layers do not hold keys at positions 0..n-1 (sliding, quantised, ...)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # noqa: PLC0415

    for index, layer in enumerate(cache.layers):
        if not isinstance(layer, DynamicLayer) or isinstance(layer, DynamicSlidingWindowLayer):
            raise UserError(
                f"frequencies changed during decoding, and cache layer {index} is a {type(layer).__name__}: the cache "
                f"can be updated only when it is a full DynamicCache (keys at positions 0..n-1)"
            )
