"""lm-infinite's attention to the middle: top-k tokens and top blocks at a fixed distance."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lengthwise import api
from lengthwise.attention import AlibiEncoding, LambdaPattern, RopeEncoding, lambda_attention_blocked, \
    lambda_attention_reference
from lengthwise.attention.cache import LambdaCache
from lengthwise.attention.middle import MiddleRetrieval
from lengthwise.models.compat import PatchNotInForce, cache_kwargs
from lengthwise.rope.rotation import rotate, rotation_angles
from lengthwise.rope.scaling import base_inv_freq
from lengthwise.testing import random_ids, random_qkv, tiny_model

torch.set_num_threads(1)
ENCODINGS = {
    "rope-half": RopeEncoding(base_inv_freq(16, 10000.0), "half"),
    "rope-interleaved": RopeEncoding(base_inv_freq(8, 10000.0), "interleaved"),  # partial rotary
    "alibi": AlibiEncoding(torch.tensor([0.5, 0.25, 0.125, 0.0625])),
}
MIDDLES = {
    "top-k": MiddleRetrieval(20, top_k=5),
    "top-k-last": MiddleRetrieval(20, top_k=5, queries="last"),
    "blocks": MiddleRetrieval(20, top_blocks=2, block_size=16, representatives=4, query_group=8),
    "blocks-one-box": MiddleRetrieval(30, top_blocks=3, block_size=8, representatives=1, query_group=1),
    "blocks-kept-order": MiddleRetrieval(20, top_blocks=2, block_size=16, representatives=4, query_group=8,
                                         order="kept"),
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("middle", list(MIDDLES))
def test_fast_path_matches_eager_reference(encoding, middle):
    q, k, v = random_qkv(T=300)
    pos = torch.arange(300)[None].repeat(2, 1)
    pattern = LambdaPattern(4, 40, 59, middle=MIDDLES[middle])
    plain = LambdaPattern(4, 40, 59)
    for tq in (300, 37, 1):  # one pass, a chunk through a cache, one decoding step
        args = (q[:, :, -tq:], k, v, pos[:, -tq:], pos, None)
        ref = lambda_attention_reference(*args, pattern, ENCODINGS[encoding], 0.3)
        torch.testing.assert_close(lambda_attention_blocked(*args, pattern, ENCODINGS[encoding], 0.3, block=16), ref,
                                   atol=2e-5, rtol=1e-4)
        assert not torch.allclose(ref, lambda_attention_reference(*args, plain, ENCODINGS[encoding], 0.3), atol=1e-3)


def _dense_with_middle_at(q_raw, k_raw, v, n_global, n_local, limit, middle_at, inv):
    """Attention built score by score from un-rotated vectors: global and local keys as in LM-Infinite, every other
    earlier key n of query m at distance `middle_at(m, n)`."""
    T = q_raw.shape[2]
    out = torch.zeros_like(q_raw)
    for m in range(T):
        scores = []
        for n in range(m + 1):
            d = m - n
            at = d if d < n_local else (min(d, limit) if n < n_global else middle_at(m, n))
            q_at = rotate(q_raw[:, :, m:m + 1], rotation_angles(torch.tensor([[at]]), inv)[:, None])
            scores.append((q_at * k_raw[:, :, n:n + 1]).sum())
        out[0, 0, m] = torch.softmax(torch.stack(scores), 0) @ v[0, 0, :m + 1]
    return out


@pytest.mark.parametrize("middle", [MiddleRetrieval(6, top_k=1000),
                                    MiddleRetrieval(6, top_blocks=100, block_size=4, representatives=2)],
                         ids=["every-token", "every-block"])
def test_selecting_the_whole_middle_equals_dense_attention_with_the_middle_at_the_distance(middle):
    g = torch.Generator().manual_seed(3)
    T, D = 40, 8
    q_raw, k_raw, v = (torch.randn(1, 1, T, D, generator=g) for _ in range(3))
    inv = base_inv_freq(D, 10000.0)
    pos = torch.arange(T)[None]
    q, k = (rotate(x, rotation_angles(pos, inv)[:, None]) for x in (q_raw, k_raw))
    pattern = LambdaPattern(2, 8, 12, middle=middle)
    expected = _dense_with_middle_at(q_raw, k_raw, v, 2, 8, 12, lambda m, n: 6, inv)
    for kernel in (lambda_attention_reference, lambda_attention_blocked):
        torch.testing.assert_close(kernel(q, k, v, pos, pos, None, pattern, RopeEncoding(inv, "half"), 1.0),
                                   expected, atol=1e-5, rtol=1e-5)


def test_every_block_in_kept_order_equals_dense_attention_with_the_middle_end_to_end():
    """order "kept": query m's blocks holding a middle key, end to end, the last key of the last one at the
    distance, each earlier key one further back: key n at 6 + (last - n), last = 2 + 4 * blocks - 1."""
    g = torch.Generator().manual_seed(4)
    T, D, G, S = 40, 8, 2, 4
    q_raw, k_raw, v = (torch.randn(1, 1, T, D, generator=g) for _ in range(3))
    inv = base_inv_freq(D, 10000.0)
    pos = torch.arange(T)[None]
    q, k = (rotate(x, rotation_angles(pos, inv)[:, None]) for x in (q_raw, k_raw))
    middle = MiddleRetrieval(6, top_blocks=100, block_size=S, representatives=2, query_group=1, order="kept")
    pattern = LambdaPattern(G, 8, 12, middle=middle)

    def middle_at(m, n):
        blocks = (m - 8 - G) // S + 1  # blocks starting at least n_local before m
        return 6 + (G + blocks * S - 1 - n)

    expected = _dense_with_middle_at(q_raw, k_raw, v, G, 8, 12, middle_at, inv)
    for kernel in (lambda_attention_reference, lambda_attention_blocked):
        torch.testing.assert_close(kernel(q, k, v, pos, pos, None, pattern, RopeEncoding(inv, "half"), 1.0),
                                   expected, atol=1e-5, rtol=1e-5)


LOCAL = "lm-infinite:n_global=2,n_local=16"
SPECS = [LOCAL + ",top_k=4", LOCAL + ",top_k=4,middle_queries=last,middle_from_layer=1",
         LOCAL + ",top_blocks=2,retrieval_block=8,query_group=8",
         LOCAL + ",top_blocks=2,retrieval_block=8,query_group=8,middle_order=kept"]


def _logits(model, spec, ids, chunk=None):
    handle = api.patch(model, spec)
    try:
        with torch.no_grad():
            if chunk is None:
                return model(input_ids=ids).logits, None
            cache = handle.new_cache()
            parts = [model(input_ids=ids[:, s:s + chunk], use_cache=True, **cache_kwargs(model, cache)).logits
                     for s in range(0, ids.shape[1], chunk)]
            return torch.cat(parts, 1), cache
    finally:
        handle.remove()


def test_top_k_zero_is_plain_lm_infinite():
    model, ids = tiny_model("llama", length=32), random_ids(120)
    torch.testing.assert_close(_logits(model, LOCAL + ",top_k=0", ids)[0], _logits(model, LOCAL, ids)[0],
                               atol=0, rtol=0)


@pytest.mark.parametrize("spec", SPECS)
def test_chunks_through_the_cache_equal_one_pass(spec):
    """The cache keeps every key of the middle layers (the others stay bounded); chunks aligned with the query
    groups see exactly what one pass sees. ("last": the last query of each call, so only one-token steps agree.)"""
    model, ids = tiny_model("llama", length=32), random_ids(120)
    one_pass, _ = _logits(model, spec, ids)
    assert not torch.allclose(one_pass, _logits(model, LOCAL, ids)[0], atol=1e-3)
    chunk = 1 if "last" in spec else 8
    chunked, cache = _logits(model, spec, ids, chunk)
    if "last" in spec:
        one_pass, _ = _logits(model, spec, ids, 1)
    torch.testing.assert_close(chunked, one_pass, atol=1e-4, rtol=1e-4)
    kept = [cache.kept_tokens(i) for i in range(len(cache.layers))]
    first = 1 if "middle_from_layer=1" in spec else 0
    assert kept[first:] == [120] * (len(kept) - first) and all(n < 120 for n in kept[:first])


@pytest.mark.parametrize("spec", [SPECS[0], LOCAL + ",top_blocks=2,retrieval_block=8,query_group=1",
                                  LOCAL + ",top_blocks=2,retrieval_block=8,query_group=1,middle_order=kept"])
def test_generate_keeps_the_middle_and_matches_greedy_one_pass(spec):
    """Decoding through the cache (block boxes kept in it and extended as blocks fill) == recomputing from scratch."""
    model, ids = tiny_model("llama", length=32), random_ids(60)
    handle = api.patch(model, spec)
    try:
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        with torch.no_grad():
            again = model(input_ids=out[:, :-1]).logits[0, ids.shape[1] - 1:].argmax(-1)
    finally:
        handle.remove()
    assert out[0, ids.shape[1]:].tolist() == again.tolist()


def test_left_padding_is_refused_with_a_clear_error():
    q, k, v = random_qkv(T=80)
    pos = torch.arange(80)[None].repeat(2, 1)
    valid = torch.ones(2, 80, dtype=torch.bool)
    valid[1, :5] = False
    pattern = LambdaPattern(4, 40, 59, middle=MIDDLES["top-k"])
    with pytest.raises(ValueError, match="unpadded"):
        lambda_attention_blocked(q, k, v, pos, pos, valid, pattern, ENCODINGS["rope-half"], 0.3)


def test_a_bounded_cache_on_a_middle_layer_raises():
    model, ids = tiny_model("llama", length=32), random_ids(40)
    handle = api.patch(model, SPECS[0])
    try:
        cache = LambdaCache(len(model.model.layers), 2, 16)  # no keep_all_layers: would drop the middle
        with pytest.raises(PatchNotInForce, match="drops them"), torch.no_grad():
            model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
    finally:
        handle.remove()


@pytest.mark.parametrize("options,message", [
    ("top_k=2,top_blocks=2", "exactly one of them"),
    ("top_blocks=2,retrieval_block=32", "must not exceed n_local"),
    ("top_k=2,middle_distance=64", "must not exceed distance_limit"),
    ("top_k=2,middle_from_layer=5", "below the model's"),
    ("top_k=2,middle_queries=first", "middle_queries must be one of"),
    ("top_blocks=2,retrieval_block=10,representatives=4", "multiple of"),
    ("top_k=-1", "non-negative"),
    ("top_k=2,middle_order=kept", "needs top_blocks"),
    ("top_blocks=2,middle_order=sideways", "middle_order must be one of"),
    ("top_blocks=2,retrieval_block=16,middle_order=kept", r"middle_order 'kept'\) = 47 must not exceed"),
])
def test_bad_options_say_what_is_accepted(options, message):
    model = tiny_model("llama", length=32)
    with pytest.raises(ValueError, match=message):
        api.patch(model, f"{LOCAL},{options}")


@pytest.mark.slow  # a subprocess that imports torch and transformers: ~15 s on the 2-core machine
def test_middle_recall_benchmark_reports_the_needle_read_at_every_answer_step(tmp_path):
    """benchmarks/middle_recall.py on the tiny reference model: one record per answer token, per layer the share of
    query heads whose middle keys include the needle (measured: 0.69-0.88 on average over the layers)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "middle_recall.py"
    out = tmp_path / "recall.json"
    spec = "lm-infinite:n_local=128,top_blocks=2,retrieval_block=32,middle_queries=last,middle_distance=64"
    subprocess.run([sys.executable, str(script), "--model", "llama-rope-256", "--length", "1024", "--method", spec,
                    "--out", str(out)], check=True, capture_output=True)
    record = json.loads(out.read_text())
    assert [step["expected"] for step in record["steps"]] == [" "] + list(record["key"])
    shares = [share for step in record["steps"] for share in step["heads_reading_needle"]]
    assert len(shares) == 6 * 4 and all(0 <= s <= 1 for s in shares) and sum(shares) / len(shares) > 0.5
