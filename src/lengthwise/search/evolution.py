"""The evolutionary engine (LongRoPE Algorithm 1) as pure functions over candidates.

Generation 0 is the seeds (PI, NTK, YaRN, and any extra start points) plus mutants of them. Every later generation
is the top-`parents` of the previous one, plus `mutations` mutants and `crossovers` children of random parents.
Mutation perturbs each factor with probability p by a random grid step and re-sorts the factors (sorting repairs
the monotone constraint, so a constant PI seed can still spread into NTK-like shapes); crossover takes each factor
from one of two parents and is rejected when the child is not non-decreasing. Duplicates of anything already
evaluated or already in the generation are rejected.

Randomness: one `random.Random` per generation, seeded from (seed, generation). A run resumed from the checkpoint
of generation g therefore draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from lengthwise.search.space import Candidate, SearchSpace
from lengthwise.errors import UserError

Evaluate = Callable[[list[Candidate]], list[float]]  # fitness of each candidate (lower is better), same order


@dataclass(frozen=True)
class EvolutionConfig:
    """Search budget. Defaults are the paper's (population 64, 40 iterations, top-32 parents, 16 + 16 children)."""

    population: int = 64  # size of generation 0
    parents: int = 32  # survivors kept from each generation
    mutations: int = 16  # mutants per generation
    crossovers: int = 16  # crossover children per generation
    iterations: int = 40  # generations evaluated, generation 0 included
    mutation_prob: float = 0.3  # chance that a factor (and n_hat) is perturbed
    mutation_step: float | None = None  # largest perturbation in λ units; default 15% of the factor range
    seed: int = 0
    max_tries: int = 200  # attempts per child before the generation goes out smaller

    def __post_init__(self) -> None:
        for name in ("population", "parents", "iterations", "max_tries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("mutations", "crossovers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise UserError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not 0.0 < self.mutation_prob <= 1.0:
            raise UserError(f"mutation_prob must be in (0, 1], got {self.mutation_prob}")
        if self.mutation_step is not None and not self.mutation_step >= 0.01:
            raise UserError(f"mutation_step must be >= 0.01 (one grid step), got {self.mutation_step}")


def generation_rng(seed: int, generation: int) -> random.Random:
    return random.Random(f"lengthwise-longrope:{seed}:{generation}")


def _step(space: SearchSpace, config: EvolutionConfig) -> int:
    if config.mutation_step is not None:
        return max(1, round(config.mutation_step * 100))
    return max(1, round(0.15 * (space.high - space.low)))


def mutate(parent: Candidate, space: SearchSpace, config: EvolutionConfig, rng: random.Random) -> Candidate:
    """Perturb each factor with probability p by a uniform step in [-w, w], clip, sort; n_hat redrawn with prob p."""
    w = _step(space, config)
    factors = list(parent.factors)
    for i in range(len(factors)):
        if rng.random() < config.mutation_prob:
            factors[i] = min(space.high, max(space.low, factors[i] + rng.randint(-w, w)))
    n_hat = parent.n_hat
    if rng.random() < config.mutation_prob:
        n_hat = rng.choice(space.n_hat_choices)
    return Candidate(tuple(sorted(factors)), n_hat)


def crossover(a: Candidate, b: Candidate, rng: random.Random) -> Candidate:
    """Each factor (and n_hat) from `a` or `b` with probability 1/2; may be non-monotone (the caller rejects it)."""
    factors = tuple(x if rng.random() < 0.5 else y for x, y in zip(a.factors, b.factors))
    return Candidate(factors, a.n_hat if rng.random() < 0.5 else b.n_hat)


def _children(
    make: Callable[[], Candidate], count: int, space: SearchSpace, taken: set[Candidate], config: EvolutionConfig
) -> list[Candidate]:
    out: list[Candidate] = []
    for _ in range(count):
        for _ in range(config.max_tries):
            child = make()
            if space.is_valid(child) and child not in taken:
                taken.add(child)
                out.append(child)
                break
    return out


def initial_population(
    seeds: Sequence[Candidate], space: SearchSpace, config: EvolutionConfig
) -> list[Candidate]:
    """The valid, distinct seeds, then mutants of them (round robin) until `population` candidates."""
    rng = generation_rng(config.seed, 0)
    population = list(dict.fromkeys(c for c in seeds if space.is_valid(c)))
    if not population:
        raise UserError("no valid seed candidate: every seed is outside the search space")
    population = population[: config.population]
    taken = set(population)
    cursor = 0

    def make() -> Candidate:
        nonlocal cursor
        parent = population[cursor % len(seeds_kept)]
        cursor += 1
        return mutate(parent, space, config, rng)

    seeds_kept = list(population)
    population += _children(make, config.population - len(population), space, taken, config)
    return population


def next_population(
    ranked: Sequence[Candidate], space: SearchSpace, config: EvolutionConfig, generation: int, seen: set[Candidate]
) -> list[Candidate]:
    """Top-`parents` of `ranked` (best first) + mutants + crossovers, none a duplicate of `seen` or of each other."""
    rng = generation_rng(config.seed, generation)
    parents = list(ranked[: config.parents])
    taken = set(seen) | set(parents)
    mutants = _children(lambda: mutate(rng.choice(parents), space, config, rng), config.mutations, space, taken, config)

    def cross() -> Candidate:
        if len(parents) < 2:
            return parents[0]  # no partner: a duplicate, so rejected
        a, b = rng.sample(parents, 2)
        return crossover(a, b, rng)

    crossed = _children(cross, config.crossovers, space, taken, config)
    return parents + mutants + crossed


def _score(value: float) -> float:
    return value if math.isfinite(value) else math.inf


@dataclass
class SearchState:
    """Everything a resumed search needs: the next generation to evaluate and every score so far."""

    generation: int  # the generation `population` belongs to (not yet evaluated)
    population: list[Candidate]
    scores: dict[Candidate, float] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)

    def best(self) -> tuple[Candidate, float]:
        candidate = min(self.scores, key=lambda c: (_score(self.scores[c]), c))
        return candidate, self.scores[candidate]

    def to_json(self) -> dict:
        return {
            "generation": self.generation,
            "population": [c.to_json() for c in self.population],
            "scores": [[c.to_json(), v] for c, v in self.scores.items()],
            "log": self.log,
        }

    @classmethod
    def from_json(cls, obj: dict) -> SearchState:
        return cls(
            generation=int(obj["generation"]),
            population=[Candidate.from_json(c) for c in obj["population"]],
            scores={Candidate.from_json(c): float(v) for c, v in obj["scores"]},
            log=list(obj["log"]),
        )


def evolve(
    evaluate: Evaluate,
    space: SearchSpace,
    config: EvolutionConfig,
    seeds: Sequence[Candidate] = (),
    state: SearchState | None = None,
    on_generation: Callable[[SearchState], None] | None = None,
) -> SearchState:
    """Run (or resume) the search; `on_generation(state)` is called after each generation (checkpoint, progress).

    Each generation evaluates only candidates never scored before; the log row records the generation's best and
    mean fitness, the best so far, the number of new evaluations and the wall time.
    """
    if state is None:
        state = SearchState(0, initial_population(seeds, space, config))
    while state.generation < config.iterations:
        start = time.perf_counter()
        new = [c for c in dict.fromkeys(state.population) if c not in state.scores]
        values = evaluate(new) if new else []
        if len(values) != len(new):
            raise RuntimeError(f"fitness returned {len(values)} values for {len(new)} candidates")
        state.scores.update({c: float(v) for c, v in zip(new, values)})
        ranked = sorted(dict.fromkeys(state.population), key=lambda c: (_score(state.scores[c]), c))
        finite = [state.scores[c] for c in ranked if math.isfinite(state.scores[c])]
        best, best_value = state.best()
        state.log.append({
            "generation": state.generation,
            "size": len(ranked),
            "evaluations": len(new),
            "best": state.scores[ranked[0]],
            "mean": sum(finite) / len(finite) if finite else math.inf,
            "best_so_far": best_value,
            "best_n_hat": best.n_hat,
            "seconds": round(time.perf_counter() - start, 3),
        })
        state.generation += 1
        if state.generation < config.iterations:
            state.population = next_population(ranked, space, config, state.generation, set(state.scores))
        if on_generation is not None:
            on_generation(state)
    return state


def config_dict(config: EvolutionConfig) -> dict:
    return asdict(config)
