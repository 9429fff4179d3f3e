"""The RoPE rescaling family: pure functions against transformers, patches against transformers-native models,
n_hat, the short/long switch and dynamic NTK against recomputation from scratch."""

import json
import math

import pytest
import torch

from lengthwise.models.compat import PatchNotInForce
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lengthwise import api
from lengthwise.rope.methods.longrope import LongRopeConfig
from lengthwise.rope.table import make_plan
from lengthwise.registry import check_combination, get_method
from lengthwise.rope import scaling as S
from lengthwise.rope.table import to_rope_parameters
from lengthwise.rope.factors import read_factors_file, save_factors
from lengthwise.testing import random_ids, tiny_model
from lengthwise.models.compat import cache_kwargs

# ------------------------------------------------------------------------------------- pure functions vs transformers
GRID = [(hd, prf, f) for hd in (16, 64, 128) for prf in (1.0, 0.5) for f in (1.5, 4.0, 16.0)]


def _hf_config(head_dim, partial, length, params):
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=length,
                       rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": partial, **params})


@pytest.mark.parametrize(("head_dim", "partial", "factor"), GRID)
def test_inverse_frequencies_equal_transformers(head_dim, partial, factor):
    length = 256
    g = S.RopeGeometry(int(head_dim * partial), 10000.0, length)
    half = g.rotary_dim // 2
    long = [1 + (factor - 1) * i / (half - 1) for i in range(half)]
    short = [1 + 0.01 * i for i in range(half)]
    cases = [
        ("linear", {"factor": factor}, {}, S.linear_inv_freq(g, factor)),
        ("yarn", {"factor": factor, "original_max_position_embeddings": length}, {}, S.yarn_inv_freq(g, factor)),
        ("yarn", {"factor": factor, "original_max_position_embeddings": length, "beta_fast": 16.0, "beta_slow": 2.0,
                  "attention_factor": 1.3, "truncate": False}, {},
         S.yarn_inv_freq(g, factor, 16.0, 2.0, attention_factor=1.3, truncate=False)),
        ("llama3", {"factor": factor, "original_max_position_embeddings": length, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0}, {}, S.llama3_inv_freq(g, factor, 1.0, 4.0)),
        ("longrope", {"factor": factor, "original_max_position_embeddings": length, "long_factor": long,
                      "short_factor": short}, {"seq_len": length + 1},
         (S.longrope_geometry_inv_freq(g, long), S.longrope_attention_factor(factor, length))),
        ("longrope", {"factor": factor, "original_max_position_embeddings": length, "long_factor": long,
                      "short_factor": short}, {"seq_len": length},
         (S.longrope_geometry_inv_freq(g, short), S.longrope_attention_factor(factor, length))),
    ] + [
        ("dynamic", {"factor": factor}, {"seq_len": n}, S.dynamic_ntk_inv_freq(g, factor, n)) for n in (100, 700, 3000)
    ]
    for rope_type, params, kwargs, (ours, our_factor) in cases:
        theirs, their_factor = ROPE_INIT_FUNCTIONS[rope_type](_hf_config(head_dim, partial, length,
                                                                          {"rope_type": rope_type, **params}), **kwargs)
        assert torch.equal(ours, theirs), (rope_type, params, (ours - theirs).abs().max())
        assert math.isclose(our_factor, their_factor, rel_tol=1e-12), (rope_type, our_factor, their_factor)
    # the base-inv_freq form of LongRoPE (for the search) agrees to float32 rounding
    torch.testing.assert_close(S.longrope_inv_freq(S.base_inv_freq(g.rotary_dim, g.base), long),
                               S.longrope_geometry_inv_freq(g, long), rtol=1e-6, atol=0)


def test_formulas_on_their_own():
    g = S.RopeGeometry(64, 10000.0, 256)
    theta = S.base_inv_freq(64, 10000.0)
    # NTK: the highest frequency is kept, the lowest is interpolated by exactly s
    ntk, _ = S.ntk_inv_freq(g, 4.0)
    assert ntk[0] == theta[0]
    torch.testing.assert_close(ntk[-1] * 4 ** (62 / 62), theta[-1] * (4.0 ** (64 / 62)) ** (-62 / 64) * 4, rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(S.ntk_base(g, 4.0), 10000.0 * 4.0 ** (64 / 62))
    # dynamic NTK: no change inside the training length, NTK with s = n/L at factor 1
    assert torch.equal(S.dynamic_ntk_inv_freq(g, 1.0, 200)[0], theta)
    torch.testing.assert_close(S.dynamic_ntk_inv_freq(g, 1.0, 1024)[0], S.ntk_inv_freq(g, 4.0)[0])
    # YaRN: ramp 0 (keep) for fast dims, 1 (interpolate) for slow dims; attention factor 0.1 ln s + 1
    yarn, factor = S.yarn_inv_freq(g, 8.0)
    low, high = S.yarn_correction_range(g, 32, 1)
    assert torch.equal(yarn[: int(low)], theta[: int(low)])
    torch.testing.assert_close(yarn[int(high):], theta[int(high):] / 8.0)
    assert factor == pytest.approx(0.1 * math.log(8) + 1)
    assert S.yarn_ramp(2, 4, 6).tolist() == [0, 0, 0, 0.5, 1, 1]
    # LongRoPE attention factor and log-n scale
    assert S.longrope_attention_factor(4.0, 256) == pytest.approx(math.sqrt(1 + math.log(4) / math.log(256)))
    assert S.logn_scale(torch.tensor([0, 255, 511]), 256).tolist() == pytest.approx([1.0, 1.0, math.log(512) / math.log(256)])


def test_bad_options_are_refused_clearly(tmp_path):
    for name, options, match in [
        ("linear", {"factor": 0.5}, "factor must be a number >= 1"),
        ("yarn", {"beta_fast": 1, "beta_slow": 2}, "beta_fast must exceed beta_slow"),
        ("ntk", {"n_hat": -1}, "n_hat must be an integer >= 0"),
        ("llama3", {"high_freq_factor": 0.5}, "high_freq_factor must exceed"),
        ("longrope", {"long_factors": [1.0, -2.0]}, r"long_factors\[1\] must be a positive"),
        ("longrope", {"long_factors": str(tmp_path / "missing.json")}, "does not exist"),
        ("dynamic-ntk", {"original_max_position_embeddings": 1}, "original_max_position_embeddings"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            get_method(name).make_config(**options)
    with pytest.raises(ValueError, match="has 3 numbers; this model needs rotary_dim/2 = 8"):
        api.patch(tiny_model("llama"), "longrope:long_factors=[1,2,3]")  # head_dim 16 -> 8 frequencies
    with pytest.raises(ValueError, match="GPT-J keeps a fixed sin/cos table"):
        api.patch(tiny_model("gptj"), "yarn")


def test_factors_file_round_trip(tmp_path):
    path = save_factors(tmp_path / "f.json", [1, 2, 3, 4], [1, 1, 1, 1], n_hat=4, fitness=3.2)
    assert read_factors_file(path) == (1.0, 2.0, 3.0, 4.0)
    assert read_factors_file(path, "short") == (1.0, 1.0, 1.0, 1.0)
    config = LongRopeConfig(long_factors=str(path), short_factors=str(path))
    assert config.long_factors == (1.0, 2.0, 3.0, 4.0) and config.short_factors == (1.0,) * 4
    assert config.source == str(path) and config.scale == 4.0
    (tmp_path / "list.json").write_text(json.dumps([1.5] * 4))
    assert LongRopeConfig(long_factors=str(tmp_path / "list.json")).short_factors is None


# ------------------------------------------------------------------- patches vs transformers-native models (export)
EXPORTS = [
    ("linear", {"factor": 3.0}),
    ("ntk", {"factor": 4.0}),
    ("dynamic-ntk", {"factor": 2.0}),
    ("yarn", {"factor": 4.0}),
    ("yarn", {"factor": 2.5, "beta_fast": 8.0, "beta_slow": 0.5, "attention_factor": 1.2}),
    ("llama3", {"factor": 4.0, "high_freq_factor": 8.0}),
    ("longrope", {"long_factors": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0], "short_factors": [1.0] * 7 + [1.1]}),
    ("longrope", {"factor": 2.0}),
]


@pytest.mark.parametrize(("name", "options"), EXPORTS)
@pytest.mark.parametrize("family", ["llama", pytest.param("gpt_neox", marks=pytest.mark.slow)])
def test_exported_rope_parameters_rebuild_the_patched_model(name, options, family):
    model = tiny_model(family, length=32)
    if family == "gpt_neox" and name == "longrope" and "long_factors" in options:
        options = {"long_factors": [1.0, 3.0], "short_factors": [1.0, 1.2]}  # rotary_dim 4 -> 2 frequencies
    config = get_method(name).make_config(**options)
    params = to_rope_parameters(name, config, model)
    native_config = model.config.__class__.from_dict({**model.config.to_dict(), "rope_parameters": params})
    native = AutoModelForCausalLM.from_config(native_config, dtype=torch.float32).eval()
    native.load_state_dict(model.state_dict())
    for n in (24, 80):  # inside and beyond the training length (the longrope switch)
        ids = random_ids(n)
        with api.patch(model, name, **options):
            ours = model(ids).logits
        torch.testing.assert_close(ours, native(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gpt_neox"])
def test_static_plans_replace_the_rotary_module_and_remove_puts_the_original_back(family):
    model = tiny_model(family, length=32)
    owner = model.model if hasattr(model, "model") else model.gpt_neox
    original = owner.rotary_emb
    inv_freq = original.inv_freq.clone()
    with api.patch(model, "yarn:factor=4"):
        built = owner.rotary_emb
        assert built is not original and built.rope_type == "yarn"  # transformers' own yarn, from rope_parameters
        assert torch.equal(original.inv_freq, inv_freq)  # the live module was not written into
    assert owner.rotary_emb is original


def test_a_rotary_module_that_disagrees_with_the_plan_is_refused(monkeypatch):
    from lengthwise.rope import table  # noqa: PLC0415

    row = table.ROPE_METHODS["linear"]
    wrong = lambda config, target: {"rope_type": "linear", "factor": float(config.factor) * 2}  # noqa: E731
    monkeypatch.setitem(table.ROPE_METHODS, "linear", table.RopeMethod(**{**row.__dict__, "export": wrong}))
    model = tiny_model("llama", length=32)
    with pytest.raises(PatchNotInForce, match="computes other frequencies than lengthwise's plan"):
        api.patch(model, "linear:factor=4")
    assert model.model.rotary_emb.rope_type == "default"  # nothing left patched


def test_export_refuses_what_transformers_cannot_express():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no start-token rule"):
        to_rope_parameters("linear", get_method("linear").make_config(n_hat=4), model)
    with pytest.raises(ValueError, match="log-n"):
        to_rope_parameters("logn", get_method("logn").make_config(), model)


# ------------------------------------------------------------------------------------- n_hat and the forward path
def test_position_dependent_rotary_refuses_calls_outside_its_model():
    model = tiny_model("llama", length=16)
    with api.patch(model, "linear:factor=3,n_hat=10"), pytest.raises(PatchNotInForce, match="pre-hook"):
        model.model.rotary_emb(random_ids(8)[..., None].float(), torch.arange(8)[None])


def test_n_hat_keeps_start_tokens_on_original_frequencies():
    model = tiny_model("llama", length=16)
    ids = random_ids(48)
    vanilla = model(ids).logits
    seen = []
    hook = model.model.rotary_emb.register_forward_hook(lambda module, args, output: seen.append(output[0]))
    with api.patch(model, "linear:factor=3,n_hat=10"):
        patched = model(ids).logits
    hook.remove()
    cos = seen[-1]  # (1, 48, 16), as the patched rotary module computed it during the forward (patch() checks the
    # module's output layout with one call of its own first)
    # causal: tokens < n_hat see only start tokens, all on the original frequencies -> unchanged logits
    torch.testing.assert_close(patched[:, :10], vanilla[:, :10])
    assert not torch.allclose(patched[:, 10:], vanilla[:, 10:])
    # eager reference of the angles: p * theta for p < 10, p * theta / 3 after
    theta = S.base_inv_freq(16, 10000.0)
    pos = torch.arange(48.0)[:, None]
    angles = torch.where(pos < 10, pos * theta, pos * theta / 3)
    torch.testing.assert_close(cos[0], torch.cat([angles, angles], -1).cos())
    with api.patch(model, "linear:factor=3,n_hat=48"):
        torch.testing.assert_close(model(ids).logits, vanilla)


def test_switching_forward_equals_static_swap_in_each_regime():
    """longrope with short factors goes through the replaced forward; each regime equals the static patch."""
    model = tiny_model("llama", length=16)
    long, short = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.0], [1.0] * 6 + [1.2, 1.4]
    for n, static_factors in ((12, short), (40, long)):
        ids = random_ids(n)
        with api.patch(model, "longrope", long_factors=long, short_factors=short, factor=3.0):
            switched = model(ids).logits
        with api.patch(model, "longrope", long_factors=static_factors, factor=3.0):
            static = model(ids).logits
        torch.testing.assert_close(switched, static, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------- cached decoding == recomputation from scratch
def _cached_vs_scratch(model, ids, steps):
    """Greedy decode with a DynamicCache; at every step compare the logits with a full forward of the prefix."""
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
    worst = 0.0
    for _ in range(steps):
        scratch = model(input_ids=ids, use_cache=False).logits[:, -1]
        worst = max(worst, (logits - scratch).abs().max().item())
        token = scratch.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        logits = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
    return worst


@pytest.mark.parametrize(("family", "spec"), [
    ("llama", "dynamic-ntk"),
    pytest.param("llama", "dynamic-ntk:factor=2,n_hat=3", marks=pytest.mark.slow),
    pytest.param("gpt_neox", "dynamic-ntk", marks=pytest.mark.slow),
    ("llama", "longrope:long_factors=[1,1.2,1.5,2,2.5,3,3.5,4],short_factors=[1,1,1,1,1,1,1.1,1.2]"),
])
def test_cached_decoding_equals_recomputation_when_frequencies_change(family, spec):
    model = tiny_model(family, length=8)
    with api.patch(model, spec):
        worst = _cached_vs_scratch(model, random_ids(6), steps=8)  # crosses L=8 and keeps growing
    assert worst < 1e-5
    # the control: transformers' own dynamic rope does not update its cache, and the same check sees it
    if spec == "dynamic-ntk" and family == "llama":
        native_config = model.config.__class__.from_dict(
            {**model.config.to_dict(), "rope_parameters": {"rope_type": "dynamic", "factor": 1.0, "rope_theta": 1e4}})
        native = AutoModelForCausalLM.from_config(native_config, dtype=torch.float32).eval()
        native.load_state_dict(model.state_dict())
        assert _cached_vs_scratch(native, random_ids(6), steps=8) > 1e-3


def test_generate_equals_greedy_recomputation():
    from lengthwise.generation import generate

    model = tiny_model("llama", length=8)
    prompt = random_ids(6)
    new = generate(model, prompt, "dynamic-ntk+logn", max_new_tokens=8)
    ids = prompt
    with api.patch(model, "dynamic-ntk+logn"):
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, ids[0, 6:])


def test_combinations():
    check_combination(["yarn", "logn"])
    check_combination(["dynamic-ntk", "logn"])
    with pytest.raises(ValueError, match="combine at most one of each role"):
        check_combination(["yarn", "linear"])
    assert get_method("dynamic-ntk").composable_with == ("query-scale",)
    model = tiny_model("llama")
    model.config._attn_implementation = "some-custom-attention"
    with pytest.raises(ValueError, match="cannot be combined with attention implementation"):
        api.patch(model, "longrope:n_hat=4")
    api.patch(model, "yarn").remove()  # static frequencies work under any attention


def test_position_dependent_frequencies_before_lambda_attention_are_refused_at_patch_time():
    """Λ attention re-rotates keys with one frequency set; a per-position or length-dependent plan patched before
    it must be refused when patching (the reverse order is refused by the rope method), leaving the model intact."""
    model = tiny_model("llama")
    ids = random_ids(40)
    before = model(ids).logits
    for spec in ("linear:n_hat=4+lm-infinite", "yarn:factor=2,n_hat=2+streaming",
                 "longrope:short_factors=[1,1,1,1,1,1,1,1]+lm-infinite"):
        with pytest.raises(ValueError, match="one set of frequencies"):
            api.patch(model, spec)
        assert torch.equal(model(ids).logits, before), spec
        assert model.config._attn_implementation == "sdpa", spec
    api.patch(model, "linear:factor=2+lm-infinite").remove()  # static frequencies compose


def test_plan_regimes():
    g = S.RopeGeometry(16, 10000.0, 32)
    plan = make_plan("dynamic-ntk", get_method("dynamic-ntk").make_config(), g)
    assert plan.regime(10) == plan.regime(32) == 32 and plan.regime(40) == 40
    assert make_plan("yarn", get_method("yarn").make_config(), g).static


@pytest.mark.slow
def test_rerotate_mode_fixes_the_first_layer_and_shrinks_the_gap():
    """on_change='rerotate' makes cached keys of layer 0 exactly those of a fresh pass; deeper layers keep states
    computed under the old base, so it is an approximation, closer than not updating at all."""
    model = tiny_model("llama", length=8)
    ids = random_ids(16)
    with api.patch(model, "dynamic-ntk:on_change=rerotate"):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :12], **cache_kwargs(model, cache), use_cache=True)
        model(input_ids=ids[:, 12:], **cache_kwargs(model, cache), use_cache=True)
        fresh = DynamicCache(config=model.config)
        model(input_ids=ids, **cache_kwargs(model, fresh), use_cache=True)
        torch.testing.assert_close(cache.layers[0].keys, fresh.layers[0].keys, rtol=1e-5, atol=1e-5)
        rerotated = _cached_vs_scratch(model, random_ids(6), steps=8)
    with api.patch(model, "dynamic-ntk:on_change=rebuild"):
        rebuilt = _cached_vs_scratch(model, random_ids(6), steps=8)
    assert rebuilt < 1e-5 < rerotated


def test_one_table_row_per_rope_method():
    """Every rope-role method is one row of the table (config, plan, export), defined in one module of its own, and
    the registry serves that config."""
    from lengthwise.registry import method_names
    from lengthwise.rope.table import ROPE_METHODS

    assert sorted(ROPE_METHODS) == sorted(n for n in method_names() if get_method(n).role == "rope")
    for name, row in ROPE_METHODS.items():
        assert get_method(name).config_cls is row.config
        home = f"lengthwise.rope.methods.{name.replace('-', '_')}"
        assert {row.config.__module__, row.plan.__module__, row.export.__module__} == {home}, name
    # the patch and the export read LongRoPE's factors in one place: a wrong count is refused by both
    model = tiny_model("llama")  # head_dim 16 -> 8 frequencies
    with pytest.raises(ValueError, match="this model needs rotary_dim/2 = 8"):
        to_rope_parameters("longrope", LongRopeConfig(long_factors=(1.0, 2.0)), model)
