"""Temp-LoRA CLI: `temp-lora eval` end to end on a tiny local model, `generate --temp-lora`, clear errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lengthwise.cli import app
from lengthwise.temp_lora.cost import causal_pairs, model_cost
from lengthwise.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls on a shared machine: one thread is faster
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", length=32).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    text = tmp_path_factory.mktemp("data") / "doc.txt"
    text.write_text("The grass is green. The sky is blue. The pass key is 12345. " * 12)
    yield path, text
    torch.set_num_threads(threads)


def test_eval_runs_both_arms_and_resumes(model_dir, tmp_path):
    path, text = model_dir
    out = tmp_path / "r.jsonl"
    args = ["temp-lora", "eval", "--model", str(path), "--data", str(text), "--max-docs", "1", "--max-tokens", "96",
            "--min-tokens", "32", "--chunk", "16", "--window", "32", "--buckets", "32,64", "--lr", "0.01",
            "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "PPL with Temp-LoRA" in result.output and "| 0-32 |" in result.output and "| all |" in result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["arm"] for r in records) == ["base", "lora"]
    assert all(r["metrics"]["tokens"] == 95 for r in records)
    assert CliRunner().invoke(app, args).exit_code == 0
    assert len(out.read_text().splitlines()) == 2  # resumed: nothing recomputed


@pytest.mark.parametrize(("extra", "message"), [
    (["--chunk", "64", "--window", "32"], "must not exceed window"),
    (["--targets", "c_attn"], "match no linear layer"),
    (["--method", "sliding-window"], "scoring strategy"),
    (["--min-tokens", "100000"], "no document has"),
])
def test_eval_clear_errors(model_dir, tmp_path, extra, message):
    path, text = model_dir
    result = CliRunner().invoke(app, ["temp-lora", "eval", "--model", str(path), "--data", str(text),
                                      "--out", str(tmp_path / "r.jsonl"), "--min-tokens", "32", *extra])
    assert result.exit_code != 0 and message in result.output


def test_generate_with_temp_lora(model_dir, tmp_path):
    path, _ = model_dir
    base = ["generate", "--model", str(path), "--prompt", "The grass is green. The sky is blue. " * 4,
            "--max-new-tokens", "6"]
    plain = CliRunner().invoke(app, base)
    result = CliRunner().invoke(app, [*base, "--temp-lora", "--temp-lora-chunk", "8", "--temp-lora-window", "32",
                                      "--temp-lora-save", str(tmp_path / "adapter")])
    assert plain.exit_code == 0 and result.exit_code == 0, result.output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    empty = CliRunner().invoke(app, [*base[:-4], "--prompt", "", "--max-new-tokens", "3", "--temp-lora"])
    assert empty.exit_code != 0 and "empty" in empty.output
    bad = CliRunner().invoke(app, [*base, "--temp-lora-save", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "needs --temp-lora" in bad.output


def test_analytic_flops_match_a_hand_count():
    model = tiny_model("llama", length=32)
    cost = model_cost(model)
    # 2 layers: q 64x64, k 64x32, v 64x32, o 64x64, gate/up/down 64x96 each; head 64x320
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96
    assert cost.linear_params == 2 * per_layer + 64 * 320 and cost.lora_params == 0
    assert cost.attn_dim == 64 and cost.num_layers == 2
    assert cost.forward_flops(10, causal_pairs(10, 0)) == 2 * cost.linear_params * 10 + 4 * 64 * 2 * 55
    assert causal_pairs(2, 3) == 2 * 3 + 3
