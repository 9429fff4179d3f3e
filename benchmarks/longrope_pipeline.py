"""LongRoPE's whole pipeline: search -> fine-tune -> search again (progressive) -> short-context readjustment.

Stages (each resumable: fine-tuning checkpoints, search checkpoints, perplexity records keyed by cell):

  finetune      the bundled `llama-rope-256` (L = 256) fine-tuned at L·s tokens (default s = 8: 2048) with the
                searched factors (`--factors`, the 8x search result), PI (`linear:factor=s`) and YaRN
                (`yarn:factor=s`), one LoRA each under the same budget (steps, tokens, learning rate, seed);
                held-out PG19 dev PPL at L·s (and at L) before and after
  progressive   a second search on the model fine-tuned with the searched factors, at `--progressive-scale`
                (default 32: 8192 tokens), seeded from its factors only; held-out PPL at that length
  readjust-tiny short factors at L = 256 for the model fine-tuned with the searched factors, under its 8x
                factors and under the progressive stage's; held-out PPL at 256 and at the long length
  readjust      SmolLM2-135M (L = 8192) under its 4x factors: short factors searched at L; PPL of a separate
                8k pass (short regime) and of the 32k pass (long regime) with both factor sets
  step-time     SmolLM2-135M: a few LoRA fine-tuning steps at 32k with gradient checkpointing, timed

    .venv/bin/python benchmarks/longrope_pipeline.py --stage finetune --out results/longrope-pipeline
    .venv/bin/python benchmarks/longrope_pipeline.py --stage progressive --out results/longrope-pipeline
    .venv/bin/python benchmarks/longrope_pipeline.py --stage readjust-tiny --out results/longrope-pipeline
    .venv/bin/python benchmarks/longrope_pipeline.py --stage readjust --out results/longrope-pipeline
    .venv/bin/python benchmarks/longrope_pipeline.py --stage step-time --out results/longrope-pipeline
    .venv/bin/python benchmarks/longrope_pipeline.py --stage plot --out results/longrope-pipeline

Writes OUT/summary.json (every number below, by stage), OUT/ppl.jsonl (perplexity records), the fine-tuned folders
OUT/ft-<name>/, the search folders, and OUT/longrope-pipeline.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lengthwise.io import atomic_write_json

TINY = "llama-rope-256"
REAL = "smollm2-135m"


def load_summary(out: Path) -> dict:
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_summary(out: Path, summary: dict) -> None:
    atomic_write_json(out / "summary.json", summary)


def ppl(model, tokenizer, docs, lengths, methods, results, model_name, data_name, max_docs):
    from lengthwise.eval.perplexity import perplexity  # noqa: PLC0415

    records = perplexity(model, tokenizer, docs, lengths, methods, max_docs=max_docs, results=results,
                         model_name=model_name, data_name=data_name, progress=False)
    return {(r["method"], r["length"]): r for r in records}


def doc_names(documents, tokenizer, length, max_docs):
    from lengthwise.data.corpus import documents_of_length  # noqa: PLC0415

    return [name for name, _ in documents_of_length(documents, tokenizer, length, max_docs).docs]


# ---------------------------------------------------------------------------------------------------------------


def stage_finetune(args) -> None:
    from lengthwise.api import load_model  # noqa: PLC0415
    from lengthwise.data.corpus import load_corpus  # noqa: PLC0415
    from lengthwise.eval.results import ResultsFile  # noqa: PLC0415
    from lengthwise.search.finetune import FinetuneConfig, finetune  # noqa: PLC0415

    out, s = args.out, args.scale
    summary = load_summary(out)
    train_docs, dev_docs = load_corpus("pg19-train"), load_corpus("pg19-dev")
    if {d.name for d in train_docs} & {d.name for d in dev_docs}:
        raise SystemExit("training and evaluation documents overlap")
    model, tokenizer = load_model(TINY)
    L = model.config.max_position_embeddings
    n = round(L * s)
    methods = {
        "searched": f"longrope:long_factors={args.factors},n_hat=0,factor={s:g},attention_factor=1,"
                    f"original_max_position_embeddings={L}",
        "pi": f"linear:factor={s:g}",
        "yarn": f"yarn:factor={s:g}",
    }
    config = FinetuneConfig(length=n, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                            rank=args.rank, alpha=args.alpha, checkpoint_every=args.checkpoint_every, seed=args.seed,
                            full=args.full)
    results = ResultsFile(out / "ppl.jsonl")
    before = ppl(model, tokenizer, dev_docs, [n, L], list(methods.values()) + ["vanilla"], results, TINY,
                 "pg19-dev", args.eval_docs)
    stage = summary.setdefault("finetune", {})
    stage.update({"model": TINY, "pretrain_length": L, "target_length": n, "scale": s, "methods": methods,
                  "config": config.to_json(), "eval_docs": doc_names(dev_docs, tokenizer, n, args.eval_docs),
                  "vanilla": {str(n): before[("vanilla", n)]["metrics"]["ppl"],
                              str(L): before[("vanilla", L)]["metrics"]["ppl"]}})
    for name, spec in methods.items():
        if name not in args.only.split(","):
            continue
        model, tokenizer = load_model(TINY)  # a fresh base model per run
        start = time.time()
        result = finetune(model, tokenizer, train_docs, spec, config, out / f"ft-{name}", model_name=TINY,
                          threads=args.threads, max_docs=args.train_docs,
                          on_step=lambda row, name=name: print(name, row, flush=True) if row["step"] % 10 == 0
                          else None)
        wall = time.time() - start
        result.handle.remove()  # perplexity() patches the method itself, as `lengthwise ppl` does
        after = ppl(model, tokenizer, dev_docs, [n, L], [spec], results, f"{TINY}+ft-{name}", "pg19-dev",
                    args.eval_docs)
        row = stage.setdefault("runs", {}).setdefault(name, {})
        if result.resumed_from < config.steps or "train_seconds" not in row:  # a finished run read back keeps its time
            row["train_seconds"] = round(sum(r["seconds"] for r in result.log), 1)
            row["wall_seconds_this_call"] = round(wall, 1)
        row.update({
            "spec": spec,
            "before": {str(n): before[(spec, n)]["metrics"]["ppl"], str(L): before[(spec, L)]["metrics"]["ppl"]},
            "after": {str(n): after[(spec, n)]["metrics"]["ppl"], str(L): after[(spec, L)]["metrics"]["ppl"]},
            "first_loss": result.log[0]["loss"], "final_loss": result.log[-1]["loss"],
            "mean_loss_last_50": sum(r["loss"] for r in result.log[-50:]) / min(50, len(result.log)),
            "train_documents": len(set(json.loads((out / f"ft-{name}" / "finetune.json").read_text())["documents"])),
            "folder": str(out / f"ft-{name}"),
        })
        save_summary(out, summary)
        print(name, json.dumps(row), flush=True)
    runs = stage.get("runs", {})
    if all(k in runs for k in methods):
        order = sorted(methods, key=lambda k: runs[k]["after"][str(n)])
        stage["order_after"] = order
        stage["paper_order_reproduced"] = order == ["searched", "yarn", "pi"]
    save_summary(out, summary)


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True,
                    choices=["finetune", "progressive", "readjust-tiny", "readjust", "step-time", "plot"])
    ap.add_argument("--out", type=Path, default=Path("results/longrope-pipeline"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    # finetune
    ap.add_argument("--factors", default="docs/results/longrope_factors_s8.json")
    ap.add_argument("--scale", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--train-docs", type=int, default=None, help="training books (default: every PG19 train book)")
    ap.add_argument("--eval-docs", type=int, default=6)
    ap.add_argument("--only", default="searched,pi,yarn", help="which fine-tuning runs (comma-separated)")
    # progressive (the search budget also serves readjust-tiny)
    ap.add_argument("--progressive-scale", type=float, default=32.0)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--parents", type=int, default=8)
    ap.add_argument("--mutations", type=int, default=4)
    ap.add_argument("--crossovers", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--search-docs", type=int, default=2)
    ap.add_argument("--standard-seeds", action="store_true",
                    help="progressive: also seed with PI / NTK / YaRN at the new scale "
                         "(output extend-s<S>-standard-seeds)")
    ap.add_argument("--short-docs", type=int, default=16, help="readjust-tiny: fitness documents (first L tokens)")
    # readjust (SmolLM2)
    ap.add_argument("--real-factors", default="docs/results/longrope_factors_smollm2-135m_s4.json")
    ap.add_argument("--short-population", type=int, default=6)
    ap.add_argument("--short-parents", type=int, default=3)
    ap.add_argument("--short-mutations", type=int, default=2)
    ap.add_argument("--short-crossovers", type=int, default=2)
    ap.add_argument("--short-iterations", type=int, default=2)
    ap.add_argument("--short-attention-factor", type=float, default=1.0,
                    help="cos/sin factor in the short regime (default 1: the original model's; 'shared' variant: "
                         "the long one)")
    ap.add_argument("--variant", default="own", choices=["own", "shared"],
                    help="own: the short regime with its own attention factor; shared: one factor in both regimes")
    ap.add_argument("--skip-32k", action="store_true")
    # step-time
    ap.add_argument("--step-length", type=int, default=32768)
    ap.add_argument("--step-count", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    {"finetune": stage_finetune, "progressive": stage_progressive, "readjust-tiny": stage_readjust_tiny,
     "readjust": stage_readjust,
     "step-time": stage_step_time, "plot": stage_plot}[args.stage](args)


def _spec(factors, s, L, attention=1.0, extra="") -> str:
    values = str(factors) if isinstance(factors, (str, Path)) else "[" + ",".join(f"{x:g}" for x in factors) + "]"
    return (f"longrope:long_factors={values},n_hat=0,factor={s:g},attention_factor={attention:g},"
            f"original_max_position_embeddings={L}{extra}")


def stage_progressive(args) -> None:
    from lengthwise.api import load_model  # noqa: PLC0415
    from lengthwise.data.corpus import load_corpus  # noqa: PLC0415
    from lengthwise.eval.results import ResultsFile  # noqa: PLC0415
    from lengthwise.search import EvolutionConfig  # noqa: PLC0415
    from lengthwise.search.finetune import load_finetuned  # noqa: PLC0415
    from lengthwise.search.progressive import extend, progressive_seeds, read_previous  # noqa: PLC0415

    out, s1 = args.out, args.progressive_scale
    summary = load_summary(out)
    stage1 = summary.get("finetune", {})
    ft = out / "ft-searched"
    model, tokenizer, _ = load_finetuned(ft, patch_method=False)
    L = model.config.max_position_embeddings
    n = round(L * s1)
    previous = read_previous(ft / "factors.json")
    s0 = previous["factor"]
    train_docs, dev_docs = load_corpus("pg19-train"), load_corpus("pg19-dev")
    config = EvolutionConfig(population=args.population, parents=args.parents, mutations=args.mutations,
                             crossovers=args.crossovers, iterations=args.iterations, seed=args.seed)
    folder = out / (f"extend-s{s1:g}" + ("-standard-seeds" if args.standard_seeds else ""))
    key = "progressive" + ("_standard_seeds" if args.standard_seeds else "")
    start, fresh = time.time(), []
    result = extend(model, tokenizer, train_docs, ft / "factors.json", scale=s1, evolution=config,
                    standard_seeds=args.standard_seeds, max_docs=args.search_docs, out_dir=folder,
                    threads=args.threads, model_name=f"finetuned:{ft}",
                    on_generation=lambda phase, row: print(phase, row, flush=True),
                    on_evaluation=lambda: fresh.append(1))
    wall = time.time() - start
    from lengthwise.models.rotary import rotary_layout  # noqa: PLC0415

    base_theta = rotary_layout(model).base
    seeds = {name: lam for name, lam, _ in progressive_seeds(previous["long_factors"], s0, s1, L, base_theta)}
    attn = float(previous.get("attention_factor") or 1.0)
    searched = result.method_spec(str(folder / "factors.json"))
    methods_ft = {
        f"stage-1 factors ({s0:g}x) as they are": _spec(ft / "factors.json", s0, L, attn),
        f"stage-1 factors stretched x{s1 / s0:g}": _spec(seeds["previous-stretched"], s1, L, attn),
        f"stage-1 factors + YaRN x{s1 / s0:g}": _spec(seeds["previous+yarn"], s1, L, attn),
        f"YaRN x{s1:g} factors, attention factor 1": f"yarn:factor={s1:g},attention_factor=1",
        f"YaRN x{s1:g}": f"yarn:factor={s1:g}",
        f"second search ({s1:g}x, seeded" + (" + PI/NTK/YaRN seeds)" if args.standard_seeds else ")"): searched,
    }
    results = ResultsFile(out / "ppl.jsonl")
    rows = {}
    got = ppl(model, tokenizer, dev_docs, [n], list(methods_ft.values()), results, f"{TINY}+ft-searched", "pg19-dev",
              args.eval_docs)
    for label, spec in methods_ft.items():
        rows[f"fine-tuned (searched 8x): {label}"] = got[(spec, n)]["metrics"]["ppl"]
    for name, spec in (("pi", f"linear:factor={s1:g}"), ("yarn", f"yarn:factor={s1:g}")):
        if (out / f"ft-{name}" / "finetune.json").exists():
            m, t, _ = load_finetuned(out / f"ft-{name}", patch_method=False)
            got = ppl(m, t, dev_docs, [n], [spec], results, f"{TINY}+ft-{name}", "pg19-dev", args.eval_docs)
            rows[f"fine-tuned ({name} 8x): {spec}"] = got[(spec, n)]["metrics"]["ppl"]
    base, btok = load_model(TINY)
    base_methods = ["vanilla", f"linear:factor={s1:g}", f"yarn:factor={s1:g}",
                    _spec(seeds["previous-stretched"], s1, L, attn)]
    got = ppl(base, btok, dev_docs, [n], base_methods, results, TINY, "pg19-dev", args.eval_docs)
    for spec in base_methods:
        label = "searched 8x stretched x4" if spec.startswith("longrope") else spec
        rows[f"not fine-tuned: {label}"] = got[(spec, n)]["metrics"]["ppl"]
    previous_stage = summary.get(key, {})
    summary[key] = {
        "scale": s1, "target_length": n, "from_scale": s0, "attention_factor": attn,
        "budget": {"population": args.population, "parents": args.parents, "mutations": args.mutations,
                   "crossovers": args.crossovers, "iterations": args.iterations, "search_docs": args.search_docs},
        "standard_seeds": args.standard_seeds,
        "search_documents": doc_names(train_docs, tokenizer, n, args.search_docs),
        "eval_docs": doc_names(dev_docs, tokenizer, n, args.eval_docs),
        "fitness": {"searched": result.long.ppl, **result.long.seed_ppl},
        "evaluations": result.long.evaluations,
        "search_seconds": round(sum(r["seconds"] for r in result.long.log), 1),  # every generation, resumed or not
        "wall_seconds": round(wall, 1) if fresh else previous_stage.get("wall_seconds"),
        "long_factors": result.long_factors, "stage1_factors": previous["long_factors"],
        "held_out_ppl": rows, "factors_file": str(folder / "factors.json"),
        "stage1_ppl_at_8x_after_finetune": stage1.get("runs", {}).get("searched", {}).get("after"),
    }
    save_summary(out, summary)
    print(json.dumps(summary[key], indent=1), flush=True)


def _long_spec(factors_file: Path, L: int) -> str:
    """The long-only `longrope` spec of a factors.json (its n_hat, scale and attention factor)."""
    from lengthwise.search.progressive import read_previous  # noqa: PLC0415

    prev = read_previous(factors_file)
    attn = float(prev.get("attention_factor") or 1.0)
    return (f"longrope:long_factors={factors_file},n_hat={int(prev.get('n_hat', 0) or 0)},factor={prev['factor']:g},"
            f"attention_factor={attn:g},original_max_position_embeddings={L}")


def stage_readjust_tiny(args) -> None:
    """Short factors at L = 256 for the model fine-tuned with the searched 8x factors, under its 8x factors and
    under the 32x factors of the progressive stage; held-out PPL at 256 (short regime) and at L·s (long regime)."""
    from lengthwise.api import load_model  # noqa: PLC0415
    from lengthwise.data.corpus import load_corpus  # noqa: PLC0415
    from lengthwise.eval.results import ResultsFile  # noqa: PLC0415
    from lengthwise.search import EvolutionConfig  # noqa: PLC0415
    from lengthwise.search.finetune import load_finetuned  # noqa: PLC0415
    from lengthwise.search.progressive import read_previous, readjust  # noqa: PLC0415

    out = args.out
    summary = load_summary(out)
    ft = out / "ft-searched"
    model, tokenizer, _ = load_finetuned(ft, patch_method=False)
    L = model.config.max_position_embeddings
    train_docs, dev_docs = load_corpus("pg19-train"), load_corpus("pg19-dev")
    config = EvolutionConfig(population=args.population, parents=args.parents, mutations=args.mutations,
                             crossovers=args.crossovers, iterations=args.iterations, seed=args.seed)
    results = ResultsFile(out / "ppl.jsonl")
    name = f"{TINY}+ft-searched"
    base, btok = load_model(TINY)
    original = ppl(base, btok, dev_docs, [L], ["vanilla"], results, TINY, "pg19-dev", args.eval_docs)
    original = original[("vanilla", L)]["metrics"]["ppl"]
    stage = {"pretrain_length": L, "original_model_ppl_at_L": original,
             "budget": {"population": args.population, "parents": args.parents, "mutations": args.mutations,
                        "crossovers": args.crossovers, "iterations": args.iterations,
                        "search_docs": args.short_docs},
             "search_documents": doc_names(train_docs, tokenizer, L, args.short_docs),
             "eval_docs": doc_names(dev_docs, tokenizer, L, args.eval_docs), "runs": {}}
    s1 = f"{args.progressive_scale:g}"
    sources = {"8x": ft / "factors.json", f"{s1}x": out / f"extend-s{s1}" / "factors.json",
               f"{s1}x-standard-seeds": out / f"extend-s{s1}-standard-seeds" / "factors.json"}
    for source, factors in sources.items():
        if not factors.is_file():
            print(f"{source}: {factors} missing, skipped", flush=True)
            continue
        prev = read_previous(factors)
        n = round(L * prev["factor"])
        long_only = _long_spec(factors, L)
        # ceiling of the short factors: the default 1.25 (the long factors out of reach), or max(long): the long
        # factors themselves are a candidate (the fine-tuned model was trained with them)
        for ceiling_name, ceiling in (("1.25", None), ("max-long", max(prev["long_factors"]))):
            label = f"{source}, ceiling {ceiling_name}"
            folder = out / f"readjust-tiny-{source}-{ceiling_name}"
            start, fresh = time.time(), []
            result = readjust(model, tokenizer, train_docs, factors, short_length=L, evolution=config,
                              max_docs=args.short_docs, short_max_factor=ceiling, out_dir=folder,
                              threads=args.threads, model_name=f"finetuned:{ft}",
                              on_generation=lambda phase, row: print(phase, row, flush=True),
                              on_evaluation=lambda: fresh.append(1))
            spec = result.method_spec(str(folder / "factors.json"))
            got = ppl(model, tokenizer, dev_docs, [L], ["vanilla", long_only, spec], results, name, "pg19-dev",
                      args.eval_docs)
            got_long = ppl(model, tokenizer, dev_docs, [n], [long_only, spec], results, name, "pg19-dev",
                           args.eval_docs)
            previous_row = summary.get("readjust_tiny", {}).get("runs", {}).get(label, {})
            row = {
                "long_factors_file": str(factors), "scale": prev["factor"], "long_length": n, "spec": spec,
                "short_max_factor": ceiling if ceiling is not None else 1.25,
                "short_factors": result.short_factors, "fitness": {"searched": result.ppl, **result.seed_ppl},
                "evaluations": result.evaluations,
                "search_seconds": result.seconds if fresh else previous_row.get("search_seconds"),
                "wall_seconds": round(time.time() - start, 1) if fresh else previous_row.get("wall_seconds"),
                "ppl_at_L": {"original model": original,
                             "fine-tuned, original RoPE": got[("vanilla", L)]["metrics"]["ppl"],
                             "fine-tuned, long factors only": got[(long_only, L)]["metrics"]["ppl"],
                             "fine-tuned, readjusted short factors": got[(spec, L)]["metrics"]["ppl"]},
                "ppl_at_long_length": {"long factors only": got_long[(long_only, n)]["metrics"]["ppl"],
                                       "with readjusted short factors": got_long[(spec, n)]["metrics"]["ppl"]},
            }
            row["short_vs_original_model"] = round(
                row["ppl_at_L"]["fine-tuned, readjusted short factors"] / original - 1, 6)
            row["long_unchanged"] = (row["ppl_at_long_length"]["long factors only"]
                                     == row["ppl_at_long_length"]["with readjusted short factors"])
            stage["runs"][label] = row
            print(label, json.dumps(row), flush=True)
    summary["readjust_tiny"] = stage
    save_summary(out, summary)


def _first_tokens_ppl(record: dict, tokens: int) -> float:
    """PPL over the first `tokens` targets of a record, from its NLL-by-position buckets (weighted by their sizes)."""
    import math  # noqa: PLC0415

    b = record["nll_by_position"]
    edges, means = b["edges"], b["mean_nll"]
    total = count = 0.0
    for a, z, m in zip(edges[:-1], edges[1:], means):
        if z - 1 <= tokens:
            total += m * (z - a)
            count += z - a
    return math.exp(total / count)


def stage_readjust(args) -> None:
    from lengthwise.api import load_model  # noqa: PLC0415
    from lengthwise.data.corpus import load_corpus  # noqa: PLC0415
    from lengthwise.eval.results import ResultsFile  # noqa: PLC0415
    from lengthwise.search import EvolutionConfig  # noqa: PLC0415
    from lengthwise.search.progressive import read_previous, readjust  # noqa: PLC0415

    out = args.out
    summary = load_summary(out)
    model, tokenizer = load_model(REAL)
    L = model.config.max_position_embeddings
    previous = read_previous(args.real_factors)
    s, attn = previous["factor"], previous["attention_factor"]
    short_attention = args.short_attention_factor if args.variant == "own" else None
    config = EvolutionConfig(population=args.short_population, parents=args.short_parents,
                             mutations=args.short_mutations, crossovers=args.short_crossovers,
                             iterations=args.short_iterations, seed=args.seed)
    folder = out / f"readjust-smollm2-{args.variant}"
    start, fresh = time.time(), []
    train_docs, dev_docs = load_corpus("pg19-train"), load_corpus("pg19-dev")
    result = readjust(model, tokenizer, train_docs, args.real_factors, short_length=L, evolution=config, max_docs=1,
                      short_attention=short_attention, out_dir=folder, threads=args.threads, model_name=REAL,
                      on_generation=lambda phase, row: print(phase, row, flush=True),
                      on_evaluation=lambda: fresh.append(1))
    wall = time.time() - start
    spec = result.method_spec(str(folder / "factors.json"))
    long_only = _spec(args.real_factors, s, L, round(attn, 5))
    results = ResultsFile(out / "ppl.jsonl")
    # all-ones short factors under the long attention factor: the best one factor in both regimes can do at <= L
    ones_shared = _spec(args.real_factors, s, L, round(attn, 5), ",short_factors=[" + ",".join(["1"] * len(
        previous["long_factors"])) + "]")
    got = ppl(model, tokenizer, dev_docs, [L], ["vanilla", long_only, ones_shared, spec], results, REAL, "pg19-dev",
              1)
    row = {
        "variant": args.variant, "short_attention_factor": short_attention, "attention_factor": attn,
        "budget": {"population": args.short_population, "parents": args.short_parents,
                   "mutations": args.short_mutations, "crossovers": args.short_crossovers,
                   "iterations": args.short_iterations},
        "search_document": doc_names(train_docs, tokenizer, L, 1),
        "eval_document": doc_names(dev_docs, tokenizer, L, 1),
        "fitness": {"searched": result.ppl, **result.seed_ppl}, "evaluations": result.evaluations,
        "search_seconds": result.seconds if fresh else summary.get("readjust", {}).get(args.variant, {}).get(
            "search_seconds"),
        "wall_seconds": round(wall, 1) if fresh else summary.get("readjust", {}).get(args.variant, {}).get(
            "wall_seconds"),
        "short_factors": result.short_factors, "spec": spec,
        "ppl_8k_vanilla": got[("vanilla", L)]["metrics"]["ppl"],
        "ppl_8k_long_only": got[(long_only, L)]["metrics"]["ppl"],
        "ppl_8k_ones_long_attention_factor": got[(ones_shared, L)]["metrics"]["ppl"],
        "ppl_8k_readjusted": got[(spec, L)]["metrics"]["ppl"],
    }
    row["ppl_8k_vs_vanilla"] = round(row["ppl_8k_readjusted"] / row["ppl_8k_vanilla"] - 1, 5)
    if not args.skip_32k:
        t = time.time()
        got32 = ppl(model, tokenizer, dev_docs, [4 * L], [spec], results, REAL, "pg19-dev", 1)
        rec = got32[(spec, 4 * L)]
        row["ppl_32k_readjusted"] = rec["metrics"]["ppl"]
        row["ppl_32k_first_8k_buckets"] = round(_first_tokens_ppl(rec, L), 4)
        elapsed, before = time.time() - t, summary.get("readjust", {}).get(args.variant, {})
        # a cell read back from ppl.jsonl takes no time: keep the measured one
        row["seconds_32k"] = round(elapsed, 1) if elapsed > 5 or "seconds_32k" not in before else before["seconds_32k"]
        reference = [json.loads(x) for x in Path("docs/results/rope_ppl_smollm2-135m.jsonl").read_text().splitlines()
                     if x.strip()]
        ref = next((r for r in reference if r["length"] == 4 * L and r["method"].startswith("longrope")), None)
        if ref is not None:
            row["ppl_32k_long_only_reference"] = ref["metrics"]["ppl"]
            row["ppl_32k_vs_long_only"] = round(row["ppl_32k_readjusted"] / ref["metrics"]["ppl"] - 1, 6)
            row["ppl_32k_reference_first_8k_buckets"] = round(_first_tokens_ppl(ref, L), 4)
            row["long_only_spec"] = ref["method"]
            row["reference_threads"] = ref["machine"]["torch_threads"]
        row["eval_document_32k"] = doc_names(dev_docs, tokenizer, 4 * L, 1)
    summary.setdefault("readjust", {})[args.variant] = row
    save_summary(out, summary)
    print(json.dumps(row, indent=1), flush=True)


def stage_step_time(args) -> None:
    import resource  # noqa: PLC0415

    from lengthwise.api import load_model  # noqa: PLC0415
    from lengthwise.data.corpus import load_corpus  # noqa: PLC0415
    from lengthwise.search.finetune import FinetuneConfig, finetune  # noqa: PLC0415

    out, n = args.out, args.step_length
    summary = load_summary(out)
    model, tokenizer = load_model(REAL)
    L = model.config.max_position_embeddings
    previous = json.loads(Path(args.real_factors).read_text())
    spec = _spec(args.real_factors, previous["factor"], L, round(previous["attention_factor"], 5))
    config = FinetuneConfig(length=n, steps=400, lr=1e-4, warmup=20, rank=args.rank, alpha=args.alpha,
                            checkpoint_every=1, seed=args.seed)
    folder = out / f"ft-smollm2-{n}"
    result = finetune(model, tokenizer, load_corpus("pg19-train"), spec, config, folder, model_name=REAL,
                      threads=args.threads, max_docs=2, stop_after=args.step_count,
                      on_step=lambda row: print(row, flush=True))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ckpt = sum(p.stat().st_size for p in (folder / "checkpoints").rglob("*") if p.is_file())
    seconds = [r["seconds"] for r in result.log]
    summary.setdefault("step_time", {})[str(n)] = {
        "length": n, "spec": spec, "config": config.to_json(), "steps_timed": len(seconds), "seconds": seconds,
        "losses": [r["loss"] for r in result.log], "trainable_parameters": trainable,
        "checkpoint_bytes": ckpt, "peak_rss_mib_this_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                     / 1024, 1),
        "threads": args.threads,
    }
    save_summary(out, summary)
    print(json.dumps(summary["step_time"][str(n)], indent=1), flush=True)


def stage_plot(args) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    summary = load_summary(args.out)
    stage = summary["finetune"]
    n = stage["target_length"]
    labels = {"searched": "LongRoPE searched", "yarn": "YaRN", "pi": "PI"}
    fig, axes = plt.subplots(2, 2, figsize=(17, 10), layout="constrained")
    ax = axes[0, 0]
    k = 20
    for name in ("searched", "yarn", "pi"):
        log = [json.loads(x) for x in (args.out / f"ft-{name}" / "train_log.jsonl").read_text().splitlines() if x]
        losses = [r["loss"] for r in log]
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=labels[name])
    ax.set(xlabel="step", ylabel=f"training loss, nats/token ({k}-step mean)",
           title=f"{stage['model']}: LoRA fine-tuning at {n} tokens ({stage['scale']:g}x)")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    runs = stage["runs"]
    names = [x for x in ("searched", "yarn", "pi") if x in runs]
    width = 0.38
    for j, when in enumerate(("before", "after")):
        values = [runs[x][when][str(n)] for x in names]
        bars = ax.bar([i + j * width for i in range(len(names))], values, width, label=f"{when} fine-tuning")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(stage["vanilla"][str(n)], color="grey", ls=":", label="no scaling, not fine-tuned")
    ax.set_xticks([i + width / 2 for i in range(len(names))], [labels[x] for x in names])
    ax.set(ylabel=f"held-out PPL at {n} (PG19 dev, {len(stage['eval_docs'])} books)",
           title=f"{stage['scale']:g}x: held-out PPL before / after fine-tuning")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    rows = {}
    for key in ("progressive", "progressive_standard_seeds"):
        rows.update(summary.get(key, {}).get("held_out_ppl", {}))
    prog = summary.get("progressive_standard_seeds") or summary.get("progressive")
    if rows:
        items = sorted(rows.items(), key=lambda kv: kv[1])
        colors = ["tab:green" if "second search" in name else "tab:blue" if name.startswith("fine-tuned") else
                  "tab:grey" for name, _ in items]
        ax.barh(range(len(items)), [v for _, v in items], color=colors)
        ax.set_yticks(range(len(items)), [name.replace("fine-tuned ", "ft ") for name, _ in items], fontsize=7)
        for i, (_, v) in enumerate(items):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
        ax.set(xlabel=f"held-out PPL at {prog['target_length']} (PG19 dev)",
               title=f"progressive: {prog['from_scale']:g}x fine-tuned -> {prog['scale']:g}x (green: second search)")
        ax.invert_yaxis()
    ax = axes[1, 1]
    bars = []
    tiny = summary.get("readjust_tiny", {})
    seen = set()
    for label, row in tiny.get("runs", {}).items():
        source, ceiling = label.split(", ceiling ")
        at_l = row["ppl_at_L"]
        original = at_l["original model"]
        if source not in seen:
            seen.add(source)
            bars.append((f"tiny, fine-tuned, {source} factors: long only",
                         at_l["fine-tuned, long factors only"] / original - 1))
        bars.append((f"tiny, fine-tuned, {source} factors: readjusted (ceiling {ceiling})",
                     at_l["fine-tuned, readjusted short factors"] / original - 1))
    for variant, row in summary.get("readjust", {}).items():
        vanilla = row["ppl_8k_vanilla"]
        if "ppl_8k_long_only" in row:
            bars.append(("SmolLM2 4x: long only", row["ppl_8k_long_only"] / vanilla - 1))
        if "ppl_8k_ones_long_attention_factor" in row:
            bars.append(("SmolLM2 4x: short all ones, long attention factor",
                         row["ppl_8k_ones_long_attention_factor"] / vanilla - 1))
        bars.append((f"SmolLM2 4x: readjusted ({variant} attention factor)", row["ppl_8k_vs_vanilla"]))
    if bars:
        ax.barh(range(len(bars)), [100 * v for _, v in bars],
                color=["tab:green" if "readjusted" in name else "tab:orange" for name, _ in bars])
        ax.set_yticks(range(len(bars)), [name for name, _ in bars], fontsize=7)
        for i, (_, v) in enumerate(bars):
            ax.text(100 * v, i, f" {100 * v:+.2f}%", va="center", fontsize=7)
        ax.axvline(1.0, color="red", ls=":", label="+1%")
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set(xlabel="PPL at the training length L vs the original model (%)",
               title="readjusted short factors (tiny: 256 tokens, SmolLM2: 8,192)")
        ax.invert_yaxis()
        ax.legend(fontsize=8)
    path = args.out / "longrope-pipeline.png"
    fig.savefig(path, dpi=110)
    print("figure:", path)


if __name__ == "__main__":
    main()
