"""Keeping a KV cache on the frequencies of the current call, for rope plans whose frequencies change with the length.

Keys enter the cache already rotated. When a length-dependent plan (dynamic-ntk, longrope's short/long switch)
changes frequencies while the cache holds entries, those keys carry the old angles and would silently mix with
queries under the new ones. `CacheSync` records, on the cache itself, which regime and which tokens it holds, and
at a regime change either rebuilds the cache from its tokens (exact) or re-rotates the cached keys (cheap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lengthwise.models.compat import cache_kwargs, full_dynamic_layers
from lengthwise.rope.plan import FrequencyPlan
from lengthwise.rope.rotation import rotate
from lengthwise.errors import UserError

RECORD_ATTRIBUTE = "_lengthwise_rope"  # set on the cache object: the CacheRecord of what it holds


@dataclass
class CacheRecord:
    """Stored on a KV cache: the frequency regime its entries were computed under, and what it holds."""

    regime: Any
    seq_len: int  # the length whose frequencies the cached keys carry
    positions: torch.Tensor  # (B, n) positions of the cached tokens
    input_ids: torch.Tensor | None  # (B, n) their tokens (to rebuild the cache), None if fed as embeddings


def rerotate_cache(cache, plan: FrequencyPlan, positions: torch.Tensor, old_seq_len: int, seq_len: int) -> None:
    """Re-rotate every cached key from the frequencies of `old_seq_len` to those of `seq_len`, in place.

    positions (B, n) of the cached keys. Exact for the first layer; deeper layers' keys and values were computed
    from hidden states that attended under the old frequencies, which no rotation can undo (see `CacheSync`).
    """
    full_dynamic_layers(cache)
    old, old_factor = plan.angles(positions, old_seq_len)  # (B, n, d/2)
    new, new_factor = plan.angles(positions, seq_len)
    # difference of the float32 angles actually used, taken in float64 so the round trip adds no error of its own
    delta = (new.double() - old.double())[:, None]  # (B, 1, n, d/2)
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        rotated = rotate(keys.double(), delta, "half")  # (B, H, n, head_dim)
        if new_factor != old_factor:
            rotated[..., : 2 * delta.shape[-1]] *= new_factor / old_factor
        layer.keys = rotated.to(keys.dtype)


class CacheSync:
    """Brings a KV cache to the frequencies of each call of the model body (`parent`, e.g. LlamaModel).

    on_change "rebuild" recomputes the cache from its tokens under the new frequencies (decoding equals
    recomputation from scratch; costs a forward over the prefix at each change); "rerotate" only re-rotates the
    cached keys (queries and keys agree on the frequencies, but deeper layers keep states computed under the old
    ones). While rebuilding, `rebuilding` is true: the rebuild is itself a call of `parent`, which must not sync.
    """

    def __init__(self, plan: FrequencyPlan, method: str, on_change: str = "rebuild") -> None:
        self.plan, self.method, self.on_change = plan, method, on_change
        self.rebuilding = False

    def sync(self, parent, cache, kwargs: dict, input_ids: torch.Tensor | None, positions: torch.Tensor,
             seq_len: int) -> None:
        """Before a call of `parent` that adds `positions` (B, T) (tokens `input_ids`, None for embeddings) and runs
        under the frequencies of `seq_len`: update the cached entries if the regime changed, record the new ones."""
        cached = cache.get_seq_length()
        record = getattr(cache, RECORD_ATTRIBUTE, None) if cached else None
        if cached and (record is None or record.positions.shape[-1] != cached):
            raise UserError(
                f"this KV cache holds {cached} entries that were not computed under this patch (or not as a full "
                f"cache); with frequencies that change with the length, start from an empty cache after patching"
            )
        regime = self.plan.regime(seq_len)
        if record is not None and record.regime != regime:
            if self.on_change == "rerotate":
                rerotate_cache(cache, self.plan, record.positions, record.seq_len, seq_len)
            else:
                self._rebuild(parent, cache, record, kwargs)
        if record is None:
            ids = input_ids[:, :0] if input_ids is not None else None
            record = CacheRecord(None, seq_len, positions[:, :0], ids)
        ids = None if input_ids is None or record.input_ids is None else torch.cat([record.input_ids, input_ids], -1)
        held = torch.cat([record.positions, positions], dim=-1)
        setattr(cache, RECORD_ATTRIBUTE, CacheRecord(regime, seq_len, held, ids))

    def _rebuild(self, parent, cache, record: CacheRecord, kwargs: dict) -> None:
        """Recompute the cached prefix under this call's frequencies (the caller has already fixed them)."""
        if record.input_ids is None:
            raise UserError(f"{self.method!r} must rebuild the KV cache when its frequencies change, which needs "
                             f"input_ids (the cache was filled from inputs_embeds); use on_change='rerotate'")
        full_dynamic_layers(cache)
        cache.crop(-record.positions.shape[-1])  # empty every layer
        mask = kwargs.get("attention_mask")
        mask = mask[:, : record.positions.shape[-1]] if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.rebuilding = True
        try:
            parent(input_ids=record.input_ids, attention_mask=mask, position_ids=record.positions,
                   use_cache=True, **cache_kwargs(parent, cache))
        finally:
            self.rebuilding = False
