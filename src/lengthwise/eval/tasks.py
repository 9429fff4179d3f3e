"""What the long-context tasks (passkey, gen-quality, bench) share: scale templates in method specs, the
up-front memory estimate, and checks of their arguments. Everything here runs before any heavy work.

Scale template: a method spec may say `{s}` where a number is expected (`yarn:factor={s}`); each cell replaces it
by s = max(1, n / L_pretrain), n the longest sequence the cell runs (prompt + answer, prefix + generated tokens).
The record keeps the template as `method` (one row per method in reports) and the resolved spec as
`method_resolved`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from lengthwise.errors import UserError
from lengthwise.models.families import model_info
from lengthwise.registry import check_combination, context_length, get_entry, parse_method_spec

SCALE = "{s}"


def scale_for(length: int, pretrain_length: int) -> float:
    """s = n / L rounded to 4 decimals, never below 1 (inside the training length nothing is rescaled)."""
    return max(1.0, round(length / pretrain_length, 4))


def resolve_spec(spec: str, length: int, pretrain_length: int) -> str:
    """`spec` with every `{s}` replaced by the scale for `length` (`linear:factor={s}` -> `linear:factor=4`)."""
    if SCALE not in spec:
        return spec
    return spec.replace(SCALE, f"{scale_for(length, pretrain_length):g}")


def check_specs(methods: Sequence[str]) -> list[str]:
    """Validate method specs (names, options, combination) before loading anything; `{s}` is tried as 2."""

    if not methods:
        raise UserError("no method given; accepted: a registered method spec such as 'vanilla' or 'yarn:factor={s}'")
    for spec in methods:
        parts = parse_method_spec(resolve_spec(spec, 2, 1))
        check_combination([name for name, _ in parts])
        for name, options in parts:
            get_entry(name).make_config(**options)
    return list(methods)


def check_lengths(lengths: Sequence[int], minimum: int, what: str = "length") -> list[int]:
    if not lengths:
        raise UserError(f"no {what} given; accepted: integers >= {minimum}")
    bad = [n for n in lengths if not isinstance(n, int) or n < minimum]
    if bad:
        raise UserError(f"{what} {bad[0]!r} is too short; accepted: integers >= {minimum}")
    return list(lengths)


# Attention implementations that never materialise the n x n scores (for an unpadded sequence).
FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


# --- memory estimate -------------------------------------------------------------------------------------------


class InsufficientMemoryError(MemoryError):
    """A run would not fit in memory; raised before the model runs."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes
    kv: int  # keys and values of every layer
    attention: int  # the largest transient attention-score tensor (one layer)
    activations: int  # hidden states and MLP activations of one layer, logits
    total: int

    def describe(self) -> str:
        gib = 2**30
        return (f"{self.total / gib:.2f} GiB (weights {self.weights / gib:.2f}, KV {self.kv / gib:.2f}, "
                f"attention scores {self.attention / gib:.2f}, activations+logits {self.activations / gib:.2f})")


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def estimate_memory(model, length: int, method: str = "vanilla", batch: int = 1, logits: int | None = None,
                    attention_block: int = 2048) -> MemoryEstimate:
    """Bytes one forward pass over `length` tokens needs (an estimate from the config, an upper bound in practice).

    KV: 2 * layers * kv_heads * head_dim * n * dtype bytes. Attention scores: heads * n * n float32 for eager
    attention, heads * n * min(n, attention_block) for methods that replace the attention (lm-infinite/streaming
    run a blocked kernel) and for SDPA, whose fused kernels (flash on CPU and GPU) never hold the n x n scores: on
    SmolLM2 at 32k tokens dense SDPA prefill peaked at 1362 MiB, lm-infinite at 1386 MiB
    (docs/results/lm_infinite_speed_smollm2-135m.md), where n x n scores would be 36 GiB. A padded batch (batch > 1)
    adds SDPA's boolean n x n mask. Sliding-window never sees more than its window.
    `logits`: positions whose logits are computed (default all n).
    """

    config = model.config
    param = next(model.parameters())
    dtype_bytes = param.element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden = int(_config_value(config, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(_config_value(config, "num_attention_heads", "n_head", "n_heads", default=1))
    kv_heads = int(_config_value(config, "num_key_value_heads", default=heads))
    head_dim = int(_config_value(config, "head_dim", default=hidden // max(heads, 1)))
    inner = int(_config_value(config, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden)
    vocab = int(_config_value(config, "vocab_size", default=0))
    layers = model_info(model).num_layers
    n = length
    parts = parse_method_spec(method)
    roles = {get_entry(name).role for name, _ in parts}
    n = context_length(method, n, model_info(model).pretrain_length)  # the sliding window runs over fewer
    fused = getattr(config, "_attn_implementation", None) in FUSED_ATTENTION
    keys_per_query = min(n, attention_block) if "attention" in roles or fused else n
    kv = 2 * layers * kv_heads * head_dim * n * dtype_bytes * batch
    attention = heads * n * keys_per_query * 4 * batch
    if fused and "attention" not in roles and batch > 1:
        attention += batch * n * n  # the boolean padding mask
    activations = batch * n * (4 * hidden + 2 * inner) * max(dtype_bytes, 4)
    activations += batch * (n if logits is None else min(logits, n)) * vocab * 4
    return MemoryEstimate(weights, kv, attention, activations, weights + kv + attention + activations)


def available_memory(device: str = "cpu") -> int:
    """Bytes free now: CUDA free memory, else MemAvailable from /proc/meminfo (else total physical memory)."""
    import torch  # noqa: PLC0415

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(model, lengths: Sequence[int], methods: Sequence[str], *, limit_bytes: int | None = None,
                 device: str = "cpu", logits: int | None = None, headroom: float = 0.8) -> None:
    """Raise InsufficientMemoryError when the biggest (method, length) cell would not fit.

    `limit_bytes`: the memory one may use (default: `headroom` x what is available now).
    """
    limit = limit_bytes if limit_bytes is not None else int(available_memory(device) * headroom)
    worst = None
    for method in methods:
        for n in lengths:
            pretrain = getattr(model.config, "max_position_embeddings", None) or n
            estimate = estimate_memory(model, n, resolve_spec(method, n, pretrain), logits=logits)
            if worst is None or estimate.total > worst[2].total:
                worst = (method, n, estimate)
    if worst and worst[2].total > limit:
        method, n, estimate = worst
        raise InsufficientMemoryError(
            f"length {n} with method {method!r} needs about {estimate.describe()}, more than the "
            f"{limit / 2**30:.2f} GiB this run may use on {device}; use shorter lengths, a method with a bounded "
            "attention (lm-infinite, streaming), or raise the limit (--memory-limit-gib)"
        )


def gib(value: float | None) -> int | None:
    """GiB (CLI option) -> bytes; None and 0 mean: no explicit limit."""
    return None if not value else int(value * 2**30)


def digits(value: float, places: int = 4) -> float:
    return float(round(value, places)) if math.isfinite(value) else value
