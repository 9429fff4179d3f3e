"""Tiny random models and a tiny tokenizer, built in code, for tests of every supported family.

    model = tiny_model("llama")           # GQA Llama, 2 layers, L_pretrain 64
    model = tiny_model("gpt_neox", max_position_embeddings=32)
"""

from __future__ import annotations

import functools

import torch

from lengthwise.errors import UserError
from lengthwise.models.families import ADAPTER_FAMILIES
from lengthwise.training.reference import train_tokenizer

# The rows of the shared (method, family) test matrix: hand-written tiny configs of representative families, every
# adapter family among them (a test checks). Every other RoPE type transformers registers is walked by
# `lengthwise.zoo` (tests/test_walk.py).
ROPE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "granite", "gpt_neox", "gptj")
ALIBI_FAMILIES = tuple(t for t, encoding in ADAPTER_FAMILIES.items() if encoding == "alibi")
TINY_FAMILIES = ROPE_FAMILIES + ALIBI_FAMILIES
VOCAB = 320
# Llama-like families: (config class name, extra settings)
LLAMA_LIKE = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"sliding_window": None}),
    "qwen3": ("Qwen3Config", {"sliding_window": None, "head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "olmo": ("OlmoConfig", {}),
    "granite": ("GraniteConfig", {"attention_multiplier": 0.2}),  # a scale other than head_dim^-0.5
}


def _config(family: str, length: int, **overrides):
    import transformers as tf  # noqa: PLC0415

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    if family in LLAMA_LIKE:
        class_name, extra = LLAMA_LIKE[family]
        cfg = getattr(tf, class_name)(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=length,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra, **common)
    elif family == "phi3":
        cfg = tf.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=length, original_max_position_embeddings=length,
                            partial_rotary_factor=0.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                            **common)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=length, rotary_pct=0.25,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.25}, **common)
    elif family == "gptj":
        cfg = tf.GPTJConfig(n_embd=64, n_inner=96, n_layer=2, n_head=4, rotary_dim=8, n_positions=length, **common)
    elif family == "bloom":
        cfg = tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common)
        cfg.max_position_embeddings = length
    elif family == "mpt":
        cfg = tf.MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=length,
                           attn_config={"alibi": True}, **common)
    else:
        raise UserError(f"unknown tiny family {family!r}; accepted: {', '.join(TINY_FAMILIES)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str = "llama", length: int = 64, seed: int = 0, **overrides):
    """A randomly initialised float32 model in eval mode, training length `length` (config.max_position_embeddings)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    config = _config(family, length, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform attention; sharpen it so tests notice wrong masks and positions.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and any(k in name for k in ("q_proj", "k_proj", "query_key_value", "Wqkv", "qkv_proj")):
                param.mul_(4.0)
    return model.eval()


def random_ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def random_qkv(B: int = 2, H: int = 4, Hk: int = 2, T: int = 70, D: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Random q (B, H, T, D), k and v (B, Hk, T, D) for kernel tests."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, heads, T, D, generator=generator) for heads in (H, Hk, Hk)]


def left_padded_positions(B: int, T: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) and validity (B, T) with row 1 left-padded by `pad` tokens, positions as transformers'
    generate() makes them (pads at 1)."""
    pos = torch.arange(T)[None].repeat(B, 1)
    valid = torch.ones(B, T, dtype=torch.bool)
    if pad:
        valid[1, :pad] = False
        pos[1] = (pos[1] - pad).masked_fill(~valid[1], 1)
    return pos, valid


@functools.cache
def tiny_tokenizer():
    """A small byte-level BPE tokenizer trained in code (no download), vocab <= 300."""

    text = ("The grass is green. The sky is blue. The pass key is 12345. def main(): return 0\n" * 20)
    return train_tokenizer([text], 300)
