"""Tables (Markdown) and plots (PNG) for the passkey, gen-quality and bench tasks.

Records of a task are grouped by (model, data); inside a group rows are methods (in order of appearance) and
columns are lengths. A later record of the same cell wins (a rerun after a fix replaces the old number).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from lengthwise.report.plots import _pyplot, legend_label, save_figure
from lengthwise.report.tables import markdown_table, ppl_table
from lengthwise.errors import UserError

TASKS = ("ppl", "passkey", "gen-quality", "bench", "ruler")


def group(records: list[dict], task: str) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        if record.get("task") == task:
            groups[(record["model"], record.get("data", ""))].append(record)
    return dict(groups)


def _methods(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in records))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# --- passkey ---------------------------------------------------------------------------------------------------


def _pooled_passkey(records: list[dict], metric: str, cell) -> dict[tuple, tuple[int, int]]:
    """cell(record) -> (correct, trials) summed over the records of that cell. A rerun of a (method, length, depth,
    seed) run counts once, its later record winning; runs with another seed (other keys) are more trials."""
    latest = {(r["method"], r["length"], r["depth"], r.get("seed")): r for r in records if metric in r["metrics"]}
    totals: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for r in latest.values():
        totals[cell(r)][0] += round(r["metrics"][metric] * r["metrics"]["trials"])
        totals[cell(r)][1] += r["metrics"]["trials"]
    return {k: (c, t) for k, (c, t) in totals.items()}


def passkey_accuracy(records: list[dict], metric: str = "accuracy") -> dict[tuple[str, int], tuple[int, int]]:
    """(method, length) -> (correct, trials) summed over depths and seeds; `metric`: "accuracy" (exact answer tokens)
    or "found_accuracy" (the official script's first integer; records that have it)."""
    return _pooled_passkey(records, metric, lambda r: (r["method"], r["length"]))


PASSKEY_METRICS = {"accuracy": "passkey accuracy",
                   "found_accuracy": "passkey found (official metric: first integer of the greedy text)"}


def passkey_tables(records: list[dict]) -> str:
    blocks = []
    cells = [(item, metric) for item in group(records, "passkey").items() for metric in PASSKEY_METRICS]
    for ((model, _), rows), metric in cells:
        totals = passkey_accuracy(rows, metric)
        if not totals:
            continue
        lengths = sorted({n for _, n in totals})
        depths = sorted({r["depth"] for r in rows})
        trials = sorted({r["metrics"]["trials"] for r in rows})
        # Cells pooled over different numbers of trials (a length run at fewer depths) say how many they hold.
        with_counts = len({total for _, total in totals.values()}) > 1
        pooled = ("correct / trials per cell" if with_counts
                  else f"{len(depths)} depths x {'/'.join(map(str, trials))} trials")
        header = [f"{PASSKEY_METRICS[metric]} ({model}; {pooled})"]
        body = []
        for method in [m for m in _methods(rows) if any(key[0] == m for key in totals)]:
            line = [method]
            for n in lengths:
                correct, total = totals.get((method, n), (0, 0))
                count = f" ({correct}/{total})" if with_counts else ""
                line.append(f"{correct / total:.2f}{count}" if total else "-")
            body.append(line)
        blocks.append(markdown_table(header + [str(n) for n in lengths], body))
    return "\n\n".join(blocks)


def passkey_depth_tables(records: list[dict]) -> str:
    """One table per method: accuracy by depth (rows) and length (columns)."""
    blocks = []
    for (model, _), rows in group(records, "passkey").items():
        lengths = sorted({r["length"] for r in rows})
        for method in _methods(rows):
            pooled = _pooled_passkey([r for r in rows if r["method"] == method], "accuracy",
                                     lambda r: (r["depth"], r["length"]))
            cells = {key: correct / trials for key, (correct, trials) in pooled.items()}
            depths = sorted({d for d, _ in cells})
            body = [[f"{d:g}%"] + [_fmt(cells.get((d, n)), ".2f") for n in lengths] for d in depths]
            blocks.append(markdown_table([f"{method} ({model}) depth"] + [str(n) for n in lengths], body))
    return "\n\n".join(blocks)


def _heat_panel(ax, grid: list[list[float]], lengths: list[int], spec: str):
    """One heat-map panel of scores in [0, 1] (rows x lengths), each cell labelled; NaN cells stay blank."""
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            if value == value:  # not NaN
                ax.text(j, i, format(value, spec), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
    return image


def plot_passkey_heatmap(records: list[dict], path: str | Path) -> None:
    """Accuracy by depth (y) and length (x), one panel per method (first model in the records)."""
    plt = _pyplot()
    groups = group(records, "passkey")
    if not groups:
        raise UserError("no passkey records to plot")
    (model, _), rows = next(iter(groups.items()))
    methods = _methods(rows)
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    columns = min(3, len(methods))
    lines = -(-len(methods) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.8 * columns, 3.1 * lines), squeeze=False,
                             constrained_layout=True)
    image = None
    for index, (ax, method) in enumerate(zip(axes.flat, methods)):
        cells = {(r["depth"], r["length"]): r["metrics"]["accuracy"] for r in rows if r["method"] == method}
        grid = [[cells.get((d, n), float("nan")) for n in lengths] for d in depths]
        image = _heat_panel(ax, grid, lengths, ".1f")
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths], fontsize=7)
        ax.set_title(legend_label(method), fontsize=9)
        if index // columns == lines - 1 or index + columns >= len(methods):  # bottom panel of its column
            ax.set_xlabel("length (tokens)", fontsize=8)
        if index % columns == 0:
            ax.set_ylabel("needle depth", fontsize=8)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle(f"passkey accuracy, {model}", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    save_figure(fig, path)


def plot_passkey_by_length(records: list[dict], path: str | Path) -> None:
    """Accuracy (mean over depths) against length, one line per method; training length dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    pretrain = None
    for (model, _), rows in group(records, "passkey").items():
        totals = passkey_accuracy(rows)
        for method in _methods(rows):
            points = sorted((n, c / t) for (m, n), (c, t) in totals.items() if m == method and t)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=legend_label(method))
        pretrain = rows[0].get("pretrain_length", pretrain)
    if pretrain:
        ax.axvline(pretrain, color="grey", linestyle="--", linewidth=1, label=f"training length {pretrain}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


# --- generation quality ----------------------------------------------------------------------------------------


def gen_quality_tables(records: list[dict]) -> str:
    blocks = []
    for (model, data), rows in group(records, "gen-quality").items():
        cells = {(r["method"], r["length"]): r["metrics"] for r in rows}
        lengths = sorted({n for _, n in cells})
        docs = sorted({m["docs"] for m in cells.values()})
        header = [f"BLEU / ROUGE-L ({model}, {data}, {'/'.join(map(str, docs))} docs)"] + [str(n) for n in lengths]
        body = [[method] + [f"{cells[(method, n)]['bleu']:.2f} / {cells[(method, n)]['rougeL']:.3f}"
                            if (method, n) in cells else "-" for n in lengths] for method in _methods(rows)]
        blocks.append(markdown_table(header, body))
    return "\n\n".join(blocks)


def plot_gen_quality(records: list[dict], path: str | Path) -> None:
    """BLEU and ROUGE-L against prefix length, one line per method, one row of panels per (model, data)."""
    plt = _pyplot()
    groups = group(records, "gen-quality")
    if not groups:
        raise UserError("no gen-quality records to plot")
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.8 * len(groups)), squeeze=False)
    for (model, data), ax_row in zip(groups, axes):
        rows = groups[(model, data)]
        for metric, ax in zip(("bleu", "rougeL"), ax_row):
            for method in _methods(rows):
                points = sorted((r["length"], r["metrics"][metric]) for r in rows if r["method"] == method)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=legend_label(method))
            pretrain = rows[0].get("pretrain_length")
            if pretrain:
                ax.axvline(pretrain, color="grey", linestyle="--", linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prefix length (tokens)")
            ax.set_ylabel("BLEU" if metric == "bleu" else "ROUGE-L F1")
            ax.set_title(f"{model}, {data}", fontsize=9)
            ax.grid(alpha=0.3)
        ax_row[0].legend(fontsize=7, ncol=2)
    save_figure(fig, path)


# --- speed -----------------------------------------------------------------------------------------------------

BENCH_METRICS = (("prefill_s", "prefill s", ".3f"), ("decode_s_per_token", "decode ms/token", None),
                 ("peak_memory_mib", "peak MiB", ".0f"))


def bench_tables(records: list[dict]) -> str:
    blocks = []
    for (model, _), rows in group(records, "bench").items():
        cells = {(r["method"], r["length"]): r["metrics"] for r in rows}
        lengths = sorted({n for _, n in cells})
        where = sorted({f"{r.get('device')}, {r.get('dtype')}, {r.get('torch_threads')} threads" for r in rows})
        for key, label, spec in BENCH_METRICS:
            header = [f"{label} ({model}; {'; '.join(where)})"] + [str(n) for n in lengths]
            body = []
            for method in _methods(rows):
                values = []
                for n in lengths:
                    value = cells.get((method, n), {}).get(key)
                    values.append(_fmt(None if value is None else value * 1000, ".2f") if spec is None
                                  else _fmt(value, spec))
                body.append([method] + values)
            blocks.append(markdown_table(header, body))
    return "\n\n".join(blocks)


def plot_bench(records: list[dict], path: str | Path) -> None:
    plt = _pyplot()
    groups = group(records, "bench")
    if not groups:
        raise UserError("no bench records to plot")
    fig, axes = plt.subplots(len(groups), 3, figsize=(14, 3.8 * len(groups)), squeeze=False)
    for ((model, _), rows), ax_row in zip(groups.items(), axes):
        for (key, label, _), ax in zip(BENCH_METRICS, ax_row):
            for method in _methods(rows):
                points = sorted((r["length"], r["metrics"][key]) for r in rows if r["method"] == method)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=legend_label(method))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("length (tokens)")
            ax.set_ylabel(label.replace("ms/token", "s/token"))
            ax.set_title(model[:60], fontsize=8)
            ax.grid(alpha=0.3)
        ax_row[0].legend(fontsize=7)
    save_figure(fig, path)


# --- all tasks -------------------------------------------------------------------------------------------------


def task_tables(records: list[dict]) -> str:
    """Markdown tables of every task present in `records`."""
    parts = []
    if any(r.get("task") == "ppl" for r in records):
        parts.append(ppl_table([r for r in records if r.get("task") == "ppl"]))
    for task, fn in (("passkey", passkey_tables), ("gen-quality", gen_quality_tables), ("bench", bench_tables),
                     ("ruler", ruler_tables)):
        if any(r.get("task") == task for r in records):
            parts.append(fn(records))
    return "\n\n".join(parts)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "results"


# --- RULER-style tasks -----------------------------------------------------------------------------------------


def ruler_tables(records: list[dict]) -> str:
    """One table per (model, haystack): rows method / task, columns lengths, cells mean recall over depths."""
    blocks = []
    for (model, data), rows in group(records, "ruler").items():
        latest = {(r["method"], r["ruler_task"], r["length"], r["depth"]): r for r in rows}
        lengths = sorted({key[2] for key in latest})
        samples = sorted({r["metrics"]["samples"] for r in latest.values()})
        header = [f"RULER recall ({model}, haystack {data}; {'/'.join(map(str, samples))} samples per cell)"]
        body = []
        for method in _methods(rows):
            for task in dict.fromkeys(r["ruler_task"] for r in rows):
                line = [f"{method} / {task}"]
                for n in lengths:
                    cells = [r["metrics"]["recall"] for k, r in latest.items() if k[:3] == (method, task, n)]
                    line.append(f"{sum(cells) / len(cells):.2f}" if cells else "-")
                body.append(line)
        blocks.append(markdown_table(header + [str(n) for n in lengths], body))
    return "\n\n".join(blocks)


def plot_ruler_heatmap(records: list[dict], path: str | Path) -> None:
    """Recall by task (y) and length (x), one panel per method (first model in the records)."""
    plt = _pyplot()
    groups = group(records, "ruler")
    if not groups:
        raise UserError("no RULER records to plot")
    (model, data), rows = next(iter(groups.items()))
    methods, tasks = _methods(rows), list(dict.fromkeys(r["ruler_task"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 0.45 * len(tasks) + 1.6), squeeze=False,
                             constrained_layout=True)
    image = None
    for index, (ax, method) in enumerate(zip(axes.flat, methods)):
        cells: dict = defaultdict(list)
        for r in rows:
            if r["method"] == method:
                cells[(r["ruler_task"], r["length"])].append(r["metrics"]["recall"])
        grid = [[sum(cells[(t, n)]) / len(cells[(t, n)]) if cells[(t, n)] else float("nan") for n in lengths]
                for t in tasks]
        image = _heat_panel(ax, grid, lengths, ".2f")
        ax.set_yticks(range(len(tasks)), tasks if index == 0 else [""] * len(tasks), fontsize=7)
        ax.set_title(legend_label(method), fontsize=9)
        ax.set_xlabel("length (tokens)", fontsize=8)
    fig.suptitle(f"RULER-style recall, {model}, haystack {data}", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="recall")
    save_figure(fig, path)
