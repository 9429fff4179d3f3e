"""LongRoPE after fine-tuning: the progressive second search and the short-context readjustment.

- `extend(model, tokenizer, documents, previous, scale=...)`: LongRoPE's progressive extension (paper: 256k
  fine-tuned, then searched again for 2048k). A search on the (fine-tuned) model for a longer target, seeded from
  the first stage's factors: generation 0 is the given factors, the given factors stretched by s1/s0, and NTK and
  YaRN extensions by s1/s0 applied on top of them (`progressive_seeds`), then PI / NTK / YaRN at the new scale
  s1 (`standard_seeds=False` leaves those three out), plus mutants. The standard seeds are kept by default: on
  the fine-tuned reference model at 32x, YaRN's factors at s1 scored better than every seed derived from the first
  stage (docs/longrope-pipeline.md). The attention factor defaults to the first stage's (the fine-tuned model
  learned with it).
- `readjust(model, tokenizer, documents, factors, short_length=L)`: LongRoPE's short-context recovery. The long
  factors fixed, a search at the training length L (or shorter) for short factors, which the `longrope` method
  uses while a sequence fits L (`rope.methods.longrope.longrope_plan`); past L the long factors apply, so long inputs are
  unchanged. `short_attention`: the cos/sin factor in the short regime (`longrope` option
  `short_attention_factor`, Phi-3.5's `short_mscale`); None keeps one factor in both regimes, as transformers'
  `rope_type: "longrope"` does (then the result is also exported as rope_parameters).

Outputs (in `out_dir`, atomic, resumable from the per-generation checkpoint): `factors.json` (long and short factors
and the `longrope:` spec), `generations.jsonl`, `checkpoint-short.json` (readjust) or the search's outputs (extend).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lengthwise import locks
from lengthwise.errors import UserError
from lengthwise.io import atomic_write_json, remove_temp_files
from lengthwise.models.families import model_info, require_encoding
from lengthwise.models.rotary import rotary_layout
from lengthwise.rope.factors import check_factors, save_factors
from lengthwise.rope.scaling import longrope_attention_factor
from lengthwise.search.evolution import EvolutionConfig
from lengthwise.search.fitness import PerplexityFitness
from lengthwise.search.longrope import _digest, _run_phase, _tokenize, longrope, rope_parameters
from lengthwise.search.space import GRID, SearchSpace, ntk_factors, seed_candidates, yarn_factors


def read_previous(previous: Any) -> dict:
    """A factors.json written by the search, the readjustment or `finetune` (path or dict), checked."""
    if isinstance(previous, (str, Path)):
        path = Path(previous)
        if not path.is_file():
            raise UserError(f"factors file {path} does not exist (a factors.json written by `lengthwise search`, "
                            "`lengthwise longrope readjust` or `lengthwise longrope finetune`)")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"factors file {path} is not JSON ({type(err).__name__})") from None
    else:
        obj = previous
    if not isinstance(obj, dict) or "long_factors" not in obj:
        raise UserError("the previous stage needs a factors.json object with 'long_factors' (and 'factor', the "
                        "scale it was found for)")

    try:
        long = check_factors(obj["long_factors"], "long_factors")
    except ValueError as err:
        raise UserError(str(err)) from None
    factor = obj.get("factor")
    if factor is None:
        factor = max(long)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise UserError(f"the previous stage's factor (its scale s) must be a number >= 1, got {factor!r}")
    return {**obj, "long_factors": list(long), "factor": float(factor)}


def progressive_seeds(long_factors: Sequence[float], old_scale: float, new_scale: float, pretrain_length: int,
                      base: float, n_hat: int = 0) -> list[tuple[str, list[float], int]]:
    """Start points of the second search, all derived from the first stage's factors λ (found for s0 = old_scale):
    λ itself, λ·r (r = s1/s0: PI on top), λ_i·ntk_i(r) and λ_i·yarn_i(r) (NTK / YaRN by r on top; the YaRN ramp
    counted over the fine-tuned length L·s0)."""
    if new_scale < old_scale:
        raise UserError(f"the progressive stage extends: its scale {new_scale:g} must be >= the previous stage's "
                        f"{old_scale:g}")
    r = new_scale / old_scale
    n = len(long_factors)
    lam = [float(x) for x in long_factors]
    ntk = ntk_factors(n, r, base, pretrain_length)
    yarn = yarn_factors(n, r, round(pretrain_length * old_scale), base)
    return [
        ("previous", lam, n_hat),
        ("previous-stretched", [x * r for x in lam], n_hat),
        ("previous+ntk", [x * y for x, y in zip(lam, ntk)], n_hat),
        ("previous+yarn", [x * y for x, y in zip(lam, yarn)], n_hat),
    ]


def extend(
    model,
    tokenizer,
    documents: Sequence,
    previous: Any,
    *,
    target_length: int | None = None,
    scale: float | None = None,
    evolution: EvolutionConfig | None = None,
    attention: float | None = None,
    standard_seeds: bool = True,
    **kwargs: Any,
):
    """The progressive second search (see the module docstring); returns the search's `LongRopeResult`.

    `previous`: the first stage's factors.json (path or dict: `long_factors`, `factor`, `n_hat`,
    `attention_factor`). `attention`: default the previous stage's attention factor (else LongRoPE's default).
    `standard_seeds`: also seed with PI / NTK / YaRN at the new scale (default); False: the first stage's
    factors and their extensions only.
    Other keyword arguments go to `lengthwise.search.longrope` (max_docs, out_dir, threads, short_length, ...).
    """

    prev = read_previous(previous)
    pretrain = model_info(model).pretrain_length
    layout = rotary_layout(model)
    if len(prev["long_factors"]) != layout.rotary_dim // 2:
        raise UserError(f"the previous stage has {len(prev['long_factors'])} factors; this model needs "
                        f"{layout.rotary_dim // 2} (rotary_dim/2)")
    s1 = scale if scale is not None else (target_length / pretrain if target_length else None)
    if s1 is None:
        raise UserError("give exactly one of target_length or scale for the progressive stage")
    seeds = progressive_seeds(prev["long_factors"], prev["factor"], float(s1), pretrain, layout.base,
                              int(prev.get("n_hat", 0) or 0))
    if attention is None:
        attention = prev.get("attention_factor")
    try:
        return longrope(model, tokenizer, documents, target_length=target_length, scale=scale, evolution=evolution,
                        attention=attention, extra_seeds=seeds, standard_seeds=standard_seeds, **kwargs)
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise UserError(str(err)) from None


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ShortFitness(PerplexityFitness):
    """The short-regime fitness with the short regime's own cos/sin factor (`longrope` short_attention_factor)."""

    short_attention_factor: float | None = None

    def options(self, candidate) -> dict:
        opts = super().options(candidate)
        if self.short_attention_factor is not None:
            opts["short_attention_factor"] = float(self.short_attention_factor)
        return opts


@dataclass
class ReadjustResult:
    long_factors: list[float]
    short_factors: list[float]
    n_hat: int
    scale: float
    pretrain_length: int
    attention_factor: float
    short_attention_factor: float | None
    short_length: int
    ppl: float  # fitness of the best short factors (search documents at short_length)
    seed_ppl: dict[str, float]
    evaluations: int
    seconds: float
    log: list[dict]
    files: dict[str, str] = field(default_factory=dict)

    def method_options(self) -> dict:
        opts = {"long_factors": tuple(self.long_factors), "short_factors": tuple(self.short_factors),
                "n_hat": self.n_hat, "factor": self.scale, "attention_factor": self.attention_factor,
                "original_max_position_embeddings": self.pretrain_length}
        if self.short_attention_factor is not None:
            opts["short_attention_factor"] = self.short_attention_factor
        return opts

    def method_spec(self, factors_file: str | None = None) -> str:
        def values(v):
            return factors_file or "[" + ",".join(f"{x:g}" for x in v) + "]"

        spec = (f"longrope:long_factors={values(self.long_factors)},short_factors={values(self.short_factors)},"
                f"n_hat={self.n_hat},factor={self.scale:g},attention_factor={self.attention_factor:.6g},"
                f"original_max_position_embeddings={self.pretrain_length}")
        if self.short_attention_factor is not None:
            spec += f",short_attention_factor={self.short_attention_factor:g}"
        return spec


def readjust(
    model,
    tokenizer,
    documents: Sequence,
    factors: Any,
    *,
    short_length: int | None = None,
    evolution: EvolutionConfig | None = None,
    max_docs: int = 1,
    short_max_factor: float | None = None,
    short_attention: float | None = None,
    out_dir: str | Path | None = None,
    threads: int | None = None,
    model_name: str | None = None,
    on_generation: Callable[[str, dict], None] | None = None,
    on_evaluation: Callable[[], None] | None = None,
    wait: bool = True,
) -> ReadjustResult:
    """Search short factors for `model` (fine-tuned or not) under the long factors of `factors` (a factors.json or
    dict); see the module docstring. `short_length`: default the training length L (at most L). Seeds: all ones
    (the original frequencies), the long factors clipped into [1, ceiling], PI / NTK / YaRN at max(1, length/L).
    `short_max_factor`: ceiling (default 1.25 · max(1, short_length/L)). Serial only."""

    require_encoding(model, "longrope-readjust", ("rope",))
    prev = read_previous(factors)
    pretrain = model_info(model).pretrain_length
    saved_length = prev.get("original_max_position_embeddings")
    if saved_length not in (None, pretrain):
        raise UserError(f"the factors were found for a training length of {saved_length}; this model's is {pretrain}")
    layout = rotary_layout(model)
    num = layout.rotary_dim // 2
    long = prev["long_factors"]
    if len(long) != num:
        raise UserError(f"the factors file has {len(long)} long factors; this model needs {num} (rotary_dim/2)")
    short_length = pretrain if short_length is None else short_length
    if isinstance(short_length, bool) or not isinstance(short_length, int) or not 2 <= short_length <= pretrain:
        raise UserError(f"short_length must be an integer between 2 and the training length {pretrain} (the short "
                        f"factors apply to inputs that fit it), got {short_length!r}")
    if short_attention is not None and not (isinstance(short_attention, (int, float)) and short_attention > 0):
        raise UserError(f"short_attention must be a positive number, got {short_attention!r}")
    evolution = evolution or EvolutionConfig(population=6, parents=3, mutations=2, crossovers=2, iterations=2)
    scale = prev["factor"]
    attn = prev.get("attention_factor")
    attn = longrope_attention_factor(scale, pretrain) if attn is None else float(attn)
    n_hat = int(prev.get("n_hat", 0) or 0)
    short_s = max(1.0, short_length / pretrain)
    ceiling = short_max_factor if short_max_factor is not None else 1.25 * short_s
    if not ceiling >= 1:
        raise UserError(f"short_max_factor must be >= 1, got {ceiling!r}")
    space = SearchSpace(num, short_s, high=max(GRID, round(ceiling * GRID)), n_hat_choices=(n_hat,))
    seeds = [("original", space.snap([1.0] * num, n_hat)), ("long-clipped", space.snap(long, n_hat))]
    seeds += list(zip(("pi", "ntk", "yarn"), seed_candidates(space, pretrain, layout.base)))
    seeds = list({c: (name, c) for name, c in reversed(seeds)}.values())[::-1]  # first name of each candidate
    names, docs = _tokenize(documents, tokenizer, short_length, max_docs, "short")
    fitness = ShortFitness(model, docs, pretrain, scale, attn, "short", long_factors=tuple(long), n_hat=n_hat,
                           threads=threads, short_attention_factor=short_attention)
    out = Path(out_dir) if out_dir else None
    token = locks.acquire(out, wait=wait) if out is not None else None
    try:
        if out is not None:
            remove_temp_files(out)
        fp = {"model": model_name or model.config.model_type,
              "model_config": _digest({k: v for k, v in model.config.to_dict().items()
                                       if k not in ("architectures", "_name_or_path", "transformers_version")}),
              "pretrain_length": pretrain, "attention_factor": attn, "short_attention_factor": short_attention,
              "threads": threads, "phase": "short", "length": short_length, "documents": names,
              "tokens": _digest(docs), "space": asdict(space), "evolution": asdict(evolution),
              "long": {"factors": list(long), "n_hat": n_hat}, "seeds": [c.to_json() for _, c in seeds]}
        started = time.perf_counter()
        phase = _run_phase("short", fitness, space, evolution, seeds, fp, out, None, 1, model, on_generation,
                           on_evaluation, [])
        result = ReadjustResult(list(long), phase.best.lambdas, n_hat, scale, pretrain, attn, short_attention,
                                short_length, phase.ppl, phase.seed_ppl, phase.evaluations,
                                round(time.perf_counter() - started, 2), phase.log)
        if out is not None:
            result.files = _write_readjust(result, prev, out, rope_parameters, layout.base)
        return result
    finally:
        if out is not None:
            locks.release(out, token)


def _write_readjust(result: ReadjustResult, prev: dict, out: Path, rope_parameters, base: float) -> dict[str, str]:
    kept = {k: v for k, v in prev.items() if k not in ("long_factors", "short_factors", "rope_parameters",
                                                       "method_spec", "note", "short_ppl", "short_seed_ppl",
                                                       "short_length")}
    meta = {**kept, "n_hat": result.n_hat, "factor": result.scale, "attention_factor": result.attention_factor,
            "original_max_position_embeddings": result.pretrain_length,
            "short_attention_factor": result.short_attention_factor, "short_length": result.short_length,
            "short_ppl": result.ppl, "short_seed_ppl": result.seed_ppl, "short_evaluations": result.evaluations,
            "method_spec": result.method_spec(str(out / "factors.json")),
            "note": "short factors readjusted at the training length (lengthwise longrope readjust); apply with "
                    "longrope:long_factors=<this file>,short_factors=<this file>"
                    + (",short_attention_factor=..." if result.short_attention_factor is not None else "")}
    files = {"factors": str(save_factors(out / "factors.json", result.long_factors, result.short_factors, **meta))}
    if result.short_attention_factor is None or result.short_attention_factor == result.attention_factor:
        params = out / "rope_parameters.json"
        atomic_write_json(params, rope_parameters(result.long_factors, result.short_factors, result.scale,
                                                  result.pretrain_length, base, result.attention_factor))
        files["rope_parameters"] = str(params)
    files["log"] = str(out / "generations.jsonl")
    return files
