"""Models that ship scaled RoPE (llama3, yarn, longrope, linear): the model's own context is L, lm-infinite's defaults
equal the unpatched model inside it, and every RoPE method composes by the stated rule or refuses in one line."""

import pytest
import torch

import lengthwise
from lengthwise.errors import UserError
from lengthwise.models.families import context_length, model_info
from lengthwise.rope.plan import FrequencyPlan
from lengthwise.rope.scaling import RopeGeometry
from lengthwise.rope.table import make_plan
from lengthwise.zoo import tiny_model

ORIGINAL = 32
HALF = 8  # rotary_dim / 2 of the tiny llama (head_dim 16)
SHIPPED = {
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                 "long_factor": [1.0 + i for i in range(HALF)], "short_factor": [1.0] * HALF},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
}
CONTEXT = {"llama3": 256, "yarn": 128, "longrope": 256, "linear": 128}  # max_position_embeddings of each model


def shipped_model(kind: str):
    return tiny_model("llama", length=CONTEXT[kind], sliding_window=None, rope_parameters=dict(SHIPPED[kind]))


def ids(n: int) -> torch.Tensor:
    return torch.randint(3, 320, (1, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", list(SHIPPED))
def test_the_training_length_is_the_models_own_context(kind):
    model = shipped_model(kind)
    assert context_length(model.config) == model_info(model).pretrain_length == CONTEXT[kind] > ORIGINAL


@pytest.mark.parametrize("kind", list(SHIPPED))
def test_lm_infinite_defaults_equal_the_unpatched_model_inside_its_own_context(kind):
    model = shipped_model(kind)
    tokens = ids(CONTEXT[kind] - 8)  # far past the original length the scaling started from
    before = model(tokens).logits
    with lengthwise.patch(model, "lm-infinite") as handle:
        torch.testing.assert_close(model(tokens).logits, before, atol=1e-4, rtol=1e-4)
        assert handle.new_cache().layers[0].n_local == CONTEXT[kind]


def _inv_freq(model) -> torch.Tensor:
    return model.model.rotary_emb.inv_freq.float()


def _plan(method: str, **options) -> FrequencyPlan:
    from lengthwise.registry import get_method

    return make_plan(method, get_method(method).make_config(**options), RopeGeometry(2 * HALF, 10000.0, ORIGINAL))


@pytest.mark.parametrize(("kind", "method", "factor", "composed"), [
    ("yarn", "yarn", 2.0, dict(factor=8.0, original_max_position_embeddings=ORIGINAL)),
    ("llama3", "llama3", 2.0, dict(factor=16.0, original_max_position_embeddings=ORIGINAL)),
    ("linear", "linear", 2.0, dict(factor=8.0)),
])
def test_a_method_of_the_shipped_type_multiplies_the_shipped_factor(kind, method, factor, composed):
    model = shipped_model(kind)
    with lengthwise.patch(model, method, factor=factor) as handle:
        expected, attention = _plan(method, **composed).scaled(0)
        torch.testing.assert_close(_inv_freq(model), expected, rtol=1e-6, atol=0)
        assert handle.configs[0].factor == composed["factor"]  # what runs is what the handle reports
        assert model.model.rotary_emb.attention_scaling == pytest.approx(attention)


@pytest.mark.parametrize(("kind", "method"), [("llama3", "yarn"), ("yarn", "linear"), ("linear", "ntk"),
                                              ("longrope", "longrope"), ("yarn", "dynamic-ntk")])
def test_another_type_is_refused_naming_the_shipped_scaling_and_the_override(kind, method):
    model = shipped_model(kind)
    before = _inv_freq(model).clone()
    with pytest.raises(UserError, match=rf"rope_type '{kind}'.*shipped=replace") as refused:
        lengthwise.patch(model, method, factor=2.0)
    assert "\n" not in str(refused.value)
    assert torch.equal(_inv_freq(model), before) and "_lengthwise_handle" not in model.__dict__


def test_an_option_the_shipped_scaling_sets_is_refused_when_composing():
    with pytest.raises(UserError, match="takes beta_fast from it"):
        lengthwise.patch(shipped_model("yarn"), "yarn", factor=2.0, beta_fast=16.0)


def test_replace_rescales_the_unscaled_frequencies_from_the_shipped_original_length():
    model = shipped_model("llama3")
    with lengthwise.patch(model, "yarn", factor=4.0, shipped="replace") as handle:
        expected, _ = _plan("yarn", factor=4.0, original_max_position_embeddings=ORIGINAL).scaled(0)
        torch.testing.assert_close(_inv_freq(model), expected, rtol=1e-6, atol=0)
        assert handle.configs[0].original_max_position_embeddings == ORIGINAL
    with lengthwise.patch(shipped_model("linear"), "ntk", factor=2.0, shipped="replace") as handle:
        assert handle.configs[0].original_max_position_embeddings == CONTEXT["linear"] // 4  # context / factor


def test_unscaled_models_are_unchanged_by_the_option():
    model = tiny_model("llama", length=64, sliding_window=None)
    with lengthwise.patch(model, "yarn", factor=2.0) as handle:
        expected, _ = make_plan("yarn", handle.configs[0], RopeGeometry(2 * HALF, 10000.0, 64)).scaled(0)
        torch.testing.assert_close(_inv_freq(model), expected, rtol=1e-6, atol=0)
        assert handle.configs[0].factor == 2.0 and handle.configs[0].original_max_position_embeddings is None
