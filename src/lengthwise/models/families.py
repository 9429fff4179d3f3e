"""What lengthwise needs to know about a model: its position encoding, its own context length, and how Λ attention
reaches its attention layers.

A model is served by what it does, not by its name: every RoPE causal LM whose attention layers run through
transformers' `AttentionInterface` is served, its layers' features read from its own calls
(`lengthwise.models.probe`). The table below holds only the exceptions: the families whose attention module computes
its own bias or rotation, reached through an adapter (`lengthwise.models.adapters`), and none else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from lengthwise.errors import UnsupportedModelError
from lengthwise.models.compat import gptj_uses_attention_interface

__all__ = ["ADAPTER_FAMILIES", "ModelInfo", "UnsupportedModelError", "attention_route", "config_encoding",
           "context_length", "model_info", "require_encoding", "shipped_rope_parameters"]

# model type -> position encoding, for the families served through an adapter. GPT-J runs through
# AttentionInterface from transformers 5.24 on (lengthwise.models.compat) and keeps only its rotary-table adapter.
ADAPTER_FAMILIES: dict[str, str] = {"gptj": "rope", "bloom": "alibi", "mpt": "alibi"}
# rope types whose frequencies follow the length (transformers' dynamic_rope_update)
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


def attention_route(model) -> str:
    """"adapter" (the family's attention forward is replaced) or "interface" (AttentionInterface)."""
    model_type = model.config.model_type
    if model_type in ADAPTER_FAMILIES and not gptj_uses_attention_interface(model):
        return "adapter"
    return "interface"


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    position_encoding: str  # "rope" | "alibi" | "other"
    pretrain_length: int  # L: the model's own context (see `context_length`)
    num_layers: int


def _get(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def _rope_parameter_sets(config: Any) -> list[dict]:
    """The rope parameter dicts of a config: one, or one per layer type (Gemma 3, OLMo 3: {"full_attention": {...}})."""
    params = _get(config, "rope_parameters")
    if not isinstance(params, dict):
        return []
    nested = [value for value in params.values() if isinstance(value, dict)]
    return nested if nested and all(isinstance(v, dict) for v in params.values()) else [params]


def shipped_rope_parameters(config: Any) -> dict | None:
    """The model's own RoPE scaling (rope_type other than "default"), or None. One set only: a config with per-layer
    rope parameters returns the first scaled set."""
    for params in _rope_parameter_sets(config):
        if params.get("rope_type", "default") != "default":
            return params
    return None


def context_length(config: Any) -> int:
    """The model's own context, which every method reads as L: `max_position_embeddings` (or its older names), or
    what a shipped RoPE scaling extends it to (original_max_position_embeddings x factor), whichever is larger.
    Llama 3.1 (llama3, 8192 x 8 -> 131072), Qwen2.5 with YaRN (32768 x 4), Phi-3-128k (longrope) and Gemma 3 (linear)
    thus read their full native context, not the length their scaling started from."""
    length = None
    for name in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = _get(config, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            length = value
            break
    for params in _rope_parameter_sets(config):
        original, factor = params.get("original_max_position_embeddings"), params.get("factor")
        if params.get("rope_type", "default") != "default" and isinstance(original, int) and \
                isinstance(factor, (int, float)) and factor >= 1:
            length = max(length or 0, int(round(original * factor)))
    if length is None:
        raise UnsupportedModelError(f"cannot tell the context length of model type {_get(config, 'model_type')!r}: "
                                    f"set config.max_position_embeddings")
    return length


def config_encoding(config: Any) -> str | None:
    """"rope", "alibi", "other", or None where the config alone does not tell (read without building the model)."""
    model_type = _get(config, "model_type")
    if model_type in ADAPTER_FAMILIES:
        return ADAPTER_FAMILIES[model_type]
    if _get(config, "alibi", False) or _get(_get(config, "attn_config", {}) or {}, "alibi", False):
        return "alibi"
    if _rope_parameter_sets(config) or _get(config, "rope_theta") is not None:
        return "rope"
    return None


def model_info(model: nn.Module) -> ModelInfo:
    config = model.config
    encoding = config_encoding(config) or "other"
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or \
        getattr(config, "n_layers", 0)
    return ModelInfo(config.model_type, encoding, context_length(config), int(layers))


def require_encoding(model: nn.Module, method: str, accepted: tuple[str, ...]) -> ModelInfo:
    """Raise a clear error when `method` cannot work on this model's position encoding."""
    info = model_info(model)
    if info.position_encoding not in accepted:
        alibi = ", ".join(t for t, e in ADAPTER_FAMILIES.items() if e == "alibi")
        raise UnsupportedModelError(
            f"method {method!r} works on {' and '.join(accepted)} models; this {info.model_type!r} model uses "
            f"{info.position_encoding!r} position encoding. Served: every RoPE causal LM whose attention runs "
            f"through transformers' AttentionInterface (docs/compatibility.md), and ALiBi models {alibi}"
        )
    return info
