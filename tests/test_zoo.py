"""lengthwise.zoo: tiny random models of the causal-LM types of transformers' own registry."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging as hf_logging

from lengthwise import zoo

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTH, WINDOW = 96, 12  # not the defaults of tiny_model, so that the test sees they are the ones asked

# a handful of types covering the layer patterns: plain, sliding, alternating sliding/full, 5 sliding + 1 full,
# MoE with sinks, linear-attention hybrid, MLA, mamba hybrid (all mamba by default), chunked + NoPE, KV sharing
TYPES = ["llama", "mistral", "gemma2", "gemma3_text", "gpt_oss", "qwen3_next", "deepseek_v3", "bamba", "llama4_text",
         "gemma3n_text"]
SLIDING = {"mistral", "gemma2", "gemma3_text", "gpt_oss", "gemma3n_text"}


def _default(model_type):
    with zoo._quiet():
        return CONFIG_MAPPING[model_type]()


def _kinds(config, name="layer_types"):
    return set(getattr(config, name, None) or [])


@pytest.fixture(scope="module")
def models():
    return {t: zoo.tiny_model(t, length=LENGTH, sliding_window=WINDOW) for t in TYPES}


def test_rope_types_come_from_the_registry():
    types = zoo.rope_causal_lm_types()
    assert types == sorted(types)
    assert {"llama", "mistral", "gemma2", "gpt_oss", "qwen3_next"} <= set(types)
    assert "gpt2" not in types  # a causal LM with learned positions, no rope_parameters
    assert all(_default(t).rope_parameters is not None for t in ("llama", "qwen3_next"))


@pytest.mark.parametrize("model_type", TYPES)
def test_tiny_model_keeps_the_layer_kinds(models, model_type):
    model, default = models[model_type], _default(model_type)
    config = model.config
    if model_type == "bamba":  # all mamba by default: one attention layer added
        assert _kinds(config) == _kinds(default) | {"full_attention"}
    else:
        assert _kinds(config) == _kinds(default)
    assert config.max_position_embeddings == LENGTH
    assert config.vocab_size == zoo.VOCAB
    assert config.hidden_size <= 128 and config.num_hidden_layers <= 10
    assert sum(p.numel() for p in model.parameters()) <= zoo.MAX_PARAMS
    assert not model.training
    if model_type in SLIDING:
        assert config.sliding_window == WINDOW
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert 0 <= getattr(config, name) < zoo.VOCAB


def test_fewest_layers_that_hold_every_kind(models):
    config = models["gemma3_text"].config
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert models["llama"].config.num_hidden_layers == zoo.MIN_LAYERS
    assert models["qwen3_next"].config.layer_types == ["linear_attention"] * 3 + ["full_attention"]


def test_gqa_mla_and_rotary_sizes(models):
    # kv heads as the default has them: llama's multi-head attention stays multi-head, mistral's GQA is GQA
    llama, mistral = models["llama"].config, models["mistral"].config
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim) == (4, 4, 16)
    assert (mistral.num_attention_heads, mistral.num_key_value_heads, mistral.head_dim) == (4, 2, 16)
    mla = models["deepseek_v3"].config
    assert mla.qk_rope_head_dim >= 8 and mla.qk_head_dim == mla.qk_nope_head_dim + mla.qk_rope_head_dim
    # qwen3_next rotates a quarter of each head: the head is widened to keep 8 rotary dims
    next_ = models["qwen3_next"].config
    assert next_.head_dim * next_.rope_parameters["partial_rotary_factor"] >= 8


def test_nope_chunked_and_kv_sharing_layers_kept(models):
    llama4 = models["llama4_text"].config
    assert set(llama4.no_rope_layers) == {0, 1}
    assert _kinds(llama4) == {"chunked_attention", "full_attention"}
    assert llama4.attention_chunk_size == WINDOW
    # gemma3n: the last layer reuses the KV of an earlier one, the layers before it hold every kind
    gemma3n = models["gemma3n_text"].config
    assert gemma3n.num_kv_shared_layers == 1
    assert set(gemma3n.layer_types[:-1]) == _kinds(_default("gemma3n_text"))
    assert "reuse" in getattr(gemma3n, "kv_sharing_modes", ["reuse"])  # a property of newer releases


def test_mamba_hybrid_gets_an_attention_layer(models):
    config = models["bamba"].config
    assert config.attn_layer_indices == [config.num_hidden_layers - 1]
    assert config.mamba_n_heads * config.mamba_d_head == config.mamba_expand * config.hidden_size
    assert any(hasattr(layer, "self_attn") for layer in models["bamba"].model.layers)


def test_forward_gives_finite_logits(models):
    ids = torch.randint(3, 300, (1, 30))
    for model_type, model in models.items():
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, 30, zoo.VOCAB), model_type
        assert torch.isfinite(logits).all(), model_type


def test_query_and_key_weights_are_sharpened():
    config = zoo.tiny_config("llama")
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sharp = zoo.tiny_model("llama", seed=0)
    attn, plain_attn = sharp.model.layers[1].self_attn, plain.model.layers[1].self_attn
    assert torch.equal(attn.q_proj.weight, 4 * plain_attn.q_proj.weight)
    assert torch.equal(attn.k_proj.weight, 4 * plain_attn.k_proj.weight)
    assert torch.equal(attn.v_proj.weight, plain_attn.v_proj.weight)


def test_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = (zoo.tiny_model("llama", seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_overrides_are_set_last():
    config = zoo.tiny_config("llama", num_hidden_layers=3, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                            "rope_theta": 10000.0})
    assert config.num_hidden_layers == 3
    assert config.rope_parameters["rope_type"] == "linear"


def test_none_window_keeps_the_type_default():
    assert zoo.tiny_config("gemma2", sliding_window=None).sliding_window == _default("gemma2").sliding_window


def test_quiet_and_restores_logging(capfd):
    verbosity = hf_logging.get_verbosity()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zoo.tiny_model("gpt_oss")  # transformers warns that its yarn factor does not match the tiny length
    assert hf_logging.get_verbosity() == verbosity
    assert not caught
    assert "[transformers]" not in capfd.readouterr().err


def test_not_buildable_reasons():
    with pytest.raises(zoo.NotBuildable, match="no_such_type"):
        zoo.tiny_config("no_such_type")
    with pytest.raises(zoo.NotBuildable, match="no_such_type"):
        zoo.tiny_model("no_such_type")
    with pytest.raises(zoo.NotBuildable, match="^model: "):  # a config type with no causal LM
        zoo.tiny_model("t5")
    with pytest.raises(zoo.NotBuildable, match="parameters when tiny"):
        zoo.tiny_model("llama", hidden_size=512, intermediate_size=2048)
    with pytest.raises(zoo.NotBuildable, match="^tiny config: ") as error:  # a validator's error, in one line
        zoo.tiny_config("bamba", mamba_n_heads=5)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_build_report_walks_every_type():
    report = zoo.build_report()
    assert list(report) == zoo.rope_causal_lm_types()
    assert all(status == "ok" or (status and "\n" not in status) for status in report.values())
    assert sum(status == "ok" for status in report.values()) >= 0.9 * len(report)
