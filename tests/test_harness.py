"""The lm-evaluation-harness model `lengthwise`: same log-likelihoods as our scorer, and `simple_evaluate` end to end
offline on local tasks (a multiple-choice task over a local JSON file, and a RULER task exported to the harness)."""

import json
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="the `eval` extra is not installed (pip install -e .[eval])")

from lengthwise import harness  # noqa: E402
from lengthwise.api import load_model  # noqa: E402
from lengthwise.scoring import nll_one_pass  # noqa: E402

METHOD = "lm-infinite:n_local=64;n_global=4"


@pytest.fixture(scope="module")
def lm():
    return harness.LengthwiseLM(pretrained="llama-rope-256", method=METHOD, max_length=1024, batch_size=1)


def test_a_spec_that_does_not_parse_fails_before_loading(monkeypatch):
    monkeypatch.setattr(harness, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="unknown method"):
        harness.LengthwiseLM(pretrained="llama-rope-256", method="no-such-method")


def test_rolling_loglikelihood_equals_our_scorer(lm):
    from lm_eval.api.instance import Instance  # noqa: PLC0415

    text = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 8
    (harness_ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    tokens = lm.tok_encode(text)
    assert 256 < len(tokens) < 1024  # past the training length, inside one harness window
    ids = torch.tensor([lm.prefix_token_id] + tokens)
    ours = -float(nll_one_pass(lm.model, ids).double().sum())  # the model is patched with METHOD
    assert harness_ll == pytest.approx(ours, rel=1e-4, abs=1e-2)


def test_simple_evaluate_runs_local_tasks_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, tokenizer = load_model("llama-rope-256")
    choices = [{"text": "The grass is", "choices": [" green.", " purple."], "label": 0} for _ in range(4)]
    (tmp_path / "mc.json").write_text("\n".join(json.dumps(d) for d in choices))
    (tmp_path / "mc.yaml").write_text(f"""task: lengthwise_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.json'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    ruler = harness.export_ruler_task(tmp_path, tokenizer, 384, samples=2)
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    results = lm_eval.simple_evaluate(
        model="lengthwise", model_args=f"pretrained=llama-rope-256,method={METHOD},max_length=1024",
        tasks=["lengthwise_local_mc", ruler], task_manager=TaskManager(include_path=str(tmp_path)),
        batch_size=1, limit=None)
    assert results["results"]["lengthwise_local_mc"]["acc,none"] in (0.0, 1.0)
    assert 0.0 <= results["results"][ruler]["exact_match,first-number"] <= 1.0
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
