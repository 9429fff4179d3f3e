"""lm-infinite: Λ attention with distance limit, fast kernel vs eager reference, bounded-cache generation."""

import pytest
import torch

from lengthwise import api
from lengthwise.attention import AlibiEncoding, LambdaPattern, RopeEncoding, lambda_attention_blocked, \
    lambda_attention_reference
from lengthwise.attention.cache import LambdaCache
from lengthwise.rope.rotation import rotate, rotation_angles
from lengthwise.rope.scaling import base_inv_freq as default_inv_freq
from lengthwise.testing import TINY_FAMILIES, left_padded_positions, random_ids, random_qkv, tiny_model
from lengthwise.models.compat import cache_kwargs

torch.set_num_threads(1)
SMALL = dict(n_global=2, n_local=8, distance_limit=16)  # training length 32 below


ENCODINGS = {
    "rope-half": RopeEncoding(default_inv_freq(8, 10000.0), "half"),
    "rope-interleaved": RopeEncoding(default_inv_freq(16, 10000.0), "interleaved"),
    "alibi": AlibiEncoding(torch.tensor([0.5, 0.25, 0.125, 0.0625])),
}
PATTERNS = [LambdaPattern(3, 20, 32), LambdaPattern(0, 20, 20), LambdaPattern(3, 20, None),
            LambdaPattern(4, 12, 15, "self"), LambdaPattern(3, 200, 300)]


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("pad", [0, 7])
def test_blocked_kernel_matches_eager_reference(encoding, pattern, pad):
    q, k, v = random_qkv()
    pos, valid = left_padded_positions(2, 70, pad)
    for tq in (70, 9, 1):  # one pass, a chunk through a cache, one decoding step
        args = (q[:, :, -tq:], k, v, pos[:, -tq:], pos, valid if pad else None, pattern, ENCODINGS[encoding], 0.3)
        ref = lambda_attention_reference(*args)
        fast = lambda_attention_blocked(*args, block=16)
        real = valid[:, -tq:]  # outputs at pad queries are unused
        torch.testing.assert_close(fast.transpose(1, 2)[real], ref.transpose(1, 2)[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("block,run", [(16, 1), (16, 3), (8, 4)])
def test_batched_interior_blocks_match_eager_reference(block, run):
    """Long unpadded input: many interior blocks, batched `run` at a time (GQA, and a chunk through a cache)."""
    q, k, v = random_qkv(T=300)
    pos = torch.arange(300)[None].repeat(2, 1)
    for pattern in (LambdaPattern(4, 64, 96), LambdaPattern(4, 40, 59, "self")):
        for tq in (300, 100):
            args = (q[:, :, -tq:], k, v, pos[:, -tq:], pos, None, pattern, ENCODINGS["rope-half"], 0.3)
            fast = lambda_attention_blocked(*args, block=block, run=run)
            torch.testing.assert_close(fast, lambda_attention_reference(*args), atol=2e-5, rtol=1e-4)


def test_queries_that_are_all_global_keys():
    """No band at all (every key is a global key): the kernel must not call the fused kernel on empty ranges."""
    q, k, v = random_qkv(T=5)
    pos = torch.arange(5)[None].repeat(2, 1)
    args = (q, k, v, pos, pos, None, LambdaPattern(8, 20, 32), ENCODINGS["rope-half"], 0.3)
    torch.testing.assert_close(lambda_attention_blocked(*args), lambda_attention_reference(*args), atol=2e-5,
                               rtol=1e-4)


def test_distance_limit_scores_equal_capped_positions():
    """A global key beyond the limit scores exactly as if it sat at distance `limit` (built from raw vectors)."""
    g = torch.Generator().manual_seed(1)
    T, D, limit = 40, 8, 10
    q_raw, k_raw, v = (torch.randn(1, 1, T, D, generator=g) for _ in range(3))
    inv = default_inv_freq(D, 10000.0)
    pos = torch.arange(T)[None]
    rot = lambda x, p: rotate(x, rotation_angles(p, inv)[:, None])  # noqa: E731
    q, k = rot(q_raw, pos), rot(k_raw, pos)
    pattern = LambdaPattern(2, 5, limit)
    out = lambda_attention_reference(q, k, v, pos, pos, None, pattern, RopeEncoding(inv, "half"), 1.0)
    m = T - 1
    keys = [n for n in range(T) if n < 2 or m - n < 5]
    scores = torch.stack([
        (rot(q_raw[:, :, m:m + 1], torch.tensor([[min(m - n, limit)]])) * k_raw[:, :, n:n + 1]).sum()
        if n < 2 else (q[:, :, m] * k[:, :, n]).sum() for n in keys])
    expected = torch.softmax(scores, 0) @ v[0, 0, keys]
    torch.testing.assert_close(out[0, 0, m], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_window_covering_the_sequence_equals_unpatched_model(family):
    model = tiny_model(family, length=32)
    ids = random_ids(30, batch=2)
    before = model(ids).logits
    with api.patch(model, "lm-infinite", n_local=64, distance_limit=64):
        torch.testing.assert_close(model(ids).logits, before, atol=2e-5, rtol=1e-4)
    assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_model_fast_path_matches_eager_past_training_length(family):
    model = tiny_model(family, length=32)
    ids = random_ids(80)
    with api.patch(model, "lm-infinite", impl="eager", **SMALL):
        eager = model(ids).logits
    with api.patch(model, "lm-infinite", block=16, **SMALL):
        fast = model(ids).logits
    torch.testing.assert_close(fast, eager, atol=2e-5, rtol=1e-4)


def _recompute_greedy(model, ids, steps):
    """Greedy decoding by recomputing the (patched) model over the whole sequence at every step, no cache."""
    for _ in range(steps):
        nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gptj", "bloom", "mpt"])
@pytest.mark.parametrize("method", ["lm-infinite", "streaming"])
def test_generate_with_bounded_cache_equals_recomputation(family, method):
    model = tiny_model(family, length=32)
    ids = random_ids(40)
    options = SMALL if method == "lm-infinite" else dict(n_sink=2, window=8)
    with api.patch(model, method, **options) as handle:
        expected = _recompute_greedy(model, ids, 12)
        cache = handle.new_cache()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, **cache_kwargs(model, cache), pad_token_id=0)
        assert torch.equal(out, expected)
        assert cache.get_seq_length() == 40 + 11  # every token seen (the last one is never fed back)
        # globals + window + the token being decoded + spare slots
        assert cache.kept_tokens() <= 2 + 8 + 1 + cache.layers[0].slack
        # a plain model.generate() on the patched model picks the bounded cache up by itself
        plain = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(plain, expected)


def test_decode_memory_is_constant_in_context_length():
    model = tiny_model("llama", length=32)
    with api.patch(model, "lm-infinite", **SMALL) as handle:
        sizes = []
        for n in (50, 200):
            cache = handle.new_cache()
            model(random_ids(n), **cache_kwargs(model, cache), use_cache=True)
            model(random_ids(1), **cache_kwargs(model, cache), use_cache=True)
            sizes.append(cache.layers[0].keys.shape)
    assert sizes[0] == sizes[1]


def test_decoding_writes_the_cache_in_place():
    """Steady decoding reuses one buffer (a compaction once every `slack` steps, no copy per step); the buffer stays
    at globals + window + step + slack, and the keys any query needs are always held."""
    model = tiny_model("llama", length=32)
    with api.patch(model, "lm-infinite", n_global=2, n_local=16, distance_limit=16) as handle:
        cache = handle.new_cache()
        model(random_ids(40), **cache_kwargs(model, cache), use_cache=True)
        layer = cache.layers[0]
        buffers = set()
        for step in range(40):
            model(random_ids(1), **cache_kwargs(model, cache), use_cache=True)
            buffers.add(layer.stored()[0].data_ptr())
            seen = 40 + step + 1
            held = set(layer.positions[0].tolist())
            assert held >= {0, 1} | set(range(seen - 16, seen))
            assert layer.stored()[0].shape[-2] == 2 + 16 + 1 + layer.slack
    assert layer.slack == 2 and len(buffers) == 1


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_chunked_prefill_equals_one_pass(family):
    from lengthwise.scoring import nll_one_pass

    model = tiny_model(family, length=32)
    ids = random_ids(90)[0]
    with api.patch(model, "lm-infinite", **SMALL) as handle:
        whole = nll_one_pass(model, ids)
        chunked = nll_one_pass(model, ids, chunk_size=13, cache=handle.new_cache())
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "bloom"])
def test_left_padded_batch_matches_each_row_alone(family):
    model = tiny_model(family, length=32)
    long, short = random_ids(60, seed=1), random_ids(45, seed=2)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 15, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :15] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with api.patch(model, "lm-infinite", **SMALL):
        batch = model(ids, attention_mask=mask, position_ids=position_ids).logits
        alone = model(short).logits
        first = model(long).logits
    torch.testing.assert_close(batch[1, 15:], alone[0], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(batch[0], first[0], atol=5e-5, rtol=1e-4)


def test_patch_remove_restores_attention_implementation_and_generate():
    model = tiny_model("llama", length=32)
    before = (model.config._attn_implementation, "generate" in model.__dict__)
    handle = api.patch(model, "lm-infinite")
    assert model.config._attn_implementation == "lengthwise_lambda"
    assert isinstance(handle.new_cache(), LambdaCache)
    handle.remove()
    assert (model.config._attn_implementation, "generate" in model.__dict__) == before


def test_bad_options_and_models_are_refused_clearly():
    with pytest.raises(ValueError, match="n_local .* must not exceed distance_limit"):
        api.patch(tiny_model("llama", length=32), "lm-infinite", n_local=64)
    with pytest.raises(ValueError, match="impl must be one of blocked, eager"):
        api.patch(tiny_model("llama"), "lm-infinite", impl="flash")
    with pytest.raises(ValueError, match="n_global must be a non-negative integer"):
        api.patch(tiny_model("llama"), "lm-infinite", n_global=-1)
    with pytest.raises(ValueError, match="both replace the attention pattern"):
        api.patch(tiny_model("llama"), "lm-infinite+streaming")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="uses .other. position encoding. Served: every RoPE causal LM"):
        api.patch(gpt2, "lm-infinite")


def test_composes_with_rope_scaling():
    model = tiny_model("llama", length=32)
    ids = random_ids(70)
    with api.patch(model, "linear:factor=2"):
        rescaled_inv_freq = model.model.rotary_emb.inv_freq.clone()
    with api.patch(model, ["linear:factor=2", "lm-infinite:impl=eager"]):
        eager = model(ids).logits
    with api.patch(model, ["linear:factor=2", "lm-infinite"]):
        fast = model(ids).logits
        assert torch.equal(model.model.rotary_emb.inv_freq, rescaled_inv_freq)
    torch.testing.assert_close(fast, eager, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_mask_mod_is_the_rule_the_reference_uses(pattern):
    """The one Λ rule as a FlexAttention-style mask function equals the eager reference's visibility."""
    from lengthwise.attention.pattern import mask_mod, visibility  # noqa: PLC0415

    pos = torch.arange(70)[None]
    visible, _, _ = visibility(pos, pos, None, pattern)  # (1, 1, 70, 70)
    rule = mask_mod(pattern)
    by_index = rule(0, 0, torch.arange(70)[:, None], torch.arange(70)[None, :])
    assert torch.equal(by_index, visible[0, 0])
    assert bool(by_index[69, 0]) == (pattern.n_global > 0 or pattern.n_local >= 70)
    if pattern.n_local < 70:
        assert bool(by_index[69, 70 - pattern.n_local]) and not bool(by_index[69, 69 - pattern.n_local])


@pytest.mark.parametrize("spec", ["lm-infinite:n_global=2,n_local=8", "streaming:n_sink=2,window=8"])
def test_a_caller_supplied_unbounded_cache_is_refused_even_empty(spec):
    """An empty DynamicCache passed to forward() would keep every key of every call: refused in one line; the
    method's own cache and no cache run."""
    from transformers import DynamicCache

    from lengthwise.models.compat import PatchNotInForce

    model = tiny_model("llama")
    handle = api.patch(model, spec)
    ids = random_ids(24)
    with pytest.raises(PatchNotInForce, match="forward\\(\\) got a DynamicCache.*handle.new_cache") as refused:
        model(ids, **cache_kwargs(model, DynamicCache()), use_cache=True)
    assert "\n" not in str(refused.value)
    with pytest.raises(PatchNotInForce, match="generate\\(\\) got a DynamicCache.*handle.new_cache"):
        model.generate(ids, **cache_kwargs(model, DynamicCache()), max_new_tokens=2, do_sample=False)
    model(ids, **cache_kwargs(model, handle.new_cache()), use_cache=True)
    handle.remove()
    model(ids, **cache_kwargs(model, DynamicCache()), use_cache=True)  # unpatched: transformers' own behaviour
