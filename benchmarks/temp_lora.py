"""Temp-LoRA benchmark: PPL by context-position bucket with and without the LoRA, and the cost of each setting.

    .venv/bin/python benchmarks/temp_lora.py --out docs/results/temp_lora.jsonl --figure docs/figures/temp_lora.png

Arms (all on the same documents, every token scored before the LoRA trains on it):
  (a) full-window baseline: window 256 (the training length), chunk 64, no LoRA
  (b) Temp-LoRA, same window and chunk
  (c) "economic": window 128, chunk 85 (about 2/3 of it), with the LoRA; (c0) the same windows without it
  reuse / no-reuse: window 256, chunk 64, keep 128 (re-encode every second chunk), cache reuse on and off
Resumable: records are appended per (document, arm) and skipped when present.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import torch

from lengthwise.api import load_model
from lengthwise.data.corpus import load_corpus
from lengthwise.eval.results import ResultsFile
from lengthwise.report.plots import _pyplot, save_figure
from lengthwise.report.tables import markdown_table
from lengthwise.temp_lora import TempLoraConfig
from lengthwise.temp_lora.evaluate import change, comparison_rows, pool, run_arm, select_documents

def arms(lr: float, steps: int) -> dict[str, TempLoraConfig]:
    lora = TempLoraConfig(chunk_size=64, window=256, lr=lr, steps_per_chunk=steps)
    econ = TempLoraConfig(chunk_size=85, window=128, lr=lr, steps_per_chunk=steps)
    return {
        "a-base-w256": replace(lora, steps_per_chunk=0),
        "b-lora-w256": lora,
        "c0-base-w128": replace(econ, steps_per_chunk=0),
        "c-lora-w128": econ,
        "reuse-keep128": replace(lora, keep=128),
        "noreuse-keep128": replace(lora, keep=128, reuse_cache=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-rope-256")
    parser.add_argument("--data", default="pg19-dev,stdlib", help="comma-separated corpora")
    parser.add_argument("--docs", default="4,2", help="documents per corpus (longest first)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="cap per document")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--arms", default="all", help="comma-separated arm names, or all")
    parser.add_argument("--edges", default="1024,2048,4096,8192", help="context-position bucket edges (tokens)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/temp_lora.jsonl"))
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--timing-tokens", type=int, default=0,
                        help="also time arms (a), (b), (c) on the first N tokens of the first document, interleaved")
    parser.add_argument("--timing-reps", type=int, default=3, help="interleaved repetitions; the fastest is kept")
    parser.add_argument("--timing-out", type=Path, default=None, help="JSON lines for the timing records")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    results = ResultsFile(args.out)
    corpora = args.data.split(",")
    counts = [int(c) for c in args.docs.split(",")]
    if len(counts) != len(corpora):
        parser.error(f"--docs gives {len(counts)} counts for {len(corpora)} corpora")
    docs = {name: select_documents(load_corpus(name), tokenizer, n, args.max_tokens, min_tokens=4096)
            for name, n in zip(corpora, counts)}
    for name, chosen in docs.items():
        print(f"{name}: " + ", ".join(f"{d} ({len(ids)} tokens)" for d, ids in chosen))
    edges = (0, *(int(e) for e in args.edges.split(",")))
    chosen_arms = arms(args.lr, args.steps)
    if args.arms != "all":
        chosen_arms = {k: v for k, v in chosen_arms.items() if k in args.arms.split(",")}
    pooled: dict[str, dict] = {}
    for arm, config in chosen_arms.items():
        records = []
        for name, chosen in docs.items():
            records += run_arm(model, chosen, config, arm=arm, method=None, results=results, model_name=args.model,
                               data_name=name, edges=edges, progress=False)
        pooled[arm] = pool(records)
        print(f"{arm}: PPL {pooled[arm]['ppl']:.3f}, {pooled[arm]['ms_per_token']:.2f} ms/token", flush=True)
    report(pooled)
    if args.timing_tokens:
        first = next(iter(docs.items()))
        timing(model, first, args.timing_tokens, args.timing_reps, chosen_arms, args)
    if args.figure and "a-base-w256" in pooled and "b-lora-w256" in pooled:
        plot(pooled, args.figure)


def report(pooled: dict[str, dict]) -> None:
    base, lora = pooled.get("a-base-w256"), pooled.get("b-lora-w256")
    if base and lora:
        print("\nPPL by context position, window 256, chunk 64 (pooled over documents)")
        print(markdown_table(["context position", "tokens", "PPL without", "PPL with Temp-LoRA", "change"],
                             comparison_rows(base, lora)))
    if base:
        print("\nCost against (a), per scored token (analytic FLOPs; wall time of score + re-encode + train)")
        rows = []
        for arm, p in pooled.items():
            rows.append([arm, f"{p['ppl']:.3f}", change(p["ppl"], base["ppl"]), f"{p['flops_per_token'] / 1e6:.1f}",
                         change(p["flops_per_token"], base["flops_per_token"]), f"{p['ms_per_token']:.2f}",
                         change(p["ms_per_token"], base["ms_per_token"])])
        print(markdown_table(["arm", "PPL", "vs (a)", "MFLOPs/token", "vs (a)", "ms/token", "vs (a)"], rows))


def timing(model, corpus_doc, tokens: int, reps: int, chosen_arms: dict, args) -> None:
    """Wall time per token of (a), (b), (c) on the same tokens, the arms interleaved `reps` times (a, b, c, a, b,
    c, ...) so that load from other jobs hits every arm alike; the fastest repetition of each arm is kept."""
    import json  # noqa: PLC0415
    import time  # noqa: PLC0415

    from lengthwise.eval.results import make_record  # noqa: PLC0415
    from lengthwise.io import append_jsonl  # noqa: PLC0415
    from lengthwise.locks import OutputLock  # noqa: PLC0415
    from lengthwise.temp_lora import TempLoraSession  # noqa: PLC0415

    data_name, chosen = corpus_doc
    name, ids = chosen[0]
    ids = torch.tensor(ids[:tokens])
    names = [a for a in ("a-base-w256", "b-lora-w256", "c-lora-w128") if a in chosen_arms]
    runs: dict[str, list[dict]] = {a: [] for a in names}
    for rep in range(reps):
        for arm in names:
            start = time.perf_counter()
            with TempLoraSession(model, chosen_arms[arm]) as session:
                nll = session.process(ids)
                cost = session.cost_summary(len(nll))
            cost["wall_ms_per_token"] = 1000.0 * (time.perf_counter() - start) / len(nll)
            runs[arm].append(cost)
            print(f"timing rep {rep} {arm}: {cost['wall_ms_per_token']:.2f} ms/token", flush=True)
    base = min(r["wall_ms_per_token"] for r in runs[names[0]])
    rows = []
    for arm in names:
        best = min(runs[arm], key=lambda r: r["wall_ms_per_token"])
        metrics = {"ms_per_token_min": best["wall_ms_per_token"],
                   "ms_per_token_all": [round(r["wall_ms_per_token"], 3) for r in runs[arm]],
                   "flops_per_token": best["flops_per_token"], "flops": best["flops"], "seconds": best["seconds"],
                   "tokens": len(ids) - 1, "reps": reps}
        record = make_record("temp-lora-timing", f"temp-lora-timing|{arm}|{name}|{len(ids)}", model=args.model,
                             method=f"temp-lora:{arm}", method_config=asdict(chosen_arms[arm]),
                             data=data_name, seed=0, metrics=metrics, arm=arm, doc=name)
        if args.timing_out:
            with OutputLock(args.timing_out):  # one writer at a time, as ResultsFile
                append_jsonl(args.timing_out, record)
        rows.append([arm, f"{best['flops_per_token'] / 1e6:.1f}", change(best["flops_per_token"], runs[names[0]][0]["flops_per_token"]),
                     f"{best['wall_ms_per_token']:.2f}", change(best["wall_ms_per_token"], base)])
    print(json.dumps({"timing_doc": name, "tokens": len(ids)}))
    print(markdown_table(["arm", "MFLOPs/token", "vs (a)", "ms/token (fastest of reps)", "vs (a)"], rows))


def plot(pooled: dict[str, dict], path: Path) -> None:
    plt = _pyplot()
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = list(pooled["a-base-w256"]["buckets"])
    colors = {"a-base-w256": "C0", "b-lora-w256": "C1", "c0-base-w128": "C2", "c-lora-w128": "C3"}
    for arm, style in (("a-base-w256", "o-"), ("b-lora-w256", "s-"), ("c0-base-w128", "o--"), ("c-lora-w128", "s--")):
        if arm in pooled:
            ax.plot(labels, [pooled[arm]["buckets"][k]["ppl"] for k in labels], style, color=colors[arm], label=arm)
    ax.set_xlabel("context position (tokens into the document)")
    ax.set_ylabel("PPL (pooled over documents)")
    ax.set_title("each chunk scored before training on it", fontsize=9)
    ax.legend(fontsize=8)
    for arm, ref, style in (("b-lora-w256", "a-base-w256", "s-"), ("c-lora-w128", "a-base-w256", "s--"),
                            ("c-lora-w128", "c0-base-w128", "^:")):
        if arm in pooled and ref in pooled:
            dx.plot(labels, [100 * (pooled[arm]["buckets"][k]["ppl"] / pooled[ref]["buckets"][k]["ppl"] - 1)
                             for k in labels], style, color=colors[arm], label=f"{arm} vs {ref}")
    dx.axhline(0, color="grey", lw=0.8)
    dx.set_xlabel("context position (tokens into the document)")
    dx.set_ylabel("PPL change (%)")
    dx.set_title("Temp-LoRA vs no LoRA", fontsize=9)
    dx.legend(fontsize=7)
    fig.suptitle("Temp-LoRA on llama-rope-256", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
