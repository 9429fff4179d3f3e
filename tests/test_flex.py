"""FlexAttention path of Λ attention: equal to the dense eager reference for every encoding, distance limit, key
anchor, grouped-query heads, left padding and queries fewer than keys. The default tier runs eager flex (the
compiled CPU kernel takes 5-20 s to build per shape); the compiled kernel is checked in the slow tier."""

import shutil

import pytest
import torch

pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no FlexAttention (needs >= 2.5)")
if not torch._dynamo.is_dynamo_supported():  # flex_attention runs through dynamo even uncompiled
    pytest.skip("flex_attention needs dynamo, which this Python/torch does not support", allow_module_level=True)

from lengthwise.attention import flex  # noqa: E402
from lengthwise.testing import left_padded_positions, random_qkv  # noqa: E402
from lengthwise.attention.flex import lambda_attention_flex  # noqa: E402
from lengthwise.attention.pattern import AlibiEncoding, LambdaPattern, RopeEncoding  # noqa: E402
from lengthwise.attention.reference import lambda_attention_reference  # noqa: E402

D = 16
ENCODINGS = {
    "rope": RopeEncoding(1.0 / 10000 ** (torch.arange(0, D, 2).float() / D), "half"),
    "alibi": AlibiEncoding(torch.tensor([0.5, 0.25, 0.125, 0.0625])),
}
PATTERNS = [LambdaPattern(3, 20, 32), LambdaPattern(4, 12, 15, "self"), LambdaPattern(3, 20, None),
            LambdaPattern(0, 20, 20)]


def _name(pattern):
    return f"g{pattern.n_global}-l{pattern.n_local}-limit{pattern.limit}-{pattern.key_anchor}"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setattr(flex, "COMPILE", False)
    flex._mask_cache.clear()
    yield
    flex._mask_cache.clear()


def _check(q, k, v, q_pos, k_pos, k_valid, pattern, encoding, block=16):
    args = (q, k, v, q_pos, k_pos, k_valid, pattern, encoding, 0.3)
    torch.testing.assert_close(lambda_attention_flex(*args, block=block), lambda_attention_reference(*args),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("pattern", PATTERNS, ids=_name)
def test_flex_matches_eager_reference(encoding, pattern):
    """Grouped-query heads (4 over 2), one unpadded and one left-padded row: one pass, and one decoding step."""
    q, k, v = random_qkv()
    pos, valid = left_padded_positions(2, 70, pad=7)
    for tq in (70, 1):
        _check(q[:, :, -tq:], k, v, pos[:, -tq:], pos, valid, pattern, ENCODINGS[encoding])


@pytest.mark.parametrize("encoding,pattern", [("rope", PATTERNS[0]), ("alibi", PATTERNS[1])], ids=["rope", "alibi"])
def test_chunk_through_a_cache_without_padding(encoding, pattern):
    """A chunk of 9 queries against all 70 keys, k_valid None."""
    q, k, v = random_qkv()
    pos, _ = left_padded_positions(2, 70, pad=0)
    _check(q[:, :, -9:], k, v, pos[:, -9:], pos, None, pattern, ENCODINGS[encoding])


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_padded_shapes_match_eager_reference(encoding, monkeypatch):
    """Lengths padded to powers of two (as the compiled path does): padded keys and queries change nothing."""
    monkeypatch.setattr(flex, "BUCKET_SHAPES", True)
    q, k, v = random_qkv(T=45)
    pos, valid = left_padded_positions(2, 45, pad=5)
    for tq in (45, 3):
        _check(q[:, :, -tq:], k, v, pos[:, -tq:], pos, valid, LambdaPattern(3, 10, 16), ENCODINGS[encoding])


def test_query_that_sees_nothing_gets_zero():
    q, k, v = random_qkv(T=40)
    pos, valid = left_padded_positions(2, 40, pad=0)
    valid[1] = False  # row 1 has no key at all
    args = (q, k, v, pos, pos, valid, LambdaPattern(3, 8, 12), ENCODINGS["rope"], 0.3)
    out = lambda_attention_flex(*args, block=16)
    assert torch.count_nonzero(out[1]) == 0
    torch.testing.assert_close(out, lambda_attention_reference(*args), atol=1e-5, rtol=1e-4)


def test_block_mask_cache_follows_the_positions():
    """Same shapes, other padding: a cached BlockMask must not be reused."""
    q, k, v = random_qkv(T=40)
    for pad in (0, 6, 0):
        pos, valid = left_padded_positions(2, 40, pad)
        _check(q, k, v, pos, pos, valid, LambdaPattern(2, 8, 12), ENCODINGS["alibi"])
    assert len(flex._mask_cache) == 1  # one key (pattern, shapes); its entry replaced as the positions changed


def test_block_mask_skips_keys_no_query_sees():
    """Λ sparsity at block level: a query block sees the global block, its own block and the one before."""
    T, block = 512, 64
    pos = torch.arange(T)[None]
    _, mask = flex._positions_and_mask(pos, pos, None, LambdaPattern(4, 64, None), T, T, block)
    seen = mask.kv_num_blocks + mask.full_kv_num_blocks  # (1, 1, T / block) key blocks per query block
    assert seen.tolist() == [[[1, 2] + [3] * (T // block - 2)]]


def test_gradients_fall_back_to_the_reference_on_cpu():
    """FlexAttention has no backward on CPU: a call that needs gradients runs the reference."""
    q, k, v = random_qkv(T=30)
    q.requires_grad_(True)
    pos, _ = left_padded_positions(2, 30, pad=0)
    args = (q, k, v, pos, pos, None, LambdaPattern(2, 8, 12), ENCODINGS["rope"], 0.3)
    out = lambda_attention_flex(*args)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    torch.testing.assert_close(out, lambda_attention_reference(*args), atol=1e-5, rtol=1e-4)


def test_a_failing_compile_falls_back_to_eager_flex(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("C++ compile error")

    monkeypatch.setattr(flex, "COMPILE", None)
    monkeypatch.setattr(flex, "_compile_failed", False)
    monkeypatch.setattr(flex, "_compiled_flex", lambda: broken)
    monkeypatch.setattr(flex.shutil, "which", lambda name: "/usr/bin/" + name)
    q, k, v = random_qkv(T=30)
    pos, _ = left_padded_positions(2, 30, pad=0)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ compile error"):
        _check(q, k, v, pos, pos, None, LambdaPattern(2, 8, 12), ENCODINGS["rope"])
    assert flex._compile_failed  # eager flex from then on, without trying again
    _check(q, k, v, pos, pos, None, LambdaPattern(2, 8, 12), ENCODINGS["alibi"])


def test_middle_retrieval_is_refused():
    from lengthwise.attention.middle import MiddleRetrieval
    q, k, v = random_qkv(T=20)
    pos, _ = left_padded_positions(2, 20, pad=0)
    pattern = LambdaPattern(2, 8, 12, middle=MiddleRetrieval(distance=8, top_k=2))
    with pytest.raises(NotImplementedError, match="middle"):
        lambda_attention_flex(q, k, v, pos, pos, None, pattern, ENCODINGS["rope"], 0.3)


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")),
                    reason="compiled flex_attention on CPU needs a C++ compiler")
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_compiled_flex_matches_eager_reference(encoding, monkeypatch):
    monkeypatch.setattr(flex, "COMPILE", True)  # errors surface instead of falling back to eager flex
    q, k, v = random_qkv()
    pos, valid = left_padded_positions(2, 70, pad=7)
    with torch.no_grad():
        for tq in (70, 1):
            _check(q[:, :, -tq:], k, v, pos[:, -tq:], pos, valid, LambdaPattern(3, 20, 32), ENCODINGS[encoding])
        valid[1] = False  # a row that sees nothing
        _check(q, k, v, pos, pos, valid, LambdaPattern(4, 12, 15, "self"), ENCODINGS[encoding])


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_impl_flex_in_a_model_equals_eager(family, monkeypatch):
    """`lm-infinite:impl=flex` through the transformers hooks: one pass and cached decoding equal impl=eager."""
    from lengthwise import api
    from lengthwise.testing import random_ids, tiny_model

    monkeypatch.setattr(flex, "COMPILE", False)  # eager flex: the default tier must not wait for a compile
    model, ids = tiny_model(family, length=32), random_ids(80)
    outputs = {}
    for impl in ("eager", "flex"):
        with api.patch(model, f"lm-infinite:n_global=2,n_local=16,impl={impl}"), torch.no_grad():
            outputs[impl] = (model(input_ids=ids).logits,
                             model.generate(ids[:, :40], max_new_tokens=5, do_sample=False))
    torch.testing.assert_close(outputs["flex"][0], outputs["eager"][0], atol=1e-4, rtol=1e-4)
    assert outputs["flex"][1].tolist() == outputs["eager"][1].tolist()


def test_flex_with_middle_retrieval_is_refused_at_patch_time():
    from lengthwise import api
    from lengthwise.testing import tiny_model

    with pytest.raises(ValueError, match="not 'flex'"):
        api.patch(tiny_model("llama", length=32), "lm-infinite:n_local=16,impl=flex,top_k=2")
