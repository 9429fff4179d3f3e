"""Generation quality after prefixes of N tokens on a reference model.

For each prefix length N and each held-out document with at least N + 100 tokens (the first --max-docs in corpus
order), greedy-generate 100 tokens under each method and score BLEU (sacrebleu) and ROUGE-L F1 (rouge-score)
against the true next 100 tokens. RoPE rescalings use s = (N + 100) / 256 (`linear:factor={s}` etc.); dynamic-ntk
its default factor 1 (the base follows the current length).

    .venv/bin/python benchmarks/gen_quality.py --model llama-rope-256 --data stdlib --lengths 256,1024,4096 \
        --max-docs 3 --out docs/results/gen_quality_llama-rope-256_stdlib.jsonl --figures docs/figures

Results are JSON lines (one per method x N), scores only (no text), appended; finished cells are skipped.
Writes gen_quality_<model>_<data>.md next to the results and gen_quality_<model>_<data>.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

METHODS = ("vanilla", "sliding-window", "streaming", "lm-infinite", "linear:factor={s}", "ntk:factor={s}",
           "dynamic-ntk", "yarn:factor={s}", "llama3:factor={s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-rope-256")
    parser.add_argument("--data", default="stdlib")
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--max-docs", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated specs (no commas inside)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default docs/results/gen_quality_<model>_<data>.jsonl")
    parser.add_argument("--figures", default="docs/figures")
    args = parser.parse_args()

    import torch  # noqa: PLC0415

    from lengthwise.api import load_model  # noqa: PLC0415
    from lengthwise.data.corpus import load_corpus  # noqa: PLC0415
    from lengthwise.eval.gen_quality import gen_quality  # noqa: PLC0415
    from lengthwise.eval.results import ResultsFile  # noqa: PLC0415
    from lengthwise.eval.tasks import check_memory  # noqa: PLC0415
    from lengthwise.io import atomic_write_text  # noqa: PLC0415
    from lengthwise.report.tasks import gen_quality_tables, plot_gen_quality, slug  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    lengths = [int(v) for v in args.lengths.split(",")]
    methods = args.methods.split(",")
    name = f"gen_quality_{slug(args.model)}_{slug(args.data)}"
    out = Path(args.out or f"docs/results/{name}.jsonl")
    documents = load_corpus(args.data)
    model, tokenizer = load_model(args.model)
    check_memory(model, [n + args.new_tokens for n in lengths], methods, logits=1)
    records = gen_quality(model, tokenizer, documents, lengths, methods, new_tokens=args.new_tokens,
                          max_docs=args.max_docs, results=ResultsFile(out), model_name=args.model,
                          data_name=args.data)
    table = gen_quality_tables(records) + "\n"
    atomic_write_text(out.with_suffix(".md"), table)
    plot_gen_quality(records, Path(args.figures) / f"{name}.png")
    print(table)


if __name__ == "__main__":
    main()
