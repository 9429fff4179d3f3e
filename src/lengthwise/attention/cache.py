"""Bounded KV cache for Λ attention and attention sinks: keeps the global keys and the last `n_local` keys.

Each layer stores, next to keys and values (B, Hk, T, D), the position (B, T) each key was rotated at and whether it
is a real token (B, T) (left padding). They live in preallocated buffers with `slack` spare slots: new keys are
written in place, and only when the spare slots run out (or the buffer is far larger than a step needs, after a long
prompt) are the global keys and the last `n_local` keys compacted to its front. A decoding step thus copies nothing (a compaction moves n_local keys once every `slack` steps), and a chunk of
C new queries sees at least globals + the last n_local old keys + its own C keys; older keys that are still held are
hidden by their positions. Memory is O(n_global + n_local + slack + C), constant in the context length.

`get_seq_length()` counts every token seen (not the kept ones), so transformers keeps numbering positions on.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionLayer

from lengthwise.attention.blocked import global_candidates
from lengthwise.models.compat import PatchNotInForce


class LambdaCacheLayer(DynamicLayer):
    is_croppable = False  # generate() must not try assisted decoding on it (asked from transformers 5.24)

    def __init__(self, n_global: int, n_local: int, slack: int | None = None,
                 owner: tuple[str, str] = ("LambdaCache", "?"), keep_all: bool = False, sliding: bool = False) -> None:
        super().__init__()
        self.n_global, self.n_local = n_global, n_local
        self.is_sliding = sliding  # a layer with a sliding window of its own (masking_utils asks which layers are)
        self.keep_all = keep_all  # a layer whose queries attend to middle keys keeps every key (O(n) memory)
        self.middle_index = None  # `lengthwise.attention.middle.BlockIndex` of such a layer
        self.owner = owner  # (method, model type), for errors
        self.slack = max(1, n_local // 8) if slack is None else slack
        self.positions: torch.Tensor | None = None  # (B, T) long
        self.valid: torch.Tensor | None = None  # (B, T) bool
        self.seen = 0
        # keys, values (B, Hk, capacity, D), positions, valid (B, capacity); keys etc. above are views of their
        # first T slots. None until the first update, or after transformers replaced the views (beam reordering...).
        self._buffers: tuple[torch.Tensor, ...] | None = None

    def _views_are_ours(self) -> bool:
        return self._buffers is not None and self.keys._base is self._buffers[0] and \
            self.values._base is self._buffers[1]

    def _kept_ranges(self, held: int) -> tuple[int, int]:
        """(head, tail): keep key slots [0, head) and the last `tail` of the `held` ones."""
        if held == 0:
            return 0, 0
        if self.keep_all:
            return held, 0
        head = global_candidates(self.positions, self.valid, self.n_global)
        return head, min(self.n_local, held - head)

    def _make_room(self, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
        """Free C = key_states' length slots after the kept keys; returns the first of them. Keys no query needs any
        more stay in place (hidden by their positions) until there are more than `slack` of them or no room."""
        new = key_states.shape[-2]
        held = self.keys.shape[-2] if self.keys is not None and self.keys.dim() == 4 else 0
        capacity = self._buffers[0].shape[-2] if self._views_are_ours() else held
        if held and (self.positions is None or self.positions.shape[1] != held):
            raise PatchNotInForce(*self.owner, f"the bounded cache holds {held} keys whose positions were never "
                                  f"recorded (the Λ attention function did not see this cache), so it cannot drop any "
                                  f"and would grow without bound")
        head, tail = self._kept_ranges(held)
        kept = head + tail
        if held + new <= capacity and held - kept <= self.slack:
            return held
        sources = [self.keys, self.values] + ([self.positions, self.valid] if self.positions is not None else [])
        sources = sources if held else []  # the first update: keys are an empty placeholder
        # else too small or oversized (a layer that keeps every key is never compacted, only grown)
        in_place = kept + new <= capacity if self.keep_all else kept + new <= capacity <= kept + new + self.slack
        if not in_place:  # (re)allocate, to the size a decoding step or this chunk needs; a growing layer doubles
            capacity = kept + new + (max(self.slack, kept) if self.keep_all else self.slack)
            batch = key_states.shape[0]
            self._buffers = (
                key_states.new_empty(batch, key_states.shape[1], capacity, key_states.shape[-1]),
                value_states.new_empty(batch, value_states.shape[1], capacity, value_states.shape[-1]),
                torch.zeros(batch, capacity, dtype=torch.long, device=key_states.device),
                torch.zeros(batch, capacity, dtype=torch.bool, device=key_states.device))
        for buffer, source in zip(self._buffers, sources):
            time_dim = -1 if source.dim() == 2 else -2  # positions (B, T); keys, values (B, Hk, T, D)
            if not in_place:  # in place, the head is where it belongs already
                buffer.narrow(time_dim, 0, head).copy_(source.narrow(time_dim, 0, head))
            kept_tail = source.narrow(time_dim, held - tail, tail)
            buffer.narrow(time_dim, head, tail).copy_(kept_tail.clone() if in_place else kept_tail)  # may overlap
        return kept

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self._make_room(key_states, value_states)
        end = start + key_states.shape[-2]
        keys, values, positions, valid = self._buffers
        keys[..., start:end, :] = key_states
        values[..., start:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        if self.positions is not None:  # views of the kept positions, ready for `record()`
            self.positions, self.valid = positions[:, :start], valid[:, :start]
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def record(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Positions (B, C) and validity (B, C) of the C keys the last `update()` appended."""
        held = self.keys.shape[-2]
        start = 0 if self.positions is None else self.positions.shape[1]
        if start + positions.shape[1] != held:
            raise PatchNotInForce(*self.owner, f"{held - start} new keys in the bounded cache, {positions.shape[1]} "
                                  f"positions to record: an earlier call went unrecorded")
        buffer_positions, buffer_valid = self._buffers[2:]
        buffer_positions[:, start:held] = positions
        buffer_valid[:, start:held] = valid
        self.positions, self.valid = buffer_positions[:, :held], buffer_valid[:, :held]

    def stored(self) -> list[torch.Tensor]:
        """The tensors this layer holds (for memory accounting: the buffers, spare slots included)."""
        return list(self._buffers[:2]) if self._views_are_ours() else [self.keys, self.values]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = 0 if not self.is_initialized else self.keys.shape[-2]
        return kept + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.positions = self.valid = self._buffers = self.middle_index = None
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a bounded Λ cache cannot be cropped (assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.middle_index = None  # rebuilt from the reordered keys
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
            self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.middle_index = None  # rebuilt from the reordered keys
        if self.positions is not None:
            self.positions, self.valid = self.positions[indices], self.valid[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.middle_index = None  # rebuilt from the reordered keys
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))


class LambdaHybridLayer(LinearAttentionLayer, LambdaCacheLayer):
    """A layer that runs attention and a linear-attention / Mamba branch side by side (Falcon-H1, Zaya "hybrid"
    layers): the bounded Λ keys beside the branch's fixed-size conv and recurrent states, as transformers'
    `LinearAttentionAndFullAttentionLayer` pairs them with a full cache."""

    def __init__(self, n_global: int, n_local: int, number_of_states: int = 1, **kwargs) -> None:
        LambdaCacheLayer.__init__(self, n_global, n_local, **kwargs)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        if len(args) == 2 and not kwargs:  # keys and values, from `update`
            LambdaCacheLayer.lazy_initialization(self, *args)
        elif not args:  # conv / recurrent states, by keyword
            LinearAttentionLayer.lazy_initialization(self, **kwargs)

    def reset(self) -> None:
        LinearAttentionLayer.reset(self)
        LambdaCacheLayer.reset(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        LinearAttentionLayer.reorder_cache(self, beam_idx)
        LambdaCacheLayer.reorder_cache(self, beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        LambdaCacheLayer.crop(self, tokens_to_remove)

    def get_seq_length(self) -> int:
        return LambdaCacheLayer.get_seq_length(self)


class LambdaCache(Cache):
    """A transformers `Cache` whose layers keep only the global and the last `n_local` keys (see module doc).

    `LambdaCache(num_layers, n_global, n_local)` makes every layer such a layer; `LambdaCache.of_layers(layers)` takes
    one layer per model layer as given: bounded layers with their own bounds (a sliding layer keeps at most its
    window), and, on hybrid models, the layers transformers itself makes for the layers that are not attention
    (linear attention, Mamba: their own fixed-size state)."""

    def __init__(self, num_layers: int, n_global: int, n_local: int,
                 owner: tuple[str, str] = ("LambdaCache", "?"), keep_all_layers=()) -> None:
        super().__init__(layers=[LambdaCacheLayer(n_global, n_local, owner=owner, keep_all=i in keep_all_layers)
                                 for i in range(num_layers)])

    @classmethod
    def of_layers(cls, layers: list) -> LambdaCache:
        cache = cls.__new__(cls)
        Cache.__init__(cache, layers=layers)
        return cache

    def bounded_layers(self) -> list[LambdaCacheLayer]:
        return [layer for layer in self.layers if isinstance(layer, LambdaCacheLayer)]

    def kept_tokens(self, layer_idx: int = 0) -> int:
        layer = self.layers[layer_idx]
        return 0 if not layer.is_initialized else layer.keys.shape[-2]
