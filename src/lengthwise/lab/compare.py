"""Compare trained lab models: PPL at 1x..16x the training length, with the inference-time tricks as variants.

A *variant* is a model folder name under the models root plus optional inference tricks joined by `+`:
`rope`, `rope+logn`, `nope+local`, `nope+local=64`, `xpos+blockwise`.
- `logn`: log-n attention scaling in every layer (`InferenceOptions.logn`);
- `local[=W]`: local attention over the last W keys (default: the training length) in every layer but the last,
  and a global last layer with log-n scaling (Su's hybrid);
- `blockwise[=B]`: XPOS's blockwise causal attention (block B, default half the training length);
- `sliding`: not a trick but the reference: the `sliding-window` baseline (each token scored from the previous
  training-length tokens, the model never leaves its training length), the fluency to match at every length.
Every cell is scored by `lengthwise.eval.perplexity.perplexity` (method `vanilla`: one pass per document) and
appended to a JSON-lines results file (resumable), then rendered as a Markdown table and a PNG plot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lengthwise.data.corpus import load_corpus
from lengthwise.errors import UserError
from lengthwise.eval.perplexity import perplexity
from lengthwise.eval.results import ResultsFile
from lengthwise.io import atomic_write_text, read_jsonl
from lengthwise.lab.model import LAB_MARKER, load_lab_model
from lengthwise.report.plots import _pyplot, plot_nll_by_position, save_figure
from lengthwise.report.tables import markdown_table, pivot

TRICKS = ("logn", "local", "blockwise", "sliding")
# the inference tricks worth showing by default, on the models where the survey proposes them
DEFAULT_TRICKS = {"rope": ("logn", "local"), "nope": ("logn", "local"), "xpos": ("blockwise",)}


@dataclass(frozen=True)
class Variant:
    name: str  # as written, e.g. "rope+local=64"
    model: str  # folder name under the models root
    folder: Path
    inference: dict  # InferenceOptions fields
    method: str = "vanilla"  # the perplexity method: vanilla (one pass) or sliding-window


def model_folders(root: str | Path) -> list[str]:
    """Names of the lab model folders under `root` (those with a marker file), sorted."""
    return sorted(p.name for p in Path(root).iterdir() if (p / LAB_MARKER).exists())


def parse_variant(text: str, root: str | Path) -> Variant:
    """Parse `MODEL[+TRICK[=N]]...`; raises ValueError naming the bad part and what is accepted."""
    parts = [p.strip() for p in text.split("+")]
    model, tricks = parts[0], parts[1:]
    folder = Path(root) / model
    if not (folder / LAB_MARKER).exists():
        raise UserError(f"variant {text!r}: no lab model {model!r} under {root}; "
                         f"available: {', '.join(model_folders(root)) or 'none'}")
    inference: dict = {}
    method = "vanilla"
    for trick in tricks:
        name, _, value = trick.partition("=")
        if name not in TRICKS:
            raise UserError(f"variant {text!r}: unknown trick {name!r}; accepted: {', '.join(TRICKS)}")
        if value and not value.isdigit():
            raise UserError(f"variant {text!r}: {name}={value!r} must be a positive integer")
        if name in ("logn", "sliding") and value:
            raise UserError(f"variant {text!r}: {name} takes no value")
        if name == "sliding":
            if len(tricks) > 1:
                raise UserError(f"variant {text!r}: sliding is the baseline of the plain model; use it alone")
            method = "sliding-window"
        elif name == "logn":
            inference["logn"] = True
        elif name == "local":
            inference["local_window"] = int(value) if value else _train_length(folder)
        else:
            inference["blockwise"] = True
            if value:
                inference["block"] = int(value)
    return Variant(text, model, folder, inference, method)


def _train_length(folder: Path) -> int:
    return int(json.loads((folder / LAB_MARKER).read_text())["config"]["max_position_embeddings"])


def default_variants(root: str | Path) -> list[str]:
    """Every model, the tricks of `DEFAULT_TRICKS` on the models that exist, and every model's sliding-window
    reference (each length scores its own documents, so a model is judged against its own reference)."""
    return [v for m in model_folders(root) for v in [m, *(f"{m}+{t}" for t in DEFAULT_TRICKS.get(m, ())),
                                                      f"{m}+sliding"]]


def compare(root: str | Path, variants: Sequence[str], factors: Sequence[int], data: Sequence[str],
            max_docs: int, results: str | Path, table: str | Path | None = None, plot: str | Path | None = None,
            progress: bool = True, position_plot: str | Path | None = None, wait: bool = True) -> list[dict]:
    """Score every (variant, data, factor) cell (skipping cells already in `results`); write the table, the plot
    and (with `position_plot`) the NLL by position at the longest length. `wait`: see `ResultsFile`."""

    parsed = [parse_variant(v, root) for v in variants]  # validate all before any heavy work
    if not factors or any(int(f) < 1 for f in factors):
        raise UserError(f"factors must be positive integers, got {list(factors)!r}")
    store = ResultsFile(results, wait=wait)
    corpora = {name: load_corpus(name) for name in data}
    records = []
    for variant in parsed:
        model, tokenizer = load_lab_model(variant.folder, **variant.inference)
        length = model.config.max_position_embeddings
        for name, documents in corpora.items():
            records += perplexity(model, tokenizer, documents, [f * length for f in factors], [variant.method],
                                  max_docs=max_docs, results=store, model_name=f"lab:{variant.name}",
                                  data_name=name, progress=progress)
    for record in records:  # the factor, for tables and plots (stored records are returned as stored)
        record.setdefault("factor", record["length"] // record["pretrain_length"])
    if table:
        atomic_write_text(table, comparison_table(records, root) + "\n")
    if plot:
        plot_comparison(records, plot)
    if position_plot:

        longest = max(r["length"] for r in records)
        plot_nll_by_position([{**r, "method": r["model"].removeprefix("lab:")} for r in records
                              if r["length"] == longest], position_plot,
                             title=f"lab models: NLL by position at {longest} tokens")
    return records


def render(results: str | Path, root: str | Path, variants: Sequence[str], data: Sequence[str],
           table: str | Path, plot: str | Path) -> list[dict]:
    """Table and plot from the stored records of `variants` on `data` (no scoring), in the variants' order."""

    order = {f"lab:{v}": i for i, v in enumerate(variants)}
    records = [r for r in read_jsonl(results)
               if r.get("task") == "ppl" and r["model"] in order and r["data"] in data]
    records.sort(key=lambda r: (list(data).index(r["data"]), order[r["model"]], r["length"]))
    if not records:
        raise UserError(f"no stored records of {list(variants)} on {list(data)} in {results}")
    atomic_write_text(table, comparison_table(records, root) + "\n")
    plot_comparison(records, plot)
    return records


def comparison_table(records: list[dict], root: str | Path | None = None) -> str:
    """One Markdown table per data set: variant rows, PPL at each length (factor x training length) columns,
    plus the final training loss of the model when its `training.json` is found under `root`, and, at the longest
    length, PPL / PPL of the model's own sliding-window reference (1.00: no loss from the long context; > 1: the
    model does worse with the whole input than with its last training-length tokens)."""

    blocks = []
    for data in dict.fromkeys(r["data"] for r in records):
        group = [r for r in records if r["data"] == data]
        rows, columns, cells = pivot(group, "model", "length", lambda r: r["metrics"]["ppl"])
        train_length = group[0]["pretrain_length"]
        header = [f"variant ({data})", "train loss"] + [f"{c} ({c // train_length}x)" for c in columns]
        header.append(f"{columns[-1]}: / sliding")
        body = []
        for row in rows:
            variant = row.removeprefix("lab:")
            reference = cells.get((f"lab:{variant.split('+')[0]}+sliding", columns[-1]))
            value = cells.get((row, columns[-1]))
            ratio = f"{value / reference:.2f}" if reference and value and not variant.endswith("+sliding") else "-"
            body.append([variant, _train_loss(root, variant.split("+")[0])] +
                        [f"{cells[(row, c)]:.2f}" if (row, c) in cells else "-" for c in columns] + [ratio])
        blocks.append(markdown_table(header, body))
    return "\n\n".join(blocks)


def _train_loss(root, model: str) -> str:
    path = Path(root) / model / "training.json" if root else None
    if not path or not path.exists():
        return "-"
    return f"{json.loads(path.read_text())['train_loss_last']:.3f}"


def plot_comparison(records: list[dict], path: str | Path) -> None:
    """Per data set, two panels. Left: PPL (log scale) vs evaluation length of the plain models. Right: PPL divided
    by the model's own sliding-window PPL at the same length, for every variant whose model has that reference:
    each length uses its own documents, and the ratio removes that, leaving what the long input costs (1 = nothing).
    One colour per model; its tricks are dashed / dotted."""

    plt = _pyplot()
    datas = list(dict.fromkeys(r["data"] for r in records))
    fig, axes = plt.subplots(len(datas), 2, figsize=(13, 5 * len(datas)), squeeze=False)
    for (raw_ax, ratio_ax), data in zip(axes, datas):
        group = [r for r in records if r["data"] == data]
        ppl = {(r["model"].removeprefix("lab:"), r["length"]): r["metrics"]["ppl"] for r in group}
        variants = list(dict.fromkeys(r["model"].removeprefix("lab:") for r in group))
        models = list(dict.fromkeys(v.split("+")[0] for v in variants))
        colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
        for variant in variants:
            model, tricks = variant.split("+")[0], variant.split("+")[1:]
            lengths = sorted(n for v, n in ppl if v == variant)
            if "sliding" in tricks:
                continue
            style = "-"
            if tricks:
                style = "--" if tricks[0].startswith(("logn", "blockwise")) else ":"
            else:
                raw_ax.plot(lengths, [ppl[(variant, n)] for n in lengths], "-", marker="o", ms=3,
                            color=colours[model], label=variant)
            ref = [(n, ppl[(variant, n)] / ppl[(f"{model}+sliding", n)]) for n in lengths
                   if (f"{model}+sliding", n) in ppl]
            if ref:
                ratio_ax.plot([n for n, _ in ref], [v for _, v in ref], style, marker="o", ms=3,
                              color=colours[model], label=variant)
        train_length = group[0]["pretrain_length"]
        for ax in (raw_ax, ratio_ax):
            ax.set_xscale("log", base=2)
            ax.axvline(train_length, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("evaluation length (tokens); dotted: training length")
            ax.legend(fontsize=7, ncol=2)
            ax.grid(alpha=0.3)
        raw_ax.set_yscale("log")
        raw_ax.set_ylabel("perplexity (each length: its own documents)")
        raw_ax.set_title(f"lab models on {data}")
        ratio_ax.axhline(1.0, color="black", lw=0.8)
        ratio_ax.set_ylabel("PPL / PPL of the model's own sliding window")
        ratio_ax.set_title(f"cost of the long input on {data} (1 = none; dashed: logn/blockwise, dotted: local)")
    fig.tight_layout()
    save_figure(fig, path)
