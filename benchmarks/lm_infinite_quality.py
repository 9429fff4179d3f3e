"""Quality of lm-infinite vs vanilla, sliding-window and streaming: PPL at 1x, 4x, 16x, 32x the training length.

    .venv/bin/python benchmarks/lm_infinite_quality.py --model llama-rope-256 --data stdlib --max-docs 4

Writes docs/results/lm_infinite_quality_<model>_<data>.jsonl (resumable: finished cells are skipped), an
NLL-by-position plot docs/figures/lm_infinite_<model>_<data>.png and prints a Markdown table with, per length,
lm-infinite's PPL relative to sliding-window (target: within 2%).
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import torch

from lengthwise.api import load_model
from lengthwise.data.corpus import load_corpus
from lengthwise.eval.perplexity import perplexity
from lengthwise.eval.results import ResultsFile
from lengthwise.report.plots import plot_nll_by_position
from lengthwise.report.tables import ppl_table

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["vanilla", "sliding-window", "streaming", "lm-infinite"]


def gap_table(records: list[dict]) -> str:
    by = {(r["method"], r["length"]): r["metrics"]["ppl"] for r in records}
    lengths = sorted({r["length"] for r in records})
    lines = ["| length | sliding-window | lm-infinite | lm-infinite / sliding-window - 1 | within 2% |", "|---|---|---|---|---|"]
    for n in lengths:
        sw, lm = by.get(("sliding-window", n)), by.get(("lm-infinite", n))
        if sw and lm:
            gap = lm / sw - 1
            lines.append(f"| {n} | {sw:.3f} | {lm:.3f} | {gap:+.2%} | {'yes' if gap <= 0.02 else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-rope-256")
    parser.add_argument("--data", default="stdlib")
    parser.add_argument("--lengths", default="256,1024,4096,8192")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-docs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tag = f"{args.model}_{args.data}".replace("/", "_")
    out = ROOT / "docs" / "results" / f"lm_infinite_quality_{tag}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model)
    records = perplexity(model, tokenizer, load_corpus(args.data), [int(x) for x in args.lengths.split(",")],
                         args.methods.split(","), max_docs=args.max_docs, results=ResultsFile(out),
                         model_name=args.model, data_name=args.data, progress=False)
    figure = ROOT / "docs" / "figures" / f"lm_infinite_{tag}.png"
    plot_nll_by_position(records, figure, title=f"{args.model} on {args.data}: NLL by position")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(ppl_table(records))
    print()
    print(gap_table(records))
    print(f"\nresults: {out.relative_to(ROOT)}\nfigure: {figure.relative_to(ROOT)}\nload: {load}")


if __name__ == "__main__":
    main()
