"""What lengthwise needs to know about a model: its position encoding, training length and attention modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

ROPE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gpt_neox", "gptj", "olmo", "granite")
ALIBI_MODEL_TYPES = ("bloom", "mpt")


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
