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
from dataclasses import replace
from pathlib import Path

import torch

from lengthwise.api import load_model
from lengthwise.data.corpus import load_corpus
from lengthwise.eval.results import ResultsFile
from lengthwise.report.plots import _pyplot, save_figure
from lengthwise.report.tables import markdown_table
from lengthwise.temp_lora import TempLoraConfig
from lengthwise.temp_lora.evaluate import change, comparison_rows, pool, run_arm, select_documents

EDGES = (0, 1024, 2048, 4096, 8192)


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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/temp_lora.jsonl"))
    parser.add_argument("--figure", type=Path, default=None)
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
    chosen_arms = arms(args.lr, args.steps)
    if args.arms != "all":
        chosen_arms = {k: v for k, v in chosen_arms.items() if k in args.arms.split(",")}
    pooled: dict[str, dict] = {}
    for arm, config in chosen_arms.items():
        records = []
        for name, chosen in docs.items():
            records += run_arm(model, chosen, config, arm=arm, method=None, results=results, model_name=args.model,
                               data_name=name, edges=EDGES, progress=False)
        pooled[arm] = pool(records)
        print(f"{arm}: PPL {pooled[arm]['ppl']:.3f}, {pooled[arm]['ms_per_token']:.2f} ms/token", flush=True)
    report(pooled)
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


def plot(pooled: dict[str, dict], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = list(pooled["a-base-w256"]["buckets"])
    for arm, style in (("a-base-w256", "o-"), ("b-lora-w256", "s-"), ("c0-base-w128", "o--"), ("c-lora-w128", "s--")):
        if arm in pooled:
            ax.plot(labels, [pooled[arm]["buckets"][k]["ppl"] for k in labels], style, label=arm)
    ax.set_xlabel("context position (tokens into the document)")
    ax.set_ylabel("PPL")
    ax.set_title("Temp-LoRA on llama-rope-256: each chunk scored before training")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
