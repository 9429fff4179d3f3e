"""logn: queries scaled by max(1, log(p+1)/log(L)), checked against a reference that scales inside attention."""

import math

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lengthwise import api
from lengthwise.registry import get_method, method_names
from lengthwise.rope.scaling import logn_scale
from lengthwise.testing import random_ids, tiny_model
from lengthwise.models.compat import cache_kwargs

REFERENCE = "lengthwise-test-logn-reference"


def _reference_attention(module, query, key, value, attention_mask, **kwargs):
    """Eager reference: the already-rotated query (B, H, T, hd) times the log-n scale of its position 0..T-1."""
    length = module.config.max_position_embeddings
    scale = logn_scale(torch.arange(query.shape[-2]), length).to(query.dtype)  # (T,)
    return sdpa_attention_forward(module, query * scale[:, None], key, value, attention_mask, **kwargs)


AttentionInterface.register(REFERENCE, _reference_attention)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "phi3"])  # q_proj, per-head fused qkv, prefix fused qkv
def test_logn_equals_scaling_inside_attention(family):
    model = tiny_model(family, length=16)
    for module in model.modules():  # the reference needs L inside the attention function
        if hasattr(module, "config") and not hasattr(module.config, "max_position_embeddings"):
            module.config.max_position_embeddings = 16
    ids = random_ids(48)
    with api.patch(model, "logn"):
        ours = model(ids).logits
    vanilla = model(ids).logits
    model.set_attn_implementation(REFERENCE)
    reference = model(ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:, :16], vanilla[:, :16])  # inside the training length nothing changes
    assert not torch.allclose(ours[:, 16:], vanilla[:, 16:])


def test_logn_during_cached_decoding_uses_absolute_positions():
    model = tiny_model("llama", length=8)
    ids = random_ids(20)
    with api.patch(model, "logn"):
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids[:, :12], **cache_kwargs(model, cache), use_cache=True).logits
        steps = [model(input_ids=ids[:, i : i + 1], **cache_kwargs(model, cache), use_cache=True).logits for i in range(12, 20)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, rtol=1e-5, atol=1e-5)


def test_logn_options_and_scale():
    assert logn_scale(torch.tensor([0, 63, 127]), 64).tolist() == pytest.approx([1, 1, math.log(128) / math.log(64)])
    with pytest.raises(ValueError, match="original_max_position_embeddings must be an integer >= 2"):
        get_method("logn").make_config(original_max_position_embeddings=1)
    model = tiny_model("llama", length=64)
    ids = random_ids(40)
    vanilla = model(ids).logits
    with api.patch(model, "logn:original_max_position_embeddings=16"):  # L overridden: positions >= 16 scaled
        assert not torch.allclose(model(ids).logits[:, 16:], vanilla[:, 16:])


@pytest.mark.skipif("lm-infinite" not in method_names(), reason="lm-infinite is not registered in this checkout")
def test_rope_methods_compose_with_lm_infinite():
    model = tiny_model("llama", length=16)
    ids = random_ids(48)
    for spec in (["yarn", "lm-infinite"], ["logn", "lm-infinite"], ["yarn", "logn", "lm-infinite"]):
        with api.patch(model, spec):
            assert model(ids).logits.isfinite().all()
    with pytest.raises(ValueError, match="dynamic-ntk"):
        api.patch(model, ["dynamic-ntk", "lm-infinite"])
    # per-position frequencies (n_hat) cannot follow lm-infinite's re-rotation: refused in either order
    with pytest.raises(ValueError, match="cannot be combined with attention implementation"):
        api.patch(model, ["lm-infinite", "linear:n_hat=4"])
    with pytest.raises(ValueError, match="cannot follow 'linear' with per-position"):
        api.patch(model, ["linear:n_hat=4", "lm-infinite"])  # this order is refused at patch time too
