"""What lengthwise needs to know about a model: its position encoding, training length and attention modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

# The one model-type table: every family lengthwise claims, its position encoding, and how Λ attention reaches it.
# "interface": attention runs through transformers' AttentionInterface (q, k arrive rotated);
# "adapter": the attention module computes its own bias or rotation, so lengthwise.models.adapters replaces its
# forward. GPT-J is "adapter" up to transformers 5.23 and "interface" from 5.24 (lengthwise.models.compat).
# Each family has a tiny random config in lengthwise.testing and a row in the shared (method, family) test matrix.
# Not claimed: gemma2 (its attention logit soft-capping has no counterpart in the Λ kernels).
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("rope", "interface"),
    "mistral": ("rope", "interface"),
    "qwen2": ("rope", "interface"),
    "qwen3": ("rope", "interface"),
    "phi3": ("rope", "interface"),
    "gemma": ("rope", "interface"),
    "olmo": ("rope", "interface"),
    "granite": ("rope", "interface"),
    "gpt_neox": ("rope", "interface"),
    "gptj": ("rope", "adapter"),
    "bloom": ("alibi", "adapter"),
    "mpt": ("alibi", "adapter"),
}
ROPE_MODEL_TYPES = tuple(t for t, (encoding, _) in FAMILIES.items() if encoding == "rope")
ALIBI_MODEL_TYPES = tuple(t for t, (encoding, _) in FAMILIES.items() if encoding == "alibi")


def attention_route(model) -> str:
    """"interface" or "adapter" for this model (GPT-J's route depends on the transformers release)."""
    from lengthwise.models.compat import gptj_uses_attention_interface  # noqa: PLC0415

    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"model type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return "interface" if gptj_uses_attention_interface(model) else FAMILIES[model_type][1]


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    position_encoding: str  # "rope" | "alibi" | "other"
    pretrain_length: int  # L_pretrain: config.max_position_embeddings (lengthwise convention) or its equivalent
    num_layers: int


def _pretrain_length(config) -> int:
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    original = rope_parameters.get("original_max_position_embeddings") if isinstance(rope_parameters, dict) else None
    for value in (
        original,
        getattr(config, "max_position_embeddings", None),
        getattr(config, "max_seq_len", None),
        getattr(config, "n_positions", None),
        getattr(config, "seq_length", None),
    ):
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModelError(
        f"cannot tell the training length of model type {config.model_type!r}: set config.max_position_embeddings"
    )


def model_info(model: nn.Module) -> ModelInfo:
    config = model.config
    model_type = config.model_type
    if model_type in ALIBI_MODEL_TYPES or getattr(config, "alibi", False):
        encoding = "alibi"
    elif model_type in ROPE_MODEL_TYPES or getattr(config, "rope_parameters", None):
        encoding = "rope"
    else:
        encoding = "other"
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or getattr(config, "n_layers", 0)
    return ModelInfo(model_type, encoding, _pretrain_length(config), int(layers))


def require_encoding(model: nn.Module, method: str, accepted: tuple[str, ...]) -> ModelInfo:
    """Raise a clear error when `method` cannot work on this model's position encoding."""
    info = model_info(model)
    if info.position_encoding not in accepted:
        raise UnsupportedModelError(
            f"method {method!r} works on {' and '.join(accepted)} models; this {info.model_type!r} model uses "
            f"{info.position_encoding!r} position encoding. Supported model types: "
            f"RoPE {', '.join(ROPE_MODEL_TYPES)}; ALiBi {', '.join(ALIBI_MODEL_TYPES)}"
        )
    return info
