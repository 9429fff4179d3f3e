"""Passkey retrieval on a reference model from 1x to 32x its training length.

Methods: vanilla, the sliding-window baseline, streaming, lm-infinite, and the RoPE rescalings with the scale set to
the prompt length over the training length (`linear:factor={s}` etc., s = n / 256; dynamic-ntk with its default
factor 1, its base follows the current length). Keys are fixed by the seed, the same for every method.

    .venv/bin/python benchmarks/passkey.py --model llama-rope-256 --lengths 256,512,1024,2048,4096,8192 \
        --depths 0,25,50,75,100 --trials 4 --out docs/results/passkey_llama-rope-256.jsonl \
        --figures docs/figures

Results are JSON lines (one per method x length x depth), appended; finished cells are skipped on a rerun.
Writes <results>.md (tables) next to the results and, with --figures DIR, passkey_heatmap_<model>.png and
passkey_by_length_<model>.png there, from every record of the file for this model and these methods (not only this
run's cells, so a run of a few cells does not shrink the tables); --render-only rewrites them and runs nothing.
Figures are opt-in because their names follow the model, not the results file: a second study of the same model
(another results file) drawn into the same folder would replace the first one's figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

METHODS = ("vanilla", "sliding-window", "streaming", "lm-infinite", "linear:factor={s}", "ntk:factor={s}",
           "dynamic-ntk", "yarn:factor={s}", "llama3:factor={s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-rope-256")
    parser.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--depths", default="0,25,50,75,100")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated specs; separate one spec's options with ';'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/results/passkey_llama-rope-256.jsonl")
    parser.add_argument("--figures", help="folder for the figures (none drawn without it)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the tables and figures from --out")
    args = parser.parse_args()

    import torch  # noqa: PLC0415

    from lengthwise.api import load_model  # noqa: PLC0415
    from lengthwise.eval.passkey import passkey  # noqa: PLC0415
    from lengthwise.eval.results import ResultsFile  # noqa: PLC0415
    from lengthwise.eval.tasks import check_memory  # noqa: PLC0415
    from lengthwise.io import atomic_write_text  # noqa: PLC0415
    from lengthwise.report.tasks import passkey_depth_tables, passkey_tables, plot_passkey_by_length  # noqa: PLC0415
    from lengthwise.report.tasks import plot_passkey_heatmap, slug  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    lengths = [int(v) for v in args.lengths.split(",")]
    depths = [float(v) for v in args.depths.split(",")]
    methods = [spec.replace(";", ",") for spec in args.methods.split(",")]  # ";" between a spec's options
    if not args.render_only:
        model, tokenizer = load_model(args.model)
        check_memory(model, lengths, methods, logits=8)
        passkey(model, tokenizer, lengths, depths, methods, trials=args.trials, seed=args.seed,
                results=ResultsFile(args.out), model_name=args.model)
    from lengthwise.io import read_jsonl  # noqa: PLC0415

    latest = {r["key"]: r for r in read_jsonl(args.out)}  # a rerun cell's later record wins
    records = [r for r in latest.values() if r.get("model") == args.model and r["method"] in methods]
    records.sort(key=lambda r: (methods.index(r["method"]), r["length"], r["depth"]))
    out = Path(args.out)
    tables = passkey_tables(records) + "\n\n" + passkey_depth_tables(records) + "\n"
    atomic_write_text(out.with_suffix(".md"), tables)
    if args.figures:
        figures = Path(args.figures)
        plot_passkey_heatmap(records, figures / f"passkey_heatmap_{slug(args.model)}.png")
        plot_passkey_by_length(records, figures / f"passkey_by_length_{slug(args.model)}.png")
    print(tables)


if __name__ == "__main__":
    main()
