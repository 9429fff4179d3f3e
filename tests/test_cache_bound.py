"""The true bound of the streaming method's cache (and lm-infinite's: the same `LambdaCacheLayer`).

A layer keeps the global keys (at most n_global: `n_sink` for streaming) and the last `n_local` (`window`); it
writes new keys into a buffer with `slack` spare slots and compacts only when the stale keys exceed `slack` or the
buffer is full (lengthwise/attention/cache.py). So while a chunk of C tokens is fed:

- keys held (what attention reads, `layer.keys.shape[-2]`) <= n_global + n_local + slack + C;
- buffer slots (allocated) <= n_global + n_local + slack + the largest C fed so far
  (a buffer sized for a large chunk is kept while later, smaller chunks fit in it).

Not "n_sink + window": that is what the cache keeps *between* steps once compacted, and the keys held do reach it
(plus the C new keys) after every compaction.
"""

import torch

import lengthwise
from lengthwise.models.compat import cache_kwargs
from lengthwise.testing import tiny_model

N_SINK, WINDOW = 2, 8
# prefill chunks of several sizes (below, at and above the window), then one-token decoding steps, then a chunk again
CHUNKS = [1, 3, 8, 17, 5, 32, 2, 11] + [1] * 40 + [6, 1, 1, 24, 1, 1, 1]


def _buffer_slots(layer) -> int:
    return layer.stored()[0].shape[-2]  # the key buffer, spare slots included


@torch.no_grad()
def test_streaming_cache_never_exceeds_kept_plus_slack_plus_chunk():
    torch.manual_seed(0)
    model = tiny_model("llama", length=32)
    handle = lengthwise.patch(model, "streaming", n_sink=N_SINK, window=WINDOW)
    try:
        cache = handle.new_cache()
        vocab = model.config.vocab_size
        largest, held_minus_chunk, seen = 0, set(), 0
        for chunk in CHUNKS:
            ids = torch.randint(0, vocab, (1, chunk))
            model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
            seen += chunk
            largest = max(largest, chunk)
            for layer in cache.layers:
                assert (layer.n_global, layer.n_local) == (N_SINK, WINDOW)
                kept = N_SINK + WINDOW
                held = layer.keys.shape[-2]
                assert held <= min(seen, kept + layer.slack + chunk), (chunk, held, layer.slack)
                assert _buffer_slots(layer) <= kept + layer.slack + largest, (chunk, _buffer_slots(layer))
                assert layer.keys.shape == layer.values.shape
                held_minus_chunk.add(held - chunk)
            assert cache.get_seq_length() == seen
        slack = cache.layers[0].slack
        assert slack == max(1, WINDOW // 8)
        # the kept part reaches n_sink + window (after a compaction) and never goes past it by more than the slack
        assert N_SINK + WINDOW in held_minus_chunk
        assert max(held_minus_chunk) <= N_SINK + WINDOW + slack
        # "never exceeds n_sink + window tokens" is not the bound: with the chunk being fed it does
        assert max(layer.keys.shape[-2] for layer in cache.layers) > N_SINK + WINDOW or largest == 1
    finally:
        handle.remove()


@torch.no_grad()
def test_the_bound_holds_step_by_step_for_one_token_decoding():
    """Decoding one token at a time: at most n_sink + window + slack + 1 keys held, and a buffer of at most
    n_sink + window + slack + 4 slots (4: the prompt, the largest chunk fed)."""
    torch.manual_seed(1)
    model = tiny_model("llama", length=32)
    handle = lengthwise.patch(model, "streaming", n_sink=N_SINK, window=WINDOW)
    try:
        cache = handle.new_cache()
        model(input_ids=torch.randint(0, model.config.vocab_size, (1, 4)), **cache_kwargs(model, cache),
              use_cache=True)
        held = []
        for _ in range(60):
            model(input_ids=torch.randint(0, model.config.vocab_size, (1, 1)), **cache_kwargs(model, cache),
                  use_cache=True)
            layer = cache.layers[0]
            held.append(layer.keys.shape[-2])
            assert layer.keys.shape[-2] <= N_SINK + WINDOW + layer.slack + 1
            assert _buffer_slots(layer) <= N_SINK + WINDOW + layer.slack + 4  # the first chunk (4) sized it
        assert N_SINK + WINDOW + 1 in held  # the kept keys and the one being fed, right after a compaction
    finally:
        handle.remove()
