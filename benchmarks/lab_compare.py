"""Position-encoding lab figure: train every encoding at the same budget, then PPL at 1x..16x the training length.

    .venv/bin/python benchmarks/lab_compare.py                       # train what is missing, then compare
    .venv/bin/python benchmarks/lab_compare.py --skip-train          # compare the models already trained

Training: 2 layers, d=128, 4 heads, SwiGLU 384, context 128, 500 steps x 16 sequences, lr 2e-3 (cosine), seed 0,
on the stdlib training files (4M characters, the reference BPE tokenizer); every encoding sees the same batches.
Models go to `results/lab/models/<pe>` (not committed); a killed run resumes from its last checkpoint, and several
runs may share the list (each skips a model another live process is training).
Comparison: every model, plus log-n and local+log-n on RoPE and NoPE, blockwise attention on XPOS, and the
sliding-window baseline of RoPE (the fluency reference at each length, since each length uses its own documents), on held-out
stdlib files (and pg19-dev with --data), 8 documents per length; JSON lines in docs/results/lab_compare.jsonl,
table docs/results/lab_compare.md, plot docs/figures/lab_compare.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lengthwise.lab.compare import compare, default_variants, render
from lengthwise.lab.encodings import ENCODINGS
from lengthwise.lab.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "results/lab/models")
    parser.add_argument("--pe", nargs="*", default=list(ENCODINGS), help="encodings to train (default: all)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--render-only", action="store_true",
                        help="only redraw the table and plot from the results file (no scoring)")
    parser.add_argument("--variant", nargs="*", default=None,
                        help="variants to score (default: every trained model and its default tricks); several runs "
                             "with disjoint variants may append to one results file, a last default run renders all")
    parser.add_argument("--data", default="stdlib", help="comma-separated evaluation corpora")
    parser.add_argument("--factors", default="1,2,4,8,16")
    parser.add_argument("--max-docs", type=int, default=8)
    parser.add_argument("--results", type=Path, default=ROOT / "docs/results/lab_compare.jsonl")
    parser.add_argument("--table", type=Path, default=ROOT / "docs/results/lab_compare.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/figures/lab_compare.png")
    parser.add_argument("--position-plot", type=Path, default=None, help="also plot NLL by position (noisy with 8 docs)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.render_only:
        render(args.results, args.models, args.variant or default_variants(args.models),
               [d for d in args.data.split(",") if d], args.table, args.plot)
        print(args.table.read_text())
        return
    if not args.skip_train:
        for pe in args.pe:
            cfg = TrainConfig(pe=pe, data="stdlib", context=args.context, d_model=128, layers=2, heads=4, ffn=384,
                              steps=args.steps, batch=16, lr=2e-3, seed=0, max_chars=4_000_000,
                              checkpoint_every=50, threads=args.threads)
            train(cfg, args.models / pe, cache_dir=args.models / "_data")
    compare(args.models, args.variant or default_variants(args.models), [int(f) for f in args.factors.split(",")],
            [d for d in args.data.split(",") if d], args.max_docs, args.results, args.table, args.plot,
            position_plot=args.position_plot)
    print(args.table.read_text())


if __name__ == "__main__":
    main()
