"""`lengthwise export`: the folder plain transformers loads gives the patched model's logits; a GGUF copy carries
llama.cpp's RoPE keys and every tensor and key of its source; what no engine expresses is refused in one line, and
nothing is left half-written."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from lengthwise import api
from lengthwise.cli import main
from lengthwise.errors import UserError
from lengthwise.export import check_spec, engine_settings, export_model, write_gguf
from lengthwise.models.real import REAL_MODELS, installed_file
from lengthwise.registry import get_method
from lengthwise.testing import random_ids, tiny_tokenizer
from lengthwise.zoo import tiny_model

LENGTH = 32  # the tiny models' training length
LONG = [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]  # rotary_dim / 2 = 8 factors (head_dim 16)
SPECS = {  # spec -> the exported max_position_embeddings
    "yarn:factor=4": 128,
    "ntk:factor=4": 128,
    "linear:factor=3": 96,
    "llama3:factor=4": 128,
    "longrope:factor=2": 64,
    f"longrope:long_factors={LONG},short_factors={[1.0] * 7 + [1.1]}".replace(" ", ""): 128,
    "dynamic-ntk:factor=2": LENGTH,  # transformers' dynamic reads L from max_position_embeddings
}


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _plain_logits(folder, ids):
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return plain(ids).logits


def _patched_logits(model, spec, ids):
    with api.patch(model, spec), torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("spec", list(SPECS))
def test_the_exported_folder_gives_the_patched_models_logits(spec, tmp_path, one_thread):
    model = tiny_model("llama", length=LENGTH)
    result = export_model(model, None, spec, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_position_embeddings"] == SPECS[spec] == result.settings.context
    assert config["rope_parameters"] == result.settings.rope_parameters
    assert "_lengthwise_handle" not in model.__dict__  # left unpatched
    for n in (24, 80):  # inside and past the training length (the longrope switch)
        ids = random_ids(n)
        torch.testing.assert_close(_plain_logits(tmp_path / "out", ids), _patched_logits(model, spec, ids),
                                   rtol=1e-5, atol=1e-5)
    assert _leftovers(tmp_path) == []


def test_ntk_is_the_default_rope_with_the_ntk_base():
    model = tiny_model("llama", length=LENGTH)
    settings = engine_settings(model, "ntk", get_method("ntk").make_config(factor=4.0))
    d = 16  # rotary dim
    assert settings.rope_parameters["rope_type"] == "default"
    assert math.isclose(settings.rope_parameters["rope_theta"], 10000.0 * 4.0 ** (d / (d - 2)), rel_tol=1e-12)
    assert settings.llama_cpp_flags()[:4] == ["--rope-scaling", "none", "--rope-freq-base",
                                              f"{settings.rope_parameters['rope_theta']:.9g}"]


@pytest.mark.parametrize("family", ["gpt_neox", "qwen3"])
def test_other_families_export_too(family, tmp_path, one_thread):
    model = tiny_model(family, length=LENGTH)
    export_model(model, None, "yarn:factor=4", tmp_path / "out")
    ids = random_ids(80)
    torch.testing.assert_close(_plain_logits(tmp_path / "out", ids), _patched_logits(model, "yarn:factor=4", ids),
                               rtol=1e-5, atol=1e-5)


def test_the_factor_of_a_model_shipping_linear_scaling_is_the_composed_one(tmp_path, one_thread):
    shipped = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}  # context 128, from 32
    model = tiny_model("llama", length=128, sliding_window=None, rope_parameters=dict(shipped))
    result = export_model(model, None, "linear:factor=2", tmp_path / "out")
    assert result.settings.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 8.0}
    assert result.settings.context == 256  # twice the model's own context
    ids = random_ids(200)
    torch.testing.assert_close(_plain_logits(tmp_path / "out", ids), _patched_logits(model, "linear:factor=2", ids),
                               rtol=1e-5, atol=1e-5)


def test_plain_transformers_without_lengthwise_loads_it(tmp_path):
    model = tiny_model("llama", length=LENGTH)
    export_model(model, tiny_tokenizer(), "yarn:factor=4", tmp_path / "out")
    ids = random_ids(80)
    torch.save(ids, tmp_path / "ids.pt")
    script = ("import sys, torch, transformers\n"
              f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, dtype=torch.float32)\n"
              f"transformers.AutoTokenizer.from_pretrained({str(tmp_path / 'out')!r})\n"
              "assert not any(name.startswith('lengthwise') for name in sys.modules)\n"
              f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
              f"torch.save(m.eval()(ids).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), _patched_logits(model, "yarn:factor=4", ids),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("spec", "expected"), [
    ("lm-infinite", "'lm-infinite' cannot be exported: its Λ-shaped attention"),
    ("streaming", "'streaming' cannot be exported: attention sinks"),
    ("logn", "'logn' cannot be exported: no transformers, vLLM, SGLang or llama.cpp model config scales the queries"),
    ("yarn:factor=4+logn", "'logn' cannot be exported"),
    ("yarn:factor=4,n_hat=4", "yarn with n_hat=4 cannot be exported: no transformers, vLLM, SGLang or llama.cpp "
                              "keeps the first n_hat positions"),
    ("vanilla", "nothing to export"),
])
def test_what_no_engine_expresses_is_refused_before_loading(spec, expected):
    with pytest.raises(UserError, match="cannot be exported|nothing to export") as refused:
        check_spec(spec)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_a_config_transformers_refuses_is_refused_and_nothing_is_written(tmp_path):
    model = tiny_model("phi3", length=LENGTH)  # Phi-3's config takes longrope only
    with pytest.raises(UserError, match="transformers' Phi3Config refuses its rope_parameters"):
        export_model(model, None, "yarn:factor=4", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_written_config_that_builds_other_frequencies_is_never_moved_into_place(tmp_path, monkeypatch):
    from lengthwise import export

    right = export.export_config

    def wrong(model_config, settings):
        config = right(model_config, settings)
        config.rope_parameters = {**config.rope_parameters, "factor": 2.0}
        return config

    monkeypatch.setattr(export, "export_config", wrong)
    with pytest.raises(RuntimeError, match="builds other rotary frequencies than the patched model"):
        export_model(tiny_model("llama", length=LENGTH), None, "linear:factor=4", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("source") / "tiny"
    tiny_model("llama", length=LENGTH).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as stop:
        main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return stop.value.code, out, err


@pytest.mark.parametrize(("method", "expected"), [
    ("lm-infinite", "'lm-infinite' cannot be exported"),
    ("yarn:factor=4,n_hat=2", "n_hat=2 cannot be exported"),
    ("yarn:factor=0.5", "yarn factor must be a number >= 1"),
])
def test_the_command_refuses_in_one_line_with_exit_code_2(method, expected, model_folder, tmp_path, capsys):
    code, _, err = _cli(capsys, "--model", model_folder, "--method", method, "--out", tmp_path / "out")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_out_is_refused_unless_forced(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("someone's file\n")
    code, _, err = _cli(capsys, "--model", model_folder, "--method", "yarn:factor=4", "--out", out)
    assert code == 2 and "exists and is not empty; pass --force" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").exists()
    code, printed, err = _cli(capsys, "--model", model_folder, "--method", "yarn:factor=4", "--out", out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert '--hf-overrides \'{"rope_parameters": {"rope_type": "yarn"' in printed and "--max-model-len 128" in printed
    assert "--rope-scaling yarn --rope-scale 4 --yarn-orig-ctx 32 -c 128" in printed
    assert _leftovers(tmp_path) == []
    code, _, err = _cli(capsys, "--model", model_folder, "--method", "yarn:factor=2", "--out", model_folder, "--force")
    assert code == 2 and "is the source model's own folder" in err


def test_gguf_needs_a_gguf_source(model_folder, tmp_path, capsys):
    code, _, err = _cli(capsys, "--model", model_folder, "--method", "yarn:factor=4", "--out", tmp_path / "out",
                        "--gguf", tmp_path / "x.gguf")
    assert code == 2 and "--gguf writes a copy of a GGUF source" in err
    assert list(tmp_path.iterdir()) == []


def test_a_gguf_llama_cpp_cannot_express_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    real = REAL_MODELS["smollm2-135m"]
    if installed_file(real) is None:
        pytest.skip(f"the real model is not installed ({real.install})")
    pytest.importorskip("gguf")
    monkeypatch.setattr("lengthwise.cli.export.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = _cli(capsys, "--model", "smollm2-135m", "--method", "longrope:factor=2", "--out", tmp_path / "out",
                        "--gguf", tmp_path / "out.gguf")
    assert code == 2 and "cannot be written as a GGUF: llama.cpp reads LongRoPE factors only" in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------ GGUF
def _tiny_gguf(path, **rope):
    """A small llama GGUF: the tiny llama's geometry (context 32, base 10000, 16 rotary dims), a few keys of every
    kind and an F32 and a Q8_0 tensor. Enough for a metadata round trip; not a model llama.cpp would run."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(LENGTH)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(16)
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_bool("tiny.flag", True)
    for key, (value, kind) in rope.items():
        writer.add_key_value(key, value, kind)
    writer.add_tensor("token_embd.weight", np.arange(3 * 64, dtype=np.float32).reshape(3, 64))
    quantized = gguf.quants.quantize(np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64),
                                     gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _read(path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    tensors = {t.name: (int(t.tensor_type), bytes(t.data.tobytes())) for t in reader.tensors}
    return fields, tensors


def _settings(spec):
    name, options = check_spec(spec)
    model = tiny_model("llama", length=LENGTH)
    with api.patch(model, name, **options) as handle:
        return engine_settings(model, name, handle.configs[0], spec)


@pytest.mark.parametrize(("spec", "keys"), [
    ("yarn:factor=4", {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                       "llama.rope.scaling.original_context_length": LENGTH, "llama.rope.scaling.yarn_beta_fast": 32.0,
                       "llama.rope.scaling.yarn_beta_slow": 1.0, "llama.context_length": 128}),
    ("linear:factor=3", {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 3.0,
                         "llama.context_length": 96}),
    ("ntk:factor=4", {"llama.rope.scaling.type": "none", "llama.context_length": 128,
                      "llama.rope.freq_base": pytest.approx(10000.0 * 4.0 ** (16 / 14), rel=1e-6)}),
    ("llama3:factor=4", {"llama.rope.scaling.type": "none", "llama.context_length": 128}),
])
def test_the_gguf_round_trip_keeps_everything_and_sets_the_rope_keys(spec, keys, tmp_path):
    source = _tiny_gguf(tmp_path / "tiny.gguf")
    settings = _settings(spec)
    out = write_gguf(source, settings, tmp_path / "out.gguf")
    fields, tensors = _read(out)
    before, source_tensors = _read(source)
    assert {k: fields[k] for k in keys} == keys
    assert {k: v for k, v in fields.items() if k not in keys} == {k: v for k, v in before.items() if k not in keys}
    assert {k: tensors[k] for k in source_tensors} == source_tensors  # every tensor, byte for byte
    if spec.startswith("llama3"):
        gguf = pytest.importorskip("gguf")
        import numpy as np

        factors = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "rope_freqs.weight")
        np.testing.assert_allclose(np.asarray(factors.data), settings.divisors, rtol=1e-6)
        assert settings.divisors[0] == pytest.approx(1.0) and settings.divisors[-1] == pytest.approx(4.0)
    else:
        assert set(tensors) == set(source_tensors)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(("spec", "expected"), [
    ("longrope:factor=2", "rope_factors_long/short tensors"),
    ("dynamic-ntk:factor=2", "llama.cpp has no length-dependent rope base"),
    ("yarn:factor=4,beta_fast=16", "this yarn sets beta_fast=16"),
])
def test_what_llama_cpp_lacks_is_refused_and_no_file_is_left(spec, expected, tmp_path):
    source = _tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(UserError, match="cannot be written as a GGUF") as refused:
        write_gguf(source, _settings(spec), tmp_path / "out.gguf")
    assert expected in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_a_gguf_that_ships_scaling_or_exists_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    T = gguf.GGUFValueType
    scaled = _tiny_gguf(tmp_path / "scaled.gguf", **{"llama.rope.scaling.type": ("yarn", T.STRING),
                                                     "llama.rope.scaling.factor": (2.0, T.FLOAT32)})
    with pytest.raises(UserError, match="the source GGUF ships RoPE scaling"):
        write_gguf(scaled, _settings("yarn:factor=4"), tmp_path / "out.gguf")
    source = _tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "out.gguf").write_bytes(b"old")
    with pytest.raises(UserError, match="exists; pass --force"):
        write_gguf(source, _settings("yarn:factor=4"), tmp_path / "out.gguf")
    write_gguf(source, _settings("yarn:factor=4"), tmp_path / "out.gguf", force=True)
    assert _read(tmp_path / "out.gguf")[0]["llama.rope.scaling.type"] == "yarn"
    with pytest.raises(UserError, match="is not the model the settings were computed for"):
        write_gguf(source, dataclasses.replace(_settings("yarn:factor=4"), base=5e5), tmp_path / "other.gguf")


# ----------------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_the_real_model_exports_as_a_folder_and_a_gguf(tmp_path, capsys):
    real = REAL_MODELS["smollm2-135m"]
    if installed_file(real) is None:
        pytest.skip(f"the real model is not installed ({real.install})")
    pytest.importorskip("gguf")
    code, printed, err = _cli(capsys, "--model", "smollm2-135m", "--method", "yarn:factor=4", "--out",
                              tmp_path / "out", "--gguf", tmp_path / "out.gguf")
    assert code == 0, err
    assert "max_position_embeddings 32768 (from 8192)" in printed and "GGUF written to" in printed
    fields, tensors = _read(tmp_path / "out.gguf")
    source_fields, source_tensors = _read(installed_file(real))
    assert fields["llama.context_length"] == 32768 and fields["llama.rope.scaling.type"] == "yarn"
    assert fields["llama.rope.scaling.original_context_length"] == 8192
    assert tensors.keys() == source_tensors.keys()
    model, tokenizer = api.load_model("smollm2-135m")
    ids = tokenizer("The old lighthouse keeper climbed the stairs every evening." * 4, return_tensors="pt").input_ids
    torch.testing.assert_close(_plain_logits(tmp_path / "out", ids), _patched_logits(model, "yarn:factor=4", ids),
                               rtol=1e-4, atol=1e-4)
