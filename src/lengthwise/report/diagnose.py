"""Figures and a summary table of `lengthwise diagnose` records (lengthwise.eval.diagnose).

Figures (PNG, matplotlib Agg), each from the records of one model:
- `diagnose_logits_<tag>.png`: the paper's view of factor 1: for one head (the first recorded, head 0 by default)
  of every recorded layer, the largest logit of the last query per distance bucket; one panel per (method, length);
  the training length L marked (under Λ attention the buckets between the window and the global keys are empty:
  those keys are not seen);
- `diagnose_logits_band_<tag>.png`: the same head at the longest length, for up to four layers: the 5-95% band of
  the logits per distance bucket, the median, and the max;
- `diagnose_entropy_<tag>.png`: factor 2: attention entropy by query position (mean over the recorded heads), per
  method at its longest length (a query's entropy does not depend on what follows it), for up to four layers and
  the mean over every recorded layer; each method's entropy in the bucket ending at L dashed;
- `diagnose_pca_layer<l>_<tag>.png`: factor 3: the hidden states of layer l in their own 2-D PCA plane, coloured by
  position, the first tokens marked; one panel per (method, length).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from lengthwise.report.plots import _pyplot, legend_label, save_figure


def model_tag(model: str) -> str:
    """A file-name part for a model name or path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(model)).name).strip("-") or "model"


def _order(records: list[dict]) -> tuple[list[str], list[int], list[int]]:
    methods = list(dict.fromkeys(r["method"] for r in records))
    lengths = sorted({r["length"] for r in records})
    layers = sorted({r["layer"] for r in records})
    return methods, lengths, layers


def _index(records: list[dict]) -> dict:
    return {(r["method"], r["length"], r["layer"]): r for r in records}


def spread_layers(layers: list[int], count: int = 4) -> list[int]:
    """Up to `count` layers, evenly spread from the first to the last."""
    if len(layers) <= count:
        return list(layers)
    picks = [layers[round(i * (len(layers) - 1) / (count - 1))] for i in range(count)]
    return list(dict.fromkeys(picks))


def _centres(edges: list[int]) -> list[float]:
    return [(a + b - 1) / 2 for a, b in zip(edges[:-1], edges[1:])]


def _nan(values):
    return [math.nan if v is None else v for v in values]


def _mark_train_length(ax, train_length: int, label: bool = False) -> None:
    ax.axvline(train_length, color="tab:red", linestyle="--", linewidth=1, label=f"L = {train_length}" if label else None)


def plot_logits_max(records: list[dict], path, head_slot: int = 0, title: str = "") -> None:
    plt = _pyplot()
    from matplotlib import cm  # noqa: PLC0415

    methods, lengths, layers = _order(records)
    table = _index(records)
    fig, axes = plt.subplots(len(methods), len(lengths), figsize=(4.2 * len(lengths), 3.0 * len(methods)),
                             squeeze=False, sharey=True, layout="constrained")
    colours = cm.viridis([i / max(len(layers) - 1, 1) for i in range(len(layers))])
    for row, method in enumerate(methods):
        for col, n in enumerate(lengths):
            ax = axes[row][col]
            for colour, layer in zip(colours, layers):
                record = table.get((method, n, layer))
                if record is None:
                    continue
                stats = record["metrics"]["logits"]
                ax.plot(_centres(stats["edges"]), _nan(stats["max"][head_slot]), "-o", color=colour, linewidth=0.9,
                        markersize=1.2)  # a marker: an isolated bucket (Λ attention's global keys) shows too
            record = next((table[(method, n, layer)] for layer in layers if (method, n, layer) in table), None)
            if record is not None:
                _mark_train_length(ax, record["pretrain_length"], label=row == 0 and col == 0)
                head = record["heads"][head_slot]
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(0, 1.3 * n)  # room for the farthest bucket's marker
            ax.set_title(f"{legend_label(method, 36)}, N = {n}", fontsize=9)
            if row == len(methods) - 1:
                ax.set_xlabel("distance from the last query")
            if col == 0:
                ax.set_ylabel(f"max logit, head {head}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper left")
    sm = cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(layers[0], layers[-1]))
    fig.colorbar(sm, ax=axes, shrink=0.6, label="layer")
    fig.suptitle(title or "attention logits of the last query by distance (max per bucket)", fontsize=10)
    save_figure(fig, path)


def plot_logits_band(records: list[dict], path, head_slot: int = 0, title: str = "") -> None:
    plt = _pyplot()
    methods, lengths, layers = _order(records)
    table = _index(records)
    n = lengths[-1]
    shown = spread_layers(layers)
    fig, axes = plt.subplots(len(methods), len(shown), figsize=(3.6 * len(shown), 2.8 * len(methods)), squeeze=False,
                             sharex=True, layout="constrained")
    for col, layer in enumerate(shown):
        for row, method in enumerate(methods):
            ax = axes[row][col]
            record = table.get((method, n, layer))
            if record is None:
                continue
            stats = record["metrics"]["logits"]
            x = _centres(stats["edges"])
            ax.fill_between(x, _nan(stats["q05"][head_slot]), _nan(stats["q95"][head_slot]), color="tab:blue",
                            alpha=0.25, linewidth=0, label="5-95%")
            ax.vlines(x, _nan(stats["q05"][head_slot]), _nan(stats["q95"][head_slot]), color="tab:blue", alpha=0.35,
                      linewidth=1)  # isolated buckets (the global keys of Λ attention) too
            ax.plot(x, _nan(stats["q50"][head_slot]), "-o", color="tab:blue", linewidth=1, markersize=1.5,
                    label="median")
            ax.plot(x, _nan(stats["max"][head_slot]), ".", color="black", markersize=3, label="max")
            _mark_train_length(ax, record["pretrain_length"], label=True)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(0, 1.3 * n)
            ax.set_title(f"{legend_label(method, 30)}, layer {layer}, head {record['heads'][head_slot]}", fontsize=8)
            if row == len(methods) - 1:
                ax.set_xlabel("distance from the last query")
            if col == 0:
                ax.set_ylabel("logit")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title or f"attention logits of the last of {n} tokens by distance", fontsize=10)
    save_figure(fig, path)


def _head_mean(rows: list[list]) -> list[float]:
    """Mean over heads of [head][bucket] values."""
    return [sum(col) / len(col) for col in zip(*[_nan(r) for r in rows])]


def plot_entropy(records: list[dict], path, title: str = "") -> None:
    plt = _pyplot()
    methods, lengths, layers = _order(records)
    table = _index(records)
    shown = spread_layers(layers)
    panels = [(f"layer {layer}", [layer]) for layer in shown] + [(f"mean over {len(layers)} layers", layers)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.2), squeeze=False, sharey=True,
                             layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, (name, group) in enumerate(panels):
        ax = axes[0][col]
        for i, method in enumerate(methods):
            n = max((length for length in lengths if (method, length, group[0]) in table), default=None)
            chosen = [table[(method, n, layer)] for layer in group if (method, n, layer) in table]
            if not chosen:
                continue
            curves = [_head_mean(r["metrics"]["entropy"]["mean"]) for r in chosen]
            curve = [sum(v) / len(v) for v in zip(*curves)]
            x = chosen[0]["metrics"]["entropy"]["position"]
            colour = colours[i % len(colours)]
            ax.plot(x, curve, color=colour, linewidth=1.2, label=f"{legend_label(method, 30)} (N = {n})")
            references = [r["metrics"]["entropy"]["at_train_length"] for r in chosen]
            if all(ref is not None for ref in references):
                ax.axhline(sum(sum(_nan(ref)) / len(ref) for ref in references) / len(references), color=colour,
                           linestyle=":", linewidth=1)
        _mark_train_length(ax, chosen[0]["pretrain_length"] if chosen else 0, label=col == 0)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.set_xlabel("query position")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("attention entropy (nats), mean over heads")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title or "attention entropy by query position (dotted: each method's entropy just below L)",
                 fontsize=10)
    save_figure(fig, path)


def plot_pca(records: list[dict], path, layer: int, title: str = "") -> None:
    plt = _pyplot()
    methods, lengths, _ = _order(records)
    table = _index(records)
    fig, axes = plt.subplots(len(methods), len(lengths), figsize=(3.6 * len(lengths), 3.2 * len(methods)),
                             squeeze=False, layout="constrained")
    image = None
    for row, method in enumerate(methods):
        for col, n in enumerate(lengths):
            ax = axes[row][col]
            record = table.get((method, n, layer))
            pca = record and record["metrics"].get("pca")
            if not pca:
                ax.set_visible(False)
                continue
            positions, xy = pca["positions"], pca["xy"]
            x, y = [_nan([p[0]])[0] for p in xy], [_nan([p[1]])[0] for p in xy]
            image = ax.scatter(x, y, c=positions, cmap="viridis", vmin=0, vmax=lengths[-1], s=4, linewidths=0)
            first = [i for i, p in enumerate(positions) if p < pca["first_tokens"]]
            ax.scatter([x[i] for i in first], [y[i] for i in first], marker="x", color="tab:red", s=18,
                       linewidths=1, label=f"first {pca['first_tokens']} tokens")
            explained = ", ".join(f"{100 * v:.0f}%" if v is not None else "?" for v in pca["explained"])
            ax.set_title(f"{legend_label(method, 30)}, N = {n} (PCs: {explained})", fontsize=8)
            ax.tick_params(labelsize=7)
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.6, label="position")
        train = next(r["pretrain_length"] for r in records)
        bar.ax.axhline(train, color="tab:red", linewidth=1.5)
        for ax in (a for line in axes for a in line):
            if ax.get_visible():
                ax.legend(fontsize=7, loc="best")
                break
    fig.suptitle(title or f"hidden states of layer {layer} (each divided by its RMS), 2-D PCA of each pass; red line on the scale: L",
                 fontsize=10)
    save_figure(fig, path)


def diagnose_figures(records: list[dict], folder, model: str) -> list[Path]:
    """Every figure of the module docstring for `records` (one model), written into `folder`; their paths."""
    folder = Path(folder)
    tag = model_tag(model)
    written = []
    if not records:
        return written
    for name, plot in (("logits", plot_logits_max), ("logits_band", plot_logits_band), ("entropy", plot_entropy)):
        path = folder / f"diagnose_{name}_{tag}.png"
        plot(records, path, title="")
        written.append(path)
    pca_layers = sorted({r["layer"] for r in records if r["metrics"].get("pca")})
    for layer in pca_layers:
        path = folder / f"diagnose_pca_layer{layer}_{tag}.png"
        plot_pca(records, path, layer)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------- summary
def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def summary_rows(records: list[dict]) -> list[dict]:
    """One row per (method, length): over the recorded layers and heads, the largest logit of the last query at
    d < L and at d >= L, how many layers have a larger one beyond L than inside, the entropy in the last position
    bucket minus that just below L (mean over layers and heads), and the mean PCA-layer drift beyond L."""
    methods, lengths, layers = _order(records)
    table = _index(records)
    rows = []
    for method in methods:
        for n in lengths:
            chosen = [table[(method, n, layer)] for layer in layers if (method, n, layer) in table]
            if not chosen:
                continue
            inside = [max(_finite(r["metrics"]["logits"]["max_inside"]), default=None) for r in chosen]
            beyond = [max(_finite(r["metrics"]["logits"]["max_beyond"]), default=None) for r in chosen]
            grows = sum(1 for a, b in zip(inside, beyond) if a is not None and b is not None and b > a)
            rise = []
            for r in chosen:
                entropy = r["metrics"]["entropy"]
                if entropy["at_train_length"] is not None and n > r["pretrain_length"]:
                    last = _finite([row[-1] for row in entropy["mean"]])
                    ref = _finite(entropy["at_train_length"])
                    rise.append(sum(last) / len(last) - sum(ref) / len(ref))
            drift = _finite([r["metrics"]["pca"]["beyond_vs_inside"] for r in chosen if r["metrics"].get("pca")])
            rows.append({
                "method": method, "length": n, "layers": len(chosen),
                "max_inside": max(_finite(inside), default=None), "max_beyond": max(_finite(beyond), default=None),
                "layers_growing": grows if any(b is not None for b in beyond) else None,
                "entropy_rise": sum(rise) / len(rise) if rise else None,
                "pca_drift": sum(drift) / len(drift) if drift else None,
            })
    return rows


def diagnose_table(records: list[dict]) -> str:
    """The summary rows as a markdown table."""
    def fmt(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| method | N | max logit, d < L | max logit, d >= L | layers with a larger one beyond L | entropy: last "
             "bucket - at L (nats) | hidden states beyond L: centroid shift / spread |", "|---|---|---|---|---|---|---|"]
    for row in summary_rows(records):
        growing = "-" if row["layers_growing"] is None else f"{row['layers_growing']}/{row['layers']}"
        lines.append(f"| {row['method']} | {row['length']} | {fmt(row['max_inside'])} | {fmt(row['max_beyond'])} | "
                     f"{growing} | {fmt(row['entropy_rise'], 3)} | {fmt(row['pca_drift'], 3)} |")
    return "\n".join(lines)
