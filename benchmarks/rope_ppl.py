"""Perplexity of the RoPE rescaling family beyond the training length.

For each target length n (default 2x, 4x, 8x the training length L) every static method uses the scale s = n / L;
dynamic-ntk uses factor 1 (its base follows the current length, b' = b (n/L)^(d/(d-2))). Rows with n_hat keep
positions < n_hat on the original frequencies (LongRoPE, Table 2's question). `logn` alone and `yarn+logn` show the
query scale. `sliding-window` is the fluency reference (the model never leaves its training length).

    .venv/bin/python benchmarks/rope_ppl.py --model llama-rope-256 --data stdlib,pg19-dev --max-docs 8 \
        --out docs/results/rope_ppl.jsonl --table docs/results/rope_ppl.md --plot docs/figures/rope_ppl.png \
        --nhat-plot docs/figures/rope_ppl_nhat.png

In one forward pass over n tokens dynamic-ntk (s=1) computes exactly what ntk with s=n/L computes (its base is set
for the current length n); it differs only while decoding through a cache, where its base grows with the length.

Results are JSON lines (one per method x length x data), appended; finished cells are skipped on a rerun.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

N_HATS = (4, 16, 64)


def method_rows(length: int, pretrain_length: int) -> list[tuple[str, str]]:
    """(row label, method spec) for one target length."""
    s = length / pretrain_length
    s_text = f"{s:g}"
    rows = [("vanilla", "vanilla"), ("sliding-window", "sliding-window")]
    for name in ("linear", "ntk", "yarn", "llama3"):
        rows.append((f"{name} (s=n/L)", f"{name}:factor={s_text}"))
    rows.append(("dynamic-ntk (s=1)", "dynamic-ntk"))
    rows.append(("logn", "logn"))
    rows.append(("yarn+logn (s=n/L)", f"yarn:factor={s_text}+logn"))
    for n_hat in N_HATS:
        rows.append((f"linear n_hat={n_hat} (s=n/L)", f"linear:factor={s_text},n_hat={n_hat}"))
    for n_hat in N_HATS:
        rows.append((f"dynamic-ntk n_hat={n_hat} (s=1)", f"dynamic-ntk:n_hat={n_hat}"))
    return rows


def table(records: list[dict], labels: dict[str, str], lengths: list[int]) -> str:
    from lengthwise.report.tables import markdown_table  # noqa: PLC0415

    blocks = []
    for data in dict.fromkeys(r["data"] for r in records):
        cells = {(labels[r["method"]], r["length"]): r["metrics"] for r in records if r["data"] == data}
        rows = list(dict.fromkeys(label for label, _ in cells))
        header = [f"PPL ({data}, {next(r['model'] for r in records)})"] + [f"{n}" for n in lengths]
        body = [[row] + [f"{cells[(row, n)]['ppl']:.3f}" if (row, n) in cells else "-" for n in lengths] for row in rows]
        blocks.append(markdown_table(header, body))
    return "\n\n".join(blocks)


def plot(records: list[dict], labels: dict[str, str], path: Path) -> None:
    from lengthwise.report.plots import _pyplot, save_figure  # noqa: PLC0415

    plt = _pyplot()
    datas = list(dict.fromkeys(r["data"] for r in records))
    fig, axes = plt.subplots(1, len(datas), figsize=(6 * len(datas), 4.5), squeeze=False)
    for ax, data in zip(axes[0], datas):
        series: dict[str, list] = {}
        for r in records:
            label = labels[r["method"]]
            if r["data"] == data and "n_hat" not in label:
                series.setdefault(label, []).append((r["length"], r["metrics"]["ppl"]))
        for label, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [math.log(p[1]) for p in points], marker="o", label=label,
                    linestyle="--" if label in ("vanilla", "sliding-window") else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per document (one forward pass)")
        ax.set_ylabel("NLL per token (log PPL)")
        ax.set_title(f"RoPE rescaling, {data}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_n_hat(records: list[dict], labels: dict[str, str], path: Path) -> None:
    """PPL with start tokens kept (n_hat) relative to n_hat = 0, per method and length: LongRoPE's Table 2 question."""
    from lengthwise.report.plots import _pyplot, save_figure  # noqa: PLC0415

    plt = _pyplot()
    datas = list(dict.fromkeys(r["data"] for r in records))
    fig, axes = plt.subplots(1, len(datas), figsize=(6 * len(datas), 4.5), squeeze=False)
    for ax, data in zip(axes[0], datas):
        ppl = {(labels[r["method"]], r["length"]): r["metrics"]["ppl"] for r in records if r["data"] == data}
        for method, base_label in (("linear", "linear (s=n/L)"), ("dynamic-ntk", "dynamic-ntk (s=1)")):
            suffix = base_label.split(" ", 1)[1]
            for n in sorted({length for _, length in ppl}):
                if (base_label, n) not in ppl:
                    continue
                xs, ys = [0], [0.0]
                for n_hat in N_HATS:
                    value = ppl.get((f"{method} n_hat={n_hat} {suffix}", n))
                    if value is not None:
                        xs.append(n_hat)
                        ys.append(100 * (value / ppl[(base_label, n)] - 1))
                ax.plot(xs, ys, marker="o", linestyle="-" if method == "linear" else "--", label=f"{method} @ {n}")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xscale("symlog", linthresh=4)
        ax.set_xticks([0] + list(N_HATS), [str(x) for x in (0, *N_HATS)])
        ax.set_xlabel("n_hat (start tokens on the original frequencies)")
        ax.set_ylabel("PPL change vs n_hat = 0 (%)")
        ax.set_title(f"Keeping start tokens un-interpolated, {data}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-rope-256")
    parser.add_argument("--data", default="stdlib,pg19-dev", help="comma-separated corpus specs")
    parser.add_argument("--lengths", default="", help="comma-separated token lengths (default 2L,4L,8L)")
    parser.add_argument("--max-docs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/rope_ppl.jsonl"))
    parser.add_argument("--table", type=Path, default=None, help="write the Markdown tables here too")
    parser.add_argument("--plot", type=Path, default=None, help="PNG: NLL by length per method")
    parser.add_argument("--nhat-plot", type=Path, default=None, help="PNG: PPL change with n_hat vs n_hat = 0")
    args = parser.parse_args()

    import torch  # noqa: PLC0415

    from lengthwise.api import load_model  # noqa: PLC0415
    from lengthwise.data.corpus import load_corpus  # noqa: PLC0415
    from lengthwise.eval.perplexity import perplexity  # noqa: PLC0415
    from lengthwise.eval.results import ResultsFile  # noqa: PLC0415
    from lengthwise.io import atomic_write_text  # noqa: PLC0415
    from lengthwise.models.families import model_info  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    pretrain = model_info(model).pretrain_length
    lengths = [int(x) for x in args.lengths.split(",") if x] or [2 * pretrain, 4 * pretrain, 8 * pretrain]
    results = ResultsFile(args.out)
    records, labels = [], {}
    for data in [d for d in args.data.split(",") if d]:
        documents = load_corpus(data)
        for n in lengths:
            rows = method_rows(n, pretrain)
            labels.update({spec: label for label, spec in rows})
            records += perplexity(model, tokenizer, documents, [n], [spec for _, spec in rows], max_docs=args.max_docs,
                                  results=results, model_name=args.model, data_name=data, progress=False)
            print(f"done {data} @ {n}", flush=True)
    text = table(records, labels, lengths)
    print(text)
    if args.table:
        atomic_write_text(args.table, text + "\n")
    if args.plot:
        plot(records, labels, args.plot)
    if args.nhat_plot:
        plot_n_hat(records, labels, args.nhat_plot)


if __name__ == "__main__":
    main()
