"""LongRoPE search on tiny models: fitness through the `longrope` method vs a direct reference patch, the
end-to-end search (outputs, short factors, resume, progressive extension), transformers-native rope_parameters,
and clear errors for bad input."""

import json
import math
import random

import pytest
import torch

from lengthwise.api import patch
from lengthwise.data.corpus import Document
from lengthwise.scoring import nll_one_pass
from lengthwise.search import EvolutionConfig, longrope
from lengthwise.search.fitness import PerplexityFitness
from lengthwise.search.longrope import load_previous
from lengthwise.search.space import Candidate, SearchSpace, seed_candidates
from lengthwise.testing import random_ids, tiny_model, tiny_tokenizer

L = 32  # training length of the tiny models


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", length=L)


@pytest.fixture(scope="module")
def docs():
    rng = random.Random(0)
    words = "the grass is green sky blue sun yellow pass key remember here we go there and back again".split()
    return [Document(f"doc{i}", " ".join(rng.choice(words) for _ in range(400))) for i in range(3)]


def budget(**kw):
    return EvolutionConfig(**{"population": 6, "parents": 3, "mutations": 2, "crossovers": 2, "iterations": 3, **kw})


def test_method_fitness_equals_direct_reference(model):
    ids = [random_ids(4 * L, seed=s)[0].tolist() for s in (1, 2)]
    space = SearchSpace(8, 4.0, n_hat_choices=(0, 4))
    for candidate in [*seed_candidates(space, L, 10000.0), Candidate((100, 120, 150, 200, 260, 330, 400, 500), 4)]:
        via_method = PerplexityFitness(model, ids, L, 4.0)(candidate)
        direct = PerplexityFitness(model, ids, L, 4.0, direct=True)(candidate)
        assert via_method == pytest.approx(direct, rel=1e-4)
    assert "_lengthwise_handle" not in model.__dict__  # the patch was removed


def test_fitness_is_perplexity_of_the_patched_model(model):
    ids = random_ids(3 * L, seed=3)[0]
    candidate = Candidate((100, 110, 130, 160, 200, 240, 280, 300), 2)
    fitness = PerplexityFitness(model, [ids.tolist()], L, 3.0, attention_factor=1.0)
    with patch(model, "longrope", long_factors=candidate.lambdas, n_hat=2, factor=3.0, attention_factor=1.0):
        expected = math.exp(nll_one_pass(model, ids).double().mean().item())
    assert fitness(candidate) == pytest.approx(expected, rel=1e-6)


def test_end_to_end_search_outputs_short_factors_and_resume(model, docs, tmp_path):
    tok = tiny_tokenizer()
    kw = dict(scale=4.0, evolution=budget(), max_docs=2, short_length=L, short_evolution=budget(iterations=2),
              n_hat_choices=(0, 2, 4))
    rows = []
    result = longrope(model, tok, docs, out_dir=tmp_path / "a", on_generation=lambda p, r: rows.append((p, r)), **kw)
    assert [p for p, _ in rows] == ["long"] * 3 + ["short"] * 2
    assert result.long.ppl <= min(result.long.seed_ppl.values())
    assert set(result.long.seed_ppl) == {"pi", "ntk", "yarn"}
    assert len(result.long_factors) == 8 and result.long_factors == sorted(result.long_factors)
    assert all(1.0 <= x <= 5.0 for x in result.long_factors)
    assert all(1.0 <= x <= 1.25 for x in result.short_factors)  # the smaller ceiling
    saved = json.loads((tmp_path / "a" / "factors.json").read_text())
    assert saved["long_factors"] == result.long_factors and saved["short_factors"] == result.short_factors
    params = json.loads((tmp_path / "a" / "rope_parameters.json").read_text())
    assert params["rope_type"] == "longrope" and params["long_factor"] == result.long_factors
    log = [json.loads(line) for line in (tmp_path / "a" / "generations.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["long"] * 3 + ["short"] * 2 and all("mean" in r and "seconds" in r for r in log)
    # the factors file applies through the longrope method, with the length switch
    with patch(model, result.method_spec(str(tmp_path / "a" / "factors.json"))) as handle:
        cfg = handle.configs[0]
        assert list(cfg.short_factors) == result.short_factors and cfg.n_hat == result.n_hat
    # a second run in the same folder resumes from the checkpoints: nothing is re-evaluated, same result
    calls = []
    again = longrope(model, tok, docs, out_dir=tmp_path / "a", on_evaluation=lambda: calls.append(1), **kw)
    assert calls == [] and again.long_factors == result.long_factors and again.short_factors == result.short_factors


def test_killed_search_resumes_to_the_same_result(model, docs, tmp_path, search_killer):
    tok = tiny_tokenizer()
    kw = dict(scale=2.0, evolution=budget(iterations=4), max_docs=1, n_hat_choices=(0, 4))
    full = longrope(model, tok, docs, **kw)

    with pytest.raises(search_killer.Killed):
        longrope(model, tok, docs, out_dir=tmp_path, on_generation=search_killer.at(1), **kw)
    resumed = longrope(model, tok, docs, out_dir=tmp_path, **kw)
    assert resumed.long_factors == full.long_factors and resumed.long.ppl == full.long.ppl
    assert [r["best"] for r in resumed.long.log] == [r["best"] for r in full.long.log]


def test_progressive_extension_starts_from_a_previous_result(model, docs, tmp_path):
    tok = tiny_tokenizer()
    prev = {"long_factors": [1.0, 1.1, 1.3, 1.5, 1.7, 2.0, 2.0, 2.0], "factor": 2.0, "n_hat": 4}
    result = longrope(model, tok, docs, scale=4.0, evolution=budget(iterations=1), max_docs=1,
                      n_hat_choices=(0, 4), previous=prev)
    assert "previous" in result.long.seed_ppl
    start, scale = load_previous(prev)
    assert scale == 2.0 and start.n_hat == 4


def test_rope_parameters_are_transformers_native(model, docs):
    """A model configured with the exported rope_parameters computes what the patched model computes (n_hat 0)."""
    from transformers import AutoModelForCausalLM

    long = [1.0, 1.2, 1.5, 1.9, 2.4, 3.0, 3.6, 4.0]
    short = [1.0, 1.0, 1.0, 1.01, 1.02, 1.05, 1.1, 1.2]
    from lengthwise.search.longrope import rope_parameters

    params = rope_parameters(long, short, 4.0, L, 10000.0, 1.1)
    config = model.config.__class__.from_dict({**model.config.to_dict(), "rope_parameters": params,
                                               "max_position_embeddings": 4 * L})
    native = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    native.load_state_dict(model.state_dict())
    for n in (L, 3 * L):  # short regime, then long regime
        ids = random_ids(n, seed=n)
        with torch.no_grad(), patch(model, "longrope", long_factors=long, short_factors=short, factor=4.0,
                                    attention_factor=1.1):
            ours = model(ids).logits
        with torch.no_grad():
            theirs = native(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused_before_any_work(model, docs):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="scale s must be >= 1"):
        longrope(model, tok, docs, scale=0.5)
    with pytest.raises(ValueError, match="exactly one of target_length"):
        longrope(model, tok, docs)
    with pytest.raises(ValueError, match="target_length must be an integer >= the training length"):
        longrope(model, tok, docs, target_length=L - 1)
    with pytest.raises(ValueError, match="no document has 100000 tokens"):
        longrope(model, tok, docs, target_length=100000)
    with pytest.raises(ValueError, match="short_length"):
        longrope(model, tok, docs, scale=2.0, short_length=4 * L)
    with pytest.raises(ValueError, match="works on rope models"):
        longrope(tiny_model("bloom", length=L), tok, docs, scale=2.0)


def test_cli_search_and_errors(tmp_path):
    from typer.testing import CliRunner

    from lengthwise.cli.app import app

    runner = CliRunner()
    bad = runner.invoke(app, ["search", "--scale", "0.5"])
    assert bad.exit_code != 0 and "scale" in bad.output
    both = runner.invoke(app, ["search", "--scale", "2", "--target-length", "512"])
    assert both.exit_code != 0 and "exactly one" in both.output
