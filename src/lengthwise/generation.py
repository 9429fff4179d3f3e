"""Greedy generation under any registered method (the one code path `generate`, gen-quality and passkey share)."""

from __future__ import annotations

import torch

from lengthwise.api import patch
from lengthwise.models.families import model_info
from lengthwise.methods.baselines import resolve_sliding_window
from lengthwise.registry import get_method, parse_method_spec
from lengthwise.models.compat import cache_kwargs
from lengthwise.static_decode import greedy_static

DECODE_PATHS = ("eager", "static", "compiled")


@torch.no_grad()
def generate_sliding_window(model, input_ids: torch.Tensor, max_new_tokens: int, window: int) -> torch.Tensor:
    """Greedy decoding where every step recomputes the model over the last `window` tokens (no cache).

    input_ids: (1, N) -> (1, N + max_new_tokens). The speed users pay to keep a model inside its training length.
    """
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids[:, -window:], use_cache=False).logits[:, -1]  # (1, V)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, method: str = "vanilla", max_new_tokens: int = 100,
             eos_token_id: int | None = None, decode: str = "eager") -> torch.Tensor:
    """Greedy continuation of `input_ids` (1, N) under `method` (a spec string); returns only the new tokens (T,).

    The model is patched for the call and restored afterwards. Methods with their own KV cache (lm-infinite,
    streaming) get it through the patch handle, so `model.generate()` keeps only what the method keeps.
    decode: "eager" (`model.generate()`), or, for lm-infinite on a Llama model, "static" / "compiled": the prompt
    is prefilled as usual, then each token is decoded on a static Λ cache (`lengthwise.static_decode`), eagerly or
    through torch.compile; its first step is checked against the eager step, and a model or option it does not
    compute is refused.
    """
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode must be one of {', '.join(DECODE_PATHS)}, got {decode!r}")
    parts = parse_method_spec(method)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if get_method(parts[0][0]).role == "scoring":
        window = resolve_sliding_window(method, model_info(model).pretrain_length).window
        return generate_sliding_window(model, input_ids, max_new_tokens, window)[0, input_ids.shape[1] :]
    with patch(model, method) as handle:
        cache = handle.new_cache()
        kwargs = cache_kwargs(model, cache)
        if decode != "eager":
            if cache is None:
                raise ValueError(f"decode={decode!r} runs on the bounded cache of lm-infinite, not on {method!r}")
            logits = model(input_ids=input_ids, **kwargs, use_cache=True, logits_to_keep=1).logits[:, -1]
            return greedy_static(model, cache, logits, max_new_tokens, eos_token_id, compile=decode == "compiled")[0]
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if eos_token_id is None else 0,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
            **kwargs,
        )
    return out[0, input_ids.shape[1] :]
