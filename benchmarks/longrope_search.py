"""LongRoPE search on the reference RoPE model: searched factors vs PI, NTK, Dynamic NTK and YaRN on held-out data.

For each scale s: search long factors at L·s on `--search-data` documents (pg19-train), short factors at L, then
score every method on `--eval-data` documents (pg19-dev, never seen by the search) at L·s and at L.
Writes `OUT/records.jsonl` (perplexity records, resumable), `OUT/summary.json`, and a figure of the search
progress per generation. `--ray` repeats the first scale's search on a local Ray instance (2 workers) to time it
and to check that it finds exactly the serial result.

    .venv/bin/python benchmarks/longrope_search.py --scales 4,8 --out results/longrope-search
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lengthwise.api import load_model
from lengthwise.data.corpus import load_corpus
from lengthwise.eval.perplexity import perplexity
from lengthwise.eval.results import ResultsFile
from lengthwise.io import atomic_write_json
from lengthwise.search import EvolutionConfig, longrope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-rope-256")
    ap.add_argument("--scales", default="4,8")
    ap.add_argument("--search-data", default="pg19-train")
    ap.add_argument("--eval-data", default="pg19-dev")
    ap.add_argument("--search-docs", type=int, default=3)
    ap.add_argument("--eval-docs", type=int, default=6)
    ap.add_argument("--population", type=int, default=24)
    ap.add_argument("--parents", type=int, default=12)
    ap.add_argument("--mutations", type=int, default=6)
    ap.add_argument("--crossovers", type=int, default=6)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--short-iterations", type=int, default=4)
    ap.add_argument("--attention-factor", type=float, default=None, help="default: √(1 + ln s / ln L)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mutation-prob", type=float, default=0.3)
    ap.add_argument("--mutation-step", type=float, default=None, help="largest λ change per mutation (default 15%% of the range)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progressive", action="store_true",
                    help="seed each scale's search with the previous scale's factors, rescaled (paper: 4x -> 8x)")
    ap.add_argument("--ray", action="store_true", help="also time the first scale's search on local Ray")
    ap.add_argument("--ray-only", action="store_true", help="only the Ray timing run (needs the serial run done)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/longrope-search"))
    ap.add_argument("--plot-only", action="store_true", help="only redraw the figure from OUT/summary.json")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads((args.out / "summary.json").read_text()), args.out)
        return

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    L = model.config.max_position_embeddings
    search_docs, eval_docs = load_corpus(args.search_data), load_corpus(args.eval_data)
    overlap = {d.name for d in search_docs} & {d.name for d in eval_docs}
    if overlap:
        raise SystemExit(f"search and evaluation documents overlap: {sorted(overlap)[:3]}")
    config = EvolutionConfig(population=args.population, parents=args.parents, mutations=args.mutations,
                             crossovers=args.crossovers, iterations=args.iterations, seed=args.seed,
                             mutation_prob=args.mutation_prob, mutation_step=args.mutation_step)
    short_config = EvolutionConfig(population=args.population, parents=args.parents, mutations=args.mutations,
                                   crossovers=args.crossovers, iterations=args.short_iterations, seed=args.seed,
                                   mutation_prob=args.mutation_prob, mutation_step=args.mutation_step)
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    results = ResultsFile(args.out / "records.jsonl")
    scales = [float(s) for s in args.scales.split(",")]

    for index, s in enumerate(scales):
        key = f"s={s:g}"
        previous = args.out / f"s={scales[index - 1]:g}" / "factors.json" if args.progressive and index else None
        search_kwargs = dict(scale=s, evolution=config, previous=previous, max_docs=args.search_docs, attention=args.attention_factor,
                             short_length=L, short_evolution=short_config, threads=args.threads)
        if not args.ray_only:
            start, fresh = time.time(), []
            result = longrope(model, tokenizer, search_docs, out_dir=args.out / key, model_name=args.model,
                              on_generation=lambda phase, row: print(phase, row, flush=True),
                              on_evaluation=lambda: fresh.append(1), **search_kwargs)
            wall = time.time() - start
            n = result.target_length
            evals = result.long.evaluations + result.short.evaluations
            searched = result.method_spec(str(args.out / key / "factors.json"))
            methods = ["vanilla", f"linear:factor={s:g}", f"ntk:factor={s:g}", f"dynamic-ntk:factor={s:g}",
                       f"yarn:factor={s:g}", searched]
            if args.attention_factor is not None:  # YaRN with the search's attention factor: isolates that choice
                methods.insert(-1, f"yarn:factor={s:g},attention_factor={args.attention_factor:g}")
            long_records = perplexity(model, tokenizer, eval_docs, [n], methods, max_docs=args.eval_docs,
                                      results=results, model_name=args.model, data_name=args.eval_data)
            short_records = perplexity(model, tokenizer, eval_docs, [L], ["vanilla", searched], max_docs=args.eval_docs,
                                       results=results, model_name=args.model, data_name=args.eval_data)
            previous_summary = dict(summary.get(key, {}))
            names = ["vanilla", "PI", "NTK", "Dynamic NTK", "YaRN"]
            if args.attention_factor is not None:
                names.append(f"YaRN (attention {args.attention_factor:g})")
            names.append("LongRoPE search")
            held_out = {name: r["metrics"]["ppl"] for name, r in zip(names, long_records)}
            standard = ("PI", "NTK", "Dynamic NTK", "YaRN")
            best_baseline = min(held_out[k] for k in standard)
            best_any = min(v for k, v in held_out.items() if k not in ("vanilla", "LongRoPE search"))
            summary[key] = {
                "target_length": n, "pretrain_length": L, "attention_factor": result.attention_factor,
                "n_hat": result.n_hat, "long_factors": result.long_factors, "short_factors": result.short_factors,
                "search_fitness": {"searched": result.long.ppl, **result.long.seed_ppl},
                "held_out_ppl": held_out,
                "gain_vs_best_baseline": round(1 - held_out["LongRoPE search"] / best_baseline, 4),
                "gain_vs_best_including_tuned_yarn": round(1 - held_out["LongRoPE search"] / best_any, 4),
                "previous": str(previous) if previous else None,
                "search_documents": {"data": args.search_data, "names": search_names(search_docs, tokenizer, n, args.search_docs)},
                "eval_documents": {"data": args.eval_data, "names": search_names(eval_docs, tokenizer, n, args.eval_docs)},
                "held_out_ppl_at_L": {"vanilla": short_records[0]["metrics"]["ppl"],
                                      "searched (short factors)": short_records[1]["metrics"]["ppl"]},
                "short_vs_original_at_L": round(short_records[1]["metrics"]["ppl"] / short_records[0]["metrics"]["ppl"] - 1, 4),
                "serial": {"wall_s": round(wall, 1), "search_s": round(result.long.seconds + result.short.seconds, 1),
                           "evaluations": evals,
                           "evals_per_min_long": round(60 * result.long.evaluations / max(result.long.seconds, 1e-9), 2)},
                "budget": {"population": args.population, "parents": args.parents, "mutations": args.mutations,
                           "crossovers": args.crossovers, "iterations": args.iterations,
                           "short_iterations": args.short_iterations, "search_docs": args.search_docs,
                           "eval_docs": args.eval_docs, "threads": args.threads,
                           "mutation_prob": args.mutation_prob, "mutation_step": args.mutation_step},
            }
            if not fresh and "serial" in previous_summary:  # resumed from finished checkpoints: keep the real timing
                summary[key]["serial"] = previous_summary["serial"]
            if "ray" in previous_summary:
                summary[key]["ray"] = previous_summary["ray"]
            atomic_write_json(summary_path, summary)
            print(json.dumps(summary[key], indent=1), flush=True)
        if (args.ray or args.ray_only) and index == 0:
            start = time.time()
            ray_result = longrope(model, tokenizer, search_docs, out_dir=args.out / f"{key}-ray", model_name=args.model,
                                  ray_address="local", workers=args.workers,
                                  on_generation=lambda phase, row: print("ray", phase, row, flush=True), **search_kwargs)
            serial = summary.get(key, {})
            summary.setdefault(key, {})["ray"] = {
                "workers": args.workers, "wall_s": round(time.time() - start, 1),
                "search_s": round(ray_result.long.seconds + ray_result.short.seconds, 1),
                "evaluations": ray_result.long.evaluations + ray_result.short.evaluations,
                "evals_per_min_long": round(60 * ray_result.long.evaluations / max(ray_result.long.seconds, 1e-9), 2),
                "same_result_as_serial": (ray_result.long_factors == serial.get("long_factors")
                                          and ray_result.short_factors == serial.get("short_factors")),
            }
            atomic_write_json(summary_path, summary)
            print(json.dumps(summary[key]["ray"], indent=1), flush=True)
    plot(summary, args.out)


def search_names(documents, tokenizer, length: int, max_docs: int) -> list[str]:
    from lengthwise.data.corpus import documents_of_length  # noqa: PLC0415

    return [name for name, _ in documents_of_length(documents, tokenizer, length, max_docs).docs]


def plot(summary: dict, out: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for key in summary:
        log = out / key / "generations.jsonl"
        if "ray" in key or not log.exists():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["phase"] == "long"]
        line, = axes[0].plot([r["generation"] for r in rows], [r["best_so_far"] for r in rows], marker="o", label=f"{key} best")
        axes[0].plot([r["generation"] for r in rows], [r["mean"] for r in rows], ls="--", color=line.get_color(),
                     label=f"{key} mean")
        axes[1].plot(range(len(summary[key]["long_factors"])), summary[key]["long_factors"], marker=".", label=key)
    scales = [k for k in summary if "held_out_ppl" in summary[k]]
    names = list(dict.fromkeys(n for k in scales for n in summary[k]["held_out_ppl"] if n != "vanilla"))
    width = 0.8 / max(1, len(scales))
    for j, key in enumerate(scales):
        values = [summary[key]["held_out_ppl"].get(n, float("nan")) for n in names]
        bars = axes[2].bar([i + j * width for i in range(len(names))], values, width, label=f"{key} ({summary[key]['target_length']} tokens)")
        axes[2].bar_label(bars, fmt="%.1f", fontsize=6)
    axes[2].set_xticks([i + width * (len(scales) - 1) / 2 for i in range(len(names))], names, rotation=25, ha="right", fontsize=7)
    axes[2].set(ylabel="PPL (held-out pg19-dev)", title="held-out perplexity at L·s")
    axes[0].set(xlabel="generation", ylabel="fitness PPL (search docs)", title="search progress", yscale="log")
    axes[1].set(xlabel="rotary pair i", ylabel="λ_i", title="searched long factors", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "longrope-search.png"
    fig.savefig(path, dpi=110)
    print("figure:", path)


if __name__ == "__main__":
    main()
