"""LongRoPE search engine: search space, seeds, mutation/crossover, determinism, checkpoint/resume (synthetic fitness)."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from lengthwise.rope import scaling
from lengthwise.search.checkpoint import load_checkpoint, save_checkpoint
from lengthwise.search.evolution import (
    EvolutionConfig,
    crossover,
    evolve,
    initial_population,
    mutate,
    next_population,
)
from lengthwise.rope.scaling import longrope_attention_factor as attention_factor
from lengthwise.search.space import (
    Candidate,
    SearchSpace,
    ntk_factors,
    rescale_candidate,
    seed_candidates,
    yarn_factors,
)

N = 8  # rotary pairs of the synthetic problem
TARGET = [100 + 45 * i for i in range(N)]  # a monotone optimum inside [1, 5] at s = 4


def synthetic(candidates):
    """A smooth fitness with a known optimum (lower is better); n_hat = 4 is best."""
    return [sum((a - b) ** 2 for a, b in zip(c.factors, TARGET)) / 1e4 + abs(c.n_hat - 4) for c in candidates]


def small(**kw):
    return EvolutionConfig(**{"population": 12, "parents": 6, "mutations": 4, "crossovers": 4, "iterations": 6, **kw})


SPACE = SearchSpace(N, 4.0, n_hat_choices=(0, 1, 2, 4, 8))


def test_space_bounds_grid_and_validity():
    assert (SPACE.low, SPACE.high) == (100, 500)  # [1, 1.25 s] in hundredths
    assert SearchSpace(4, 8.0).high == 1000
    c = SPACE.snap([0.5, 1.234, 1.2, 3.0, 9.0, 9.0, 9.0, 9.0], n_hat=3)
    assert c.factors == (100, 123, 123, 300, 500, 500, 500, 500)  # clipped, on the grid, non-decreasing
    assert c.n_hat in (2, 4) and SPACE.is_valid(c)
    assert not SPACE.is_valid(Candidate((100, 200, 150, 300, 300, 300, 300, 300)))  # non-monotone
    assert not SPACE.is_valid(Candidate((99,) + (200,) * 7))  # below 1
    assert not SPACE.is_valid(Candidate((100,) * 7 + (501,)))  # above 1.25 s
    assert not SPACE.is_valid(Candidate((100,) * 8, n_hat=3))  # n_hat not a choice
    assert Candidate.from_json(json.loads(json.dumps(c.to_json()))) == c


@pytest.mark.parametrize("bad", [0.5, 0.99, float("nan")])
def test_scale_below_one_is_refused(bad):
    with pytest.raises(ValueError, match="scale s must be >= 1"):
        SearchSpace(8, bad)


def test_seeds_match_the_rope_formulas():
    g = scaling.RopeGeometry(2 * N, 10000.0, 64)
    base = scaling.base_inv_freq(2 * N, 10000.0).double()
    ntk = base / scaling.ntk_inv_freq(g, 4.0)[0].double()
    yarn = base / scaling.yarn_inv_freq(g, 4.0)[0].double()
    assert torch.allclose(torch.tensor(ntk_factors(N, 4.0, 10000.0, 64)), ntk.float())
    assert torch.allclose(torch.tensor(yarn_factors(N, 4.0, 64, 10000.0)), yarn.float())
    # closed form of NTK: λ_i = s^(2i/(d-2))
    assert ntk_factors(N, 4.0, 10000.0)[3] == pytest.approx(4.0 ** (6 / (2 * N - 2)), rel=1e-5)
    pi, ntk_c, yarn_c = seed_candidates(SPACE, 64, 10000.0)
    assert pi.factors == (400,) * N
    assert ntk_c.factors[0] == 100 and ntk_c.factors[-1] == 400
    assert all(SPACE.is_valid(c) for c in (pi, ntk_c, yarn_c))


def test_attention_factor():
    assert attention_factor(1.0, 4096) == 1.0
    assert attention_factor(8.0, 4096) == pytest.approx(math.sqrt(1 + math.log(8) / math.log(4096)))


def test_mutation_keeps_constraints_and_changes_something():
    rng = random.Random(0)
    cfg = small(mutation_prob=0.3)
    parent = Candidate((400,) * N)  # PI: constant factors can still spread (re-sorting repairs monotonicity)
    children = {mutate(parent, SPACE, cfg, rng) for _ in range(50)}
    assert all(SPACE.is_valid(c) for c in children)
    assert len(children) > 30
    assert any(c.factors[0] < 400 < c.factors[-1] for c in children)


def test_crossover_mixes_parents_and_rejects_non_monotone_children():
    rng = random.Random(1)
    a, b = Candidate(tuple(range(100, 100 + 10 * N, 10))), Candidate((300,) * N, 8)
    kids = [crossover(a, b, rng) for _ in range(40)]
    assert all(all(x in (p, q) for x, p, q in zip(k.factors, a.factors, b.factors)) for k in kids)
    assert all(k.n_hat in (0, 8) for k in kids)
    crossed = Candidate((300, 110) + a.factors[2:])  # non-monotone mix
    assert not SPACE.is_valid(crossed)
    population = next_population([a, b], SPACE, small(mutations=0, crossovers=20), 1, {a, b})
    assert all(SPACE.is_valid(c) for c in population)


def test_generations_hold_no_duplicates_and_respect_sizes():
    cfg = small()
    seeds = seed_candidates(SPACE, 64, 10000.0)
    pop0 = initial_population(seeds, SPACE, cfg)
    assert len(pop0) == cfg.population and len(set(pop0)) == len(pop0)
    assert pop0[: len(seeds)] == seeds  # the seeds come first, unchanged
    ranked = sorted(pop0, key=lambda c: synthetic([c])[0])
    seen = set(pop0)
    pop1 = next_population(ranked, SPACE, cfg, 1, seen)
    assert pop1[: cfg.parents] == ranked[: cfg.parents]
    children = pop1[cfg.parents :]
    assert len(children) == cfg.mutations + cfg.crossovers
    assert not set(children) & seen and len(set(children)) == len(children)


def test_search_improves_on_its_seeds_and_is_deterministic():
    seeds = seed_candidates(SPACE, 64, 10000.0)
    state = evolve(synthetic, SPACE, small(iterations=12), seeds)
    again = evolve(synthetic, SPACE, small(iterations=12), seeds)
    best, value = state.best()
    assert value < min(synthetic(seeds))
    assert [r["best"] for r in state.log] == [r["best"] for r in again.log] and again.best() == (best, value)
    assert all(a["best_so_far"] >= b["best_so_far"] for a, b in zip(state.log, state.log[1:]))  # elitism
    assert len(state.log) == 12 and {"best", "mean", "seconds", "evaluations"} <= set(state.log[0])
    other = evolve(synthetic, SPACE, small(iterations=12, seed=1), seeds)
    assert other.scores.keys() != state.scores.keys()


def test_each_candidate_is_evaluated_once():
    calls = []

    def counting(cands):
        calls.extend(cands)
        return synthetic(cands)

    evolve(counting, SPACE, small(), seed_candidates(SPACE, 64, 10000.0))
    assert len(calls) == len(set(calls))


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    seeds = seed_candidates(SPACE, 64, 10000.0)
    cfg = small(iterations=7)
    fingerprint = {"what": "synthetic", "cfg": 7}
    path = tmp_path / "ckpt.json"
    full = evolve(synthetic, SPACE, cfg, seeds)

    class Killed(Exception):
        pass

    def kill_after_three(state):
        save_checkpoint(path, state, fingerprint)
        if state.generation == 3:
            raise Killed

    with pytest.raises(Killed):
        evolve(synthetic, SPACE, cfg, seeds, on_generation=kill_after_three)
    resumed_state = load_checkpoint(path, fingerprint)
    assert resumed_state.generation == 3
    resumed = evolve(synthetic, SPACE, cfg, seeds, state=resumed_state)
    assert resumed.best() == full.best()
    assert resumed.scores == full.scores
    assert [r["best"] for r in resumed.log] == [r["best"] for r in full.log]
    with pytest.raises(ValueError, match="belongs to another search"):
        load_checkpoint(path, {"what": "other"})
    assert load_checkpoint(tmp_path / "none.json", fingerprint) is None


def _log_and_files(folder):
    """What a search leaves in its folder, wall time left out: the generation log, rows in order, and the files."""
    rows = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]  # strict
    files = {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    for obj in [*rows, *(row for f in files.values() for row in f.get("state", {}).get("log", []))]:
        obj.pop("seconds")
    return rows, files, sorted(p.name for p in folder.iterdir())


def test_a_resumed_search_logs_every_generation_once(one_thread, tmp_path, monkeypatch, search_killer):
    """A search killed in its long phase and run again (the CLI's out folder) logs every generation of both phases
    once, as an uninterrupted run does; before the fix the rerun's generations.jsonl lost those before the kill.
    A log one row behind its checkpoint (killed between the two writes) is completed, and a temporary file of a
    write the kill cut short is removed."""
    from lengthwise.data.corpus import Document
    from lengthwise.search import longrope
    from lengthwise.testing import tiny_model, tiny_tokenizer

    rng = random.Random(0)
    words = "the grass is green sky blue sun yellow pass key remember here we go there and back again".split()
    docs = [Document("doc", " ".join(rng.choice(words) for _ in range(300)))]
    model, tok = tiny_model("llama", length=32), tiny_tokenizer()
    budget = EvolutionConfig(population=5, parents=3, mutations=2, crossovers=1, iterations=4)
    kw = dict(scale=2.0, evolution=budget, max_docs=1, n_hat_choices=(0, 4), short_length=32,
              short_evolution=EvolutionConfig(population=4, parents=2, mutations=1, crossovers=1, iterations=2))

    def search(where, **extra):  # into WHERE/out, relative: factors.json names its own path, the same in both
        (tmp_path / where).mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path / where)
        longrope(model, tok, docs, out_dir=Path("out"), **kw, **extra)
        return tmp_path / where / "out"

    expected = _log_and_files(search("whole"))
    assert [(r["phase"], r["generation"]) for r in expected[0]] == [("long", g) for g in range(4)] + [
        ("short", 0), ("short", 1)]

    with pytest.raises(search_killer.Killed):
        search("killed", on_generation=search_killer.at(1))
    killed = search("killed")
    assert _log_and_files(killed) == expected
    log = killed / "generations.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:-1]))  # the last row never written
    (killed / ".checkpoint-short.json.k1ll3d.tmp").write_text('{"version": 1, "fing')
    calls = []
    search("killed", on_evaluation=lambda: calls.append(1))
    assert calls == [] and _log_and_files(killed) == expected


def test_progressive_rescale():
    prev = Candidate((100, 150, 200, 200, 300, 400, 400, 400), 4)
    bigger = SearchSpace(N, 8.0, n_hat_choices=(0, 4))
    c = rescale_candidate(prev, 4.0, bigger)
    assert c.factors == (200, 300, 400, 400, 600, 800, 800, 800) and c.n_hat == 4
    assert bigger.is_valid(c)


@pytest.mark.parametrize("field,value", [("population", 0), ("parents", -1), ("mutations", -1), ("iterations", 0),
                                         ("mutation_prob", 0.0), ("mutation_prob", 1.5), ("mutation_step", 0.001)])
def test_bad_budget_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        EvolutionConfig(**{field: value})
