"""The transformers boundary: the declared range, the adapter table, and every fail-loud check provoked."""

import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache

from lengthwise import api
from lengthwise.attention import hf
from lengthwise.attention.cache import LambdaCache, LambdaCacheLayer
from lengthwise.models import compat
from lengthwise.models.families import ADAPTER_FAMILIES
from lengthwise.testing import TINY_FAMILIES, random_ids, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_declared_range_is_the_tested_one_and_installed_release_is_inside():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = next(d for d in dependencies if d.startswith("transformers"))
    assert declared == "transformers" + compat.SUPPORTED_TRANSFORMERS
    assert compat.version_supported(transformers.__version__), transformers.__version__
    pinned = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("transformers==")]
    assert len(pinned) == 1 and compat.version_supported(pinned[0].split("==")[1])
    for page in ("README.md", "docs/compatibility.md"):  # the range the user reads first is the declared one
        assert f"transformers `{compat.SUPPORTED_TRANSFORMERS}`" in (ROOT / page).read_text(), page


def test_every_family_of_the_matrix_has_a_tiny_model_and_the_adapters_are_among_them():
    assert set(ADAPTER_FAMILIES) <= set(TINY_FAMILIES)
    for family in TINY_FAMILIES:
        assert tiny_model(family).config.model_type == family


def test_a_cache_under_an_unknown_keyword_raises_naming_method_model_and_version():
    with pytest.raises(compat.PatchNotInForce, match=rf"lm-infinite on model type 'llama' with transformers "
                                                     rf"{transformers.__version__}.*'kv_store'"):
        compat.cache_from_kwargs({"kv_store": DynamicCache()}, "lm-infinite", "llama")
    for name in compat.CACHE_NAMES:  # every known keyword is read
        cache = DynamicCache()
        assert compat.cache_from_kwargs({name: cache}, "m", "t") is cache


def test_bounded_cache_whose_positions_are_never_recorded_raises():
    model = tiny_model("llama", length=16)  # not patched: nothing records the positions of the keys
    cache = LambdaCache(model.config.num_hidden_layers, 2, 4, owner=("lm-infinite", "llama"))
    model(random_ids(8), **compat.cache_kwargs(model, cache), use_cache=True)
    with pytest.raises(compat.PatchNotInForce, match="never recorded"):
        model(random_ids(1), **compat.cache_kwargs(model, cache), use_cache=True)


def test_attention_that_never_sees_the_cache_raises(monkeypatch):
    """Found by the first call through the bounded cache that patch() makes itself, so the patch is refused."""
    model = tiny_model("llama", length=16)
    before = model(random_ids(8)).logits
    monkeypatch.setattr(hf, "cache_from_kwargs", lambda kwargs, method, model_type: None)  # a renamed keyword
    with pytest.raises(compat.PatchNotInForce, match="never recorded|never the KV cache"):
        api.patch(model, "lm-infinite", n_local=8)
    assert "_lengthwise_handle" not in model.__dict__ and torch.equal(model(random_ids(8)).logits, before)


def test_bounded_cache_layers_refuse_assisted_decoding():
    assert LambdaCacheLayer.is_croppable is False
    # what a user meets: generate() with prompt lookup (assisted decoding) under a bounded cache refuses, naming the
    # crop it would need, rather than decoding through a cache it cannot roll back (transformers asks is_croppable
    # from 5.24; before, our layer's crop raises)
    model = tiny_model("llama", length=16)
    with api.patch(model, "lm-infinite", n_global=2, n_local=8) as handle:
        with pytest.raises((ValueError, NotImplementedError), match="crop"):
            model.generate(random_ids(30), max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=3,
                           pad_token_id=0, **compat.cache_kwargs(model, handle.new_cache()))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_lm_infinite_generate_keeps_the_cache_bounded_in_every_family(family):
    model = tiny_model(family, length=16)
    with api.patch(model, "lm-infinite", n_global=2, n_local=8) as handle:
        out = model.generate(random_ids(30), attention_mask=torch.ones(1, 30, dtype=torch.long), max_new_tokens=12,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                             **compat.cache_kwargs(model, handle.new_cache()))
    cache = compat.output_cache(out)  # Phi-3 swaps the cache once (it recomputes the prompt): the one used at the end
    assert isinstance(cache, LambdaCache), (family, type(cache).__name__)
    bound = 2 + 8 + max(1, 8 // 8)
    assert 0 < cache.kept_tokens() <= bound + 1, (family, cache.kept_tokens())
