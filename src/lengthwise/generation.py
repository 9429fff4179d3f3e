"""Greedy generation under any registered method or scoring strategy (the one code path `generate`, gen-quality and
the chat share): the spec's scorer generates (`lengthwise.scoring`)."""

from __future__ import annotations

import torch

from lengthwise.errors import UserError
from lengthwise.scoring import DECODE_PATHS, open_scorer


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, method: str = "vanilla", max_new_tokens: int = 100,
             eos_token_id: int | None = None, decode: str = "eager", decode_weights: str = "model",
             decode_kv: str = "model") -> torch.Tensor:
    """Greedy continuation of `input_ids` (1, N) under `method` (a spec string); returns only the new tokens (T,).

    The model is patched for the call and restored afterwards. Methods with their own KV cache (lm-infinite,
    streaming) get it through the patch handle, so `model.generate()` keeps only what the method keeps; the
    sliding-window baseline recomputes the model over its last `window` tokens at every step.
    decode: "eager" (`model.generate()`), or, for lm-infinite on a Llama model, "static" / "compiled": the prompt
    is prefilled as usual, then each token is decoded on a static Λ cache (`lengthwise.static_decode`), eagerly or
    through torch.compile; its first step is checked against the eager step, and a model or option it does not
    compute is refused. decode_weights: how the static step stores the projection weights it reads
    (`lengthwise.static_decode.WEIGHT_FORMATS`: "model", or "bfloat16" / "float16" / "int8" copies of a float32
    model's, fewer bytes per token; the prompt is prefilled with the model's own); decode_kv: how its static buffers
    hold the keys and values (`KV_FORMATS`: "model" or "bfloat16").
    """
    if decode not in DECODE_PATHS:
        raise UserError(f"decode must be one of {', '.join(DECODE_PATHS)}, got {decode!r}")
    input_ids = input_ids.to(next(model.parameters()).device)
    with open_scorer(model, method) as scorer:
        return scorer.generate(input_ids, max_new_tokens, eos_token_id, decode, decode_weights, decode_kv)
