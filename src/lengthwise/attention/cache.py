"""Bounded KV cache for Λ attention and attention sinks: keeps the global keys and the last `n_local` keys.

Each layer stores, next to keys and values (B, Hk, T, D), the position (B, T) each key was rotated at and whether it
is a real token (B, T) (left padding). Trimming is lazy: `update()` first drops what the previous step no longer
needs, then appends the new keys, so a chunk of C new queries sees globals + the last n_local old keys + its own C
keys. Memory is O(n_global + n_local + C), constant in the context length.

`get_seq_length()` counts every token seen (not the kept ones), so transformers keeps numbering positions on.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lengthwise.attention.blocked import global_candidates


class LambdaCacheLayer(DynamicLayer):
    def __init__(self, n_global: int, n_local: int) -> None:
        super().__init__()
        self.n_global, self.n_local = n_global, n_local
        self.positions: torch.Tensor | None = None  # (B, T) long
        self.valid: torch.Tensor | None = None  # (B, T) bool
        self.seen = 0

    def _trim(self) -> None:
        if self.positions is None or self.positions.shape[1] != self.keys.shape[-2]:
            return  # positions not recorded yet (nothing to trim safely)
        total = self.keys.shape[-2]
        head = global_candidates(self.positions, self.valid, self.n_global)
        if total <= head + self.n_local:
            return
        keep = torch.cat([torch.arange(head), torch.arange(total - self.n_local, total)]).to(self.keys.device)
        self.keys = self.keys.index_select(-2, keep)
        self.values = self.values.index_select(-2, keep)
        self.positions = self.positions.index_select(1, keep)
        self.valid = self.valid.index_select(1, keep)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            self._trim()
        self.seen += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def record(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Positions (B, C) and validity (B, C) of the C keys the last `update()` appended."""
        if self.positions is None:
            self.positions, self.valid = positions, valid
        else:
            self.positions = torch.cat([self.positions, positions], dim=1)
            self.valid = torch.cat([self.valid, valid], dim=1)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = 0 if not self.is_initialized else self.keys.shape[-2]
        return kept + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.positions = self.valid = None
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a bounded Λ cache cannot be cropped (assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
            self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions, self.valid = self.positions[indices], self.valid[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))


class LambdaCache(Cache):
    """A transformers `Cache` whose layers keep only the global and the last `n_local` keys (see module doc)."""

    def __init__(self, num_layers: int, n_global: int, n_local: int) -> None:
        super().__init__(layers=[LambdaCacheLayer(n_global, n_local) for _ in range(num_layers)])

    def kept_tokens(self, layer_idx: int = 0) -> int:
        layer = self.layers[layer_idx]
        return 0 if not layer.is_initialized else layer.keys.shape[-2]
