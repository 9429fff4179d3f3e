"""RULER-style tasks: deterministic generators of the asked length with the needle where asked, recall scoring,
and the command end to end on the bundled model."""

import json

import pytest
from typer.testing import CliRunner

from lengthwise.api import load_model
from lengthwise.cli import app
from lengthwise.data.ruler import TASKS, make_ruler_sample, recall


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("llama-rope-256")[1]


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_and_of_the_asked_length(task, tokenizer):
    a = make_ruler_sample(tokenizer, task, 1024, 0.5, seed=3)
    assert a == make_ruler_sample(tokenizer, task, 1024, 0.5, seed=3)
    assert a.expected != make_ruler_sample(tokenizer, task, 1024, 0.5, seed=4).expected
    n = len(tokenizer(a.prompt, add_special_tokens=False)["input_ids"])
    slack = 40 if task != "common_words" else 128  # the word list grows by whole rounds of words
    assert 1024 - slack <= n <= 1024, n
    assert all(str(e) in a.prompt for e in a.expected) or task == "common_words"
    assert a.prompt.endswith(a.answer_prefix)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_sits_at_the_asked_depth(depth, tokenizer):
    sample = make_ruler_sample(tokenizer, "niah_single", 2048, depth, seed=0)
    body = sample.prompt[: sample.prompt.index("\nWhat is")]
    where = body.index(sample.expected[0]) / len(body)
    assert abs(where - depth) < 0.06, (depth, where)


def test_pg19_style_haystack_is_used_when_given(tokenizer):
    text = "It was a bright cold day in April. The clocks were striking thirteen. " * 50
    sample = make_ruler_sample(tokenizer, "niah_multikey", 512, 0.3, seed=1, haystack=text)
    assert "clocks were striking" in sample.prompt and "grass is green" not in sample.prompt


def test_recall_scores_known_outputs():
    assert recall(" 1234567.", ("1234567",)) == 1.0
    assert recall("first 111 then 333", ("111", "222", "333", "444")) == 0.5
    assert recall("Apple, BRIDGE", ("apple", "bridge", "candle")) == pytest.approx(2 / 3)
    assert recall("nothing", ("x1",)) == 0.0


def test_unknown_task_and_short_length_are_refused(tokenizer):
    with pytest.raises(ValueError, match="accepted: niah_single"):
        make_ruler_sample(tokenizer, "qa_hotpot", 512, 0.5, seed=0)
    with pytest.raises(ValueError, match="needs at least"):
        make_ruler_sample(tokenizer, "common_words", 64, 0.5, seed=0)


def test_ruler_command_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "ruler.jsonl"
    args = ["ruler", "--tasks", "niah_single,variable_tracking", "--lengths", "256", "--samples", "1",
            "-m", "vanilla", "-m", "lm-infinite", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["method"], r["ruler_task"]) for r in records} == {
        (m, t) for m in ("vanilla", "lm-infinite") for t in ("niah_single", "variable_tracking")}
    assert all(0.0 <= r["metrics"]["recall"] <= 1.0 for r in records)
    assert (tmp_path / "ruler.png").stat().st_size > 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and len(out.read_text().splitlines()) == len(records)  # finished cells skipped
    bad = CliRunner().invoke(app, ["ruler", "--tasks", "nope", "--out", str(tmp_path / "x.jsonl")])
    assert bad.exit_code == 2 and "accepted: niah_single" in bad.output
