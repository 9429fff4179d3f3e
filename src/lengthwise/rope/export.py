"""Write a rope method's settings as a transformers-native `rope_parameters` dict, where transformers can express it.

    params = to_rope_parameters("yarn", YarnConfig(factor=4), model)
    config.rope_parameters = params   # a model built from this config computes what the patched model computes

What transformers cannot express raises a ValueError saying why: `n_hat > 0` (no start-token rule there), `logn`
(no query scale). `ntk` exports as the default rope with the NTK base (`rope_theta` = b s^(d/(d-2))): identical
frequencies. `dynamic-ntk` exports as transformers' "dynamic" type, which agrees on a fresh forward pass but keeps
the largest base it has seen and does not re-rotate cached keys (ours does both correctly). `longrope` without
short factors exports with short_factor = long_factor (never switching).
"""

from __future__ import annotations

from typing import Any

_CARRIED = ("rope_theta", "partial_rotary_factor")  # base settings kept from the model's own rope_parameters


def base_rope_parameters(model_config) -> dict[str, Any]:
    """The model's own rope settings without any scaling: {"rope_type": "default", "rope_theta": b, ...}."""
    current = getattr(model_config, "rope_parameters", None) or {}
    params: dict[str, Any] = {"rope_type": "default"}
    params.update({k: current[k] for k in _CARRIED if k in current})
    params.setdefault("rope_theta", float(getattr(model_config, "rope_theta", 10000.0)))
    return params


def to_rope_parameters(method: str, config: Any, model_or_config: Any) -> dict[str, Any]:
    """`rope_parameters` for `method` with `config` (its dataclass) on a model (or its config)."""
    from lengthwise.models.families import _pretrain_length  # noqa: PLC0415

    model_config = getattr(model_or_config, "config", model_or_config)
    params = base_rope_parameters(model_config)
    if method == "logn":
        raise ValueError("transformers has no log-n query scaling; logn cannot be written as rope_parameters")
    if getattr(config, "n_hat", 0):
        raise ValueError(
            f"transformers has no start-token rule (n_hat={config.n_hat}); {method} with n_hat > 0 cannot be written "
            f"as rope_parameters (use n_hat=0, or keep the lengthwise patch)"
        )
    length = getattr(config, "original_max_position_embeddings", None) or _pretrain_length(model_config)
    if method == "linear":
        params.update(rope_type="linear", factor=float(config.factor))
    elif method == "ntk":
        from lengthwise.rope.scaling import RopeGeometry, ntk_base  # noqa: PLC0415

        rotary_dim = _rotary_dim(model_or_config, params)
        params["rope_theta"] = ntk_base(RopeGeometry(rotary_dim, params["rope_theta"], length), config.factor)
    elif method == "dynamic-ntk":
        if length != getattr(model_config, "max_position_embeddings", length):
            raise ValueError(
                "transformers' dynamic rope reads L from max_position_embeddings; cannot export a different "
                f"original_max_position_embeddings ({length})"
            )
        params.update(rope_type="dynamic", factor=float(config.factor))
    elif method == "yarn":
        params.update(rope_type="yarn", factor=float(config.factor), original_max_position_embeddings=length,
                      beta_fast=float(config.beta_fast), beta_slow=float(config.beta_slow), truncate=config.truncate)
        if config.attention_factor is not None:
            params["attention_factor"] = float(config.attention_factor)
    elif method == "llama3":
        params.update(rope_type="llama3", factor=float(config.factor), original_max_position_embeddings=length,
                      low_freq_factor=float(config.low_freq_factor), high_freq_factor=float(config.high_freq_factor))
    elif method == "longrope":
        from lengthwise.rope.scaling import longrope_attention_factor  # noqa: PLC0415

        half = _rotary_dim(model_or_config, params) // 2
        long = list(config.long_factors) if config.long_factors is not None else [config.scale] * half
        short = list(config.short_factors) if config.short_factors is not None else long
        attention = (float(config.attention_factor) if config.attention_factor is not None
                     else longrope_attention_factor(config.scale, length))
        params.update(rope_type="longrope", long_factor=long, short_factor=short, factor=float(config.scale),
                      original_max_position_embeddings=length, attention_factor=attention)
    else:
        raise ValueError(
            f"no rope_parameters export for {method!r}; accepted: linear, ntk, dynamic-ntk, yarn, llama3, longrope"
        )
    return params


def _rotary_dim(model_or_config: Any, params: dict[str, Any]) -> int:
    if hasattr(model_or_config, "config"):
        from lengthwise.rope.rotation import rotary_layout  # noqa: PLC0415

        return rotary_layout(model_or_config).rotary_dim
    config = model_or_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * params.get("partial_rotary_factor", 1.0))
