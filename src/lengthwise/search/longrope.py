"""`lengthwise.search.longrope(...)`: the LongRoPE search end to end.

1. long factors: evolutionary search of λ_i (one per rotary pair) and n_hat at the target length L·s;
2. short factors (optional): a second search at a short length (<= L) with a smaller ceiling, the long factors
   fixed, so inputs that fit the training length keep their quality through the `longrope` length switch;
3. outputs in `out_dir`: `factors.json` (readable by the `longrope` method: `longrope:long_factors=FILE`),
   `rope_parameters.json` (transformers-native), `generations.jsonl` (one row per generation and phase) and a
   checkpoint per phase, rewritten after every generation, from which a killed search resumes. Every file is
   written atomically; generations.jsonl is rewritten whole from the checkpoints' logs, so after a resume it holds
   every generation once, as an uninterrupted run's does (tests/test_kill_resume.py, tests/test_search.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lengthwise import locks
from lengthwise.data.corpus import documents_of_length
from lengthwise.errors import UserError
from lengthwise.io import atomic_write_json, atomic_write_text, remove_temp_files
from lengthwise.models.families import model_info, require_encoding
from lengthwise.models.rotary import rotary_layout
from lengthwise.rope.factors import save_factors
from lengthwise.rope.scaling import longrope_attention_factor as attention_factor
from lengthwise.search.backends import RayBackend, SerialBackend, ray_available
from lengthwise.search.checkpoint import load_checkpoint, save_checkpoint
from lengthwise.search.evolution import EvolutionConfig, SearchState, evolve
from lengthwise.search.fitness import FitnessFactory, PerplexityFitness
from lengthwise.search.space import Candidate, GRID, PAPER_N_HAT, SearchSpace, rescale_candidate, seed_candidates


@dataclass
class PhaseResult:
    phase: str  # "long" | "short"
    length: int  # tokens per fitness document
    best: Candidate
    ppl: float
    seed_ppl: dict[str, float]  # fitness of the PI / NTK / YaRN seeds (the baselines the search starts from)
    evaluations: int
    seconds: float
    log: list[dict]


@dataclass
class LongRopeResult:
    scale: float
    target_length: int
    pretrain_length: int
    rope_theta: float
    attention_factor: float
    long: PhaseResult
    short: PhaseResult | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def long_factors(self) -> list[float]:
        return self.long.best.lambdas

    @property
    def short_factors(self) -> list[float] | None:
        return self.short.best.lambdas if self.short else None

    @property
    def n_hat(self) -> int:
        return self.long.best.n_hat

    def method_options(self) -> dict:
        """Options for `lengthwise.patch(model, "longrope", **options)`."""
        opts = {
            "long_factors": tuple(self.long_factors),
            "n_hat": self.n_hat,
            "factor": self.scale,
            "attention_factor": self.attention_factor,
            "original_max_position_embeddings": self.pretrain_length,
        }
        if self.short is not None:
            opts["short_factors"] = tuple(self.short_factors)
        return opts

    def method_spec(self, factors_file: str | None = None) -> str:
        """A `longrope:...` spec for the CLI (`-m`), reading the factors from `factors_file` (or inline)."""
        long = factors_file or "[" + ",".join(f"{x:g}" for x in self.long_factors) + "]"
        spec = f"longrope:long_factors={long}"
        if self.short is not None:
            short = factors_file or "[" + ",".join(f"{x:g}" for x in self.short_factors) + "]"
            spec += f",short_factors={short}"
        return (spec + f",n_hat={self.n_hat},factor={self.scale:g},attention_factor={self.attention_factor:.6g}"
                f",original_max_position_embeddings={self.pretrain_length}")

    def rope_parameters(self) -> dict:
        """transformers' `config.rope_parameters` for rope_type "longrope" (n_hat has no transformers equivalent)."""
        return rope_parameters(self.long_factors, self.short_factors, self.scale, self.pretrain_length,
                               self.rope_theta, self.attention_factor)


def rope_parameters(long_factors, short_factors, scale, pretrain_length, rope_theta, attention) -> dict:
    """Without short factors transformers still needs some: ones keep the original model inside L (its switch)."""
    return {
        "rope_type": "longrope",
        "rope_theta": float(rope_theta),
        "long_factor": [float(x) for x in long_factors],
        "short_factor": [float(x) for x in (short_factors or [1.0] * len(long_factors))],
        "factor": float(scale),
        "original_max_position_embeddings": int(pretrain_length),
        "attention_factor": float(attention),
    }


def _check_inputs(model, target_length: int | None, scale: float | None) -> tuple[int, int, float]:
    require_encoding(model, "longrope-search", ("rope",))
    pretrain = model_info(model).pretrain_length
    if (target_length is None) == (scale is None):
        raise UserError("give exactly one of target_length (tokens) or scale (s = target_length / training length)")
    if scale is not None:
        if not isinstance(scale, (int, float)) or scale < 1:
            raise UserError(f"scale s must be >= 1 (the search extends the {pretrain}-token training length), got {scale!r}")
        target_length = round(pretrain * scale)
    if not isinstance(target_length, int) or target_length < pretrain:
        raise UserError(
            f"target_length must be an integer >= the training length {pretrain} (s >= 1), got {target_length!r}"
        )
    return pretrain, target_length, target_length / pretrain


def _tokenize(documents, tokenizer, length: int, max_docs: int, what: str) -> tuple[list[str], list[list[int]]]:
    tok = documents_of_length(documents, tokenizer, length, max_docs)
    if not tok.docs:
        raise UserError(
            f"no document has {length} tokens for the {what} search ({tok.skipped} shorter ones skipped); "
            "give longer documents or a smaller target length"
        )
    return [name for name, _ in tok.docs], [ids for _, ids in tok.docs]


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _run_phase(
    phase: str,
    fitness: PerplexityFitness,
    space: SearchSpace,
    config: EvolutionConfig,
    seeds: list[tuple[str, Candidate]],
    fingerprint: dict,
    out_dir: Path | None,
    ray_address: str | None,
    workers: int,
    factory_model: Any,
    on_generation: Callable[[str, dict], None] | None,
    on_evaluation: Callable[[], None] | None,
    log_rows: list[dict],
) -> PhaseResult:
    checkpoint = out_dir / f"checkpoint-{phase}.json" if out_dir else None
    state = load_checkpoint(checkpoint, fingerprint) if checkpoint else None
    if ray_address:
        kwargs = {k: v for k, v in asdict(fitness).items() if k not in ("model", "evaluations")}
        kwargs["threads"] = fitness.threads or 1
        backend: Any = RayBackend(FitnessFactory(factory_model, kwargs), workers=workers, address=ray_address,
                                  on_result=on_evaluation)
    else:
        backend = SerialBackend(fitness, on_result=on_evaluation)
    if state is not None:  # resumed: the generations before the kill come from the checkpoint, not from this run
        log_rows.extend({"phase": phase, "backend": backend.name, **row} for row in state.log)
    start = time.perf_counter()

    def after(s: SearchState) -> None:
        s.log[-1]["backend"] = backend.name  # in the checkpoint too, so a resumed log names each row's own backend
        row = {"phase": phase, **s.log[-1]}
        log_rows.append(row)
        if checkpoint:
            save_checkpoint(checkpoint, s, fingerprint)
            _write_log(out_dir, log_rows)
        if on_generation:
            on_generation(phase, row)

    try:
        state = evolve(backend, space, config, [c for _, c in seeds], state=state, on_generation=after)
    finally:
        backend.close()
    if checkpoint:  # a kill between the last checkpoint and its log line: the rerun evaluates nothing, writes it here
        _write_log(out_dir, log_rows)
    best, value = state.best()
    return PhaseResult(
        phase=phase,
        length=len(fitness.documents[0]),
        best=best,
        ppl=value,
        seed_ppl={name: state.scores[c] for name, c in seeds if c in state.scores},
        evaluations=len(state.scores),
        seconds=round(time.perf_counter() - start, 2),
        log=state.log,
    )


def _write_log(out_dir: Path, rows: list[dict]) -> None:
    # rewritten whole (atomically) from the checkpointed log, so a resumed run never duplicates a generation
    atomic_write_text(out_dir / "generations.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def load_previous(path_or_obj: Any) -> tuple[Candidate, float]:
    """A previous search's factors.json (or dict) -> (long candidate, its scale), for progressive extension."""
    obj = json.loads(Path(path_or_obj).read_text()) if isinstance(path_or_obj, (str, Path)) else path_or_obj
    if "long_factors" not in obj or "factor" not in obj:
        raise UserError("a previous result needs 'long_factors' and 'factor' (a factors.json written by the search)")
    return Candidate(tuple(round(float(x) * GRID) for x in obj["long_factors"]), int(obj.get("n_hat", 0))), float(obj["factor"])


def longrope(
    model,
    tokenizer,
    documents: Sequence,
    *,
    target_length: int | None = None,
    scale: float | None = None,
    evolution: EvolutionConfig | None = None,
    max_docs: int = 4,
    n_hat_choices: Sequence[int] = PAPER_N_HAT,
    max_factor: float | None = None,
    attention: float | None = None,
    short_length: int | None = None,
    short_max_factor: float | None = None,
    short_evolution: EvolutionConfig | None = None,
    previous: Any = None,
    extra_seeds: Sequence[tuple[str, Sequence[float], int]] = (),
    standard_seeds: bool = True,
    out_dir: str | Path | None = None,
    ray_address: str | None = None,
    workers: int = 2,
    threads: int | None = None,
    model_name: str | None = None,
    on_generation: Callable[[str, dict], None] | None = None,
    on_evaluation: Callable[[], None] | None = None,
    wait: bool = True,
) -> LongRopeResult:
    """Search LongRoPE factors for `model` at `target_length` tokens (or `scale` x its training length).

    documents: `Document`s (the fitness set; keep them apart from the documents you report on). `max_docs` of
    them with at least `target_length` tokens are used. `evolution`: budget (paper defaults: population 64,
    parents 32, 16 mutations, 16 crossovers, 40 iterations). `attention`: cos/sin factor (default √(1+ln s/ln L)).
    `short_length`: also search short factors at that length (<= training length), ceiling `short_max_factor`
    (default 1.25 x short_length/L, at least 1). `previous`: a factors.json (or dict) of an earlier search at a
    smaller scale: its factors, rescaled to this scale, join the seeds (progressive extension).
    `extra_seeds`: (name, λ list, n_hat) start points, snapped onto this search's grid, placed first;
    `standard_seeds` False leaves out the PI / NTK / YaRN seeds, so generation 0 is the extra seeds (and
    `previous`) and mutants of them only (`lengthwise.search.progressive.extend`).
    `ray_address`: run the fitness evaluations on Ray ("local" starts one here), `workers` actors, each with its
    own model copy; `model_name` (a name/path `load_model` can read) lets workers load the model themselves
    instead of receiving a pickled copy. `threads`: torch threads per evaluation (equal threads => results
    identical between serial and Ray). `out_dir` is locked for the search (`lengthwise.locks`: `<out_dir>.lock`
    beside it): a second search on it waits and then resumes from what the first one checkpointed (`wait` False:
    raises `lengthwise.locks.OutputLocked` naming the other run instead).
    """
    evolution = evolution or EvolutionConfig()
    pretrain, target_length, s = _check_inputs(model, target_length, scale)
    layout = rotary_layout(model)
    num_factors = layout.rotary_dim // 2
    if ray_address and not ray_available():
        raise ImportError("--ray-address needs Ray: pip install 'lengthwise[ray]'; without it the serial search works")
    if short_length is not None and not (2 <= short_length <= pretrain):
        raise UserError(
            f"short_length must be between 2 and the training length {pretrain} (the short factors apply to inputs "
            f"that fit it), got {short_length}"
        )
    # Validate everything cheap before tokenizing or running anything.
    choices = tuple(sorted({n for n in n_hat_choices if 0 <= n < target_length}))
    if not choices:
        raise UserError(f"no n_hat choice below the target length {target_length}: {list(n_hat_choices)}")
    high = None if max_factor is None else round(max_factor * GRID)
    space = SearchSpace(num_factors, s, high=high, n_hat_choices=choices)
    seeds = list(zip(("pi", "ntk", "yarn"), seed_candidates(space, pretrain, layout.base))) if standard_seeds else []
    for name, lambdas, seed_n_hat in reversed(list(extra_seeds)):
        seeds.insert(0, (name, space.snap(list(lambdas), seed_n_hat)))
    if previous is not None:
        prev, prev_scale = load_previous(previous)
        if len(prev.factors) != num_factors:
            raise UserError(f"previous result has {len(prev.factors)} factors; this model needs {num_factors}")
        seeds.insert(0, ("previous", rescale_candidate(prev, prev_scale, space)))
    if not seeds:
        raise UserError("no seed to start from: give extra_seeds or previous, or keep the standard seeds")
    attn = attention_factor(s, pretrain) if attention is None else float(attention)

    names, docs = _tokenize(documents, tokenizer, target_length, max_docs, "long")
    out = Path(out_dir) if out_dir else None
    if out is not None:  # before the checkpoint is read: a second search waits for the first, then resumes it
        token = locks.acquire(out, wait=wait)
    try:
        if out is not None:
            remove_temp_files(out)  # a killed run's unrenamed checkpoint or log: the checkpoint before it counts
        factory_model = model_name if model_name else model
        base_fp = {"model": model_name or model.config.model_type, "model_config": _digest(model.config.to_dict()),
                   "pretrain_length": pretrain, "attention_factor": attn, "threads": threads}
        log_rows: list[dict] = []
        fitness = PerplexityFitness(model, docs, pretrain, s, attn, "long", threads=threads)
        fp = {**base_fp, "phase": "long", "length": target_length, "documents": names, "tokens": _digest(docs),
              "space": asdict(space), "evolution": asdict(evolution), "seeds": [c.to_json() for _, c in seeds]}
        long = _run_phase("long", fitness, space, evolution, seeds, fp, out, ray_address, workers, factory_model,
                          on_generation, on_evaluation, log_rows)

        short = None
        if short_length is not None:
            short_s = max(1.0, short_length / pretrain)
            ceiling = short_max_factor if short_max_factor is not None else 1.25 * short_s
            short_space = SearchSpace(num_factors, short_s, high=max(GRID, round(ceiling * GRID)),
                                      n_hat_choices=(long.best.n_hat,))
            short_seeds = list(zip(("pi", "ntk", "yarn"), seed_candidates(short_space, pretrain, layout.base)))
            short_seeds.append(("long-clipped", short_space.snap(long.best.lambdas, long.best.n_hat)))
            short_seeds = list({c: (n, c) for n, c in reversed(short_seeds)}.values())[::-1]  # drop duplicates
            short_names, short_docs = _tokenize(documents, tokenizer, short_length, max_docs, "short")
            short_fitness = PerplexityFitness(model, short_docs, pretrain, s, attn, "short",
                                              long_factors=tuple(long.best.lambdas), n_hat=long.best.n_hat,
                                              threads=threads)
            short_cfg = short_evolution or evolution
            sfp = {**base_fp, "phase": "short", "length": short_length, "documents": short_names,
                   "tokens": _digest(short_docs), "space": asdict(short_space), "evolution": asdict(short_cfg),
                   "long": long.best.to_json()}
            short = _run_phase("short", short_fitness, short_space, short_cfg, short_seeds, sfp, out, ray_address,
                               workers, factory_model, on_generation, on_evaluation, log_rows)

        result = LongRopeResult(s, target_length, pretrain, layout.base, attn, long, short)
        if out is not None:
            result.files = write_outputs(result, out)
        return result
    finally:
        if out is not None:
            locks.release(out, token)


def write_outputs(result: LongRopeResult, out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "n_hat": result.n_hat,
        "factor": result.scale,
        "target_length": result.target_length,
        "original_max_position_embeddings": result.pretrain_length,
        "attention_factor": result.attention_factor,
        "rope_theta": result.rope_theta,
        "long_ppl": result.long.ppl,
        "long_seed_ppl": result.long.seed_ppl,
        "short_ppl": result.short.ppl if result.short else None,
        "short_length": result.short.length if result.short else None,
        "short_seed_ppl": result.short.seed_ppl if result.short else None,
        "evaluations": result.long.evaluations + (result.short.evaluations if result.short else 0),
        "rope_parameters": result.rope_parameters(),
        "method_spec": result.method_spec(str(out / "factors.json")),
        "note": "apply with lengthwise: longrope:long_factors=<this file>; rope_parameters is transformers-native "
                "(config.rope_parameters) but cannot express n_hat",
    }
    factors = save_factors(out / "factors.json", result.long_factors, result.short_factors, **summary)
    params = out / "rope_parameters.json"
    atomic_write_json(params, result.rope_parameters())
    return {"factors": str(factors), "rope_parameters": str(params), "log": str(out / "generations.jsonl")}


def with_budget(config: EvolutionConfig, **changes: Any) -> EvolutionConfig:
    return replace(config, **changes)
