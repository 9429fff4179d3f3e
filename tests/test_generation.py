import torch
from typer.testing import CliRunner

from lengthwise.cli import app
from lengthwise.generation import generate
from lengthwise.testing import random_ids, tiny_model


def test_vanilla_generate_matches_manual_greedy():
    model = tiny_model("llama")
    ids = random_ids(12)
    new = generate(model, ids, "vanilla", max_new_tokens=5)
    manual = ids
    for _ in range(5):
        manual = torch.cat([manual, model(manual).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert new.tolist() == manual[0, 12:].tolist()


def test_sliding_window_generation_recomputes_the_last_window():
    model = tiny_model("llama", length=16)
    ids = random_ids(30)
    new = generate(model, ids, "sliding-window", max_new_tokens=3)
    first = model(ids[:, -16:]).logits[0, -1].argmax()
    assert new.shape == (3,) and new[0] == first


def test_generate_cli_decodes_on_the_static_cache_with_the_eager_tokens():
    args = ["generate", "--model", "llama-rope-256", "-m", "lm-infinite:n_global=4,n_local=16", "--prompt",
            "def main():\n    return sum(range(10))\n" * 3, "--max-new-tokens", "12"]
    eager = CliRunner().invoke(app, args)
    static = CliRunner().invoke(app, [*args, "--decode", "static"])
    stored = CliRunner().invoke(app, [*args, "--decode", "static", "--decode-weights", "int8"])
    assert eager.exit_code == static.exit_code == stored.exit_code == 0, (eager.output, static.output, stored.output)
    def text(result):  # the generated text, without the loader's progress bar
        return [line for line in result.output.splitlines() if "Loading weights" not in line]

    assert text(static) == text(eager) and any(line.strip() for line in text(stored))


def test_generate_cli_requires_one_prompt():
    result = CliRunner().invoke(app, ["generate", "--model", "llama-rope-256"])
    assert result.exit_code != 0 and "exactly one of --prompt" in result.output
