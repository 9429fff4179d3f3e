"""`build_report`: Markdown tables and PNG plots for any mix of ppl / passkey / gen-quality / bench / ruler results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lengthwise.io import atomic_write_text, read_jsonl
from lengthwise.report.plots import plot_nll_by_position
from lengthwise.report.tables import ppl_table
from lengthwise.report.tasks import (
    TASKS,
    bench_tables,
    gen_quality_tables,
    group,
    passkey_depth_tables,
    passkey_tables,
    plot_bench,
    plot_gen_quality,
    plot_passkey_by_length,
    plot_passkey_heatmap,
    plot_ruler_heatmap,
    ruler_tables,
    slug,
)
from lengthwise.errors import UserError


def read_results(paths: Sequence[str | Path]) -> list[dict]:
    """Records of every results file, in order; a missing file, or one holding no record, is an error."""
    if not paths:
        raise UserError("no results file given")
    records = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} not found")
        found = [r for r in read_jsonl(path) if isinstance(r, dict) and r.get("task")]
        if not found:
            raise UserError(f"{path} holds no results records (JSON lines with a 'task' field)")
        records.extend(found)
    unknown = sorted({r["task"] for r in records} - set(TASKS))
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)} in the results; accepted: {', '.join(TASKS)}")
    return records


def build_report(paths: Sequence[str | Path], out_dir: str | Path, title: str = "lengthwise results") -> Path:
    """Write `out_dir/report.md` (tables per task) and its PNG plots; returns the Markdown path."""
    records = read_results(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = ", ".join(f"`{Path(p).name}`" for p in paths)
    lines = [f"# {title}", "", f"From {sources}: {len(records)} records.", ""]

    def figure(name: str, caption: str) -> None:
        lines.extend([f"![{caption}]({name})", ""])

    ppl = [r for r in records if r["task"] == "ppl"]
    if ppl:
        lines += ["## Perplexity by length", "", ppl_table(ppl), ""]
        for (model, data), rows in group(records, "ppl").items():
            name = f"ppl_{slug(model)}_{slug(data)}.png"
            plot_nll_by_position(rows, out_dir / name, title=f"{model} on {data}")
            figure(name, f"NLL by position, {model} on {data}")
    if group(records, "passkey"):
        lines += ["## Passkey retrieval", "", "Accuracy (exact match of the key), all depths pooled:", "",
                  passkey_tables(records), ""]
        for (model, _), rows in group(records, "passkey").items():
            heat, curve = f"passkey_heatmap_{slug(model)}.png", f"passkey_by_length_{slug(model)}.png"
            plot_passkey_heatmap(rows, out_dir / heat)
            plot_passkey_by_length(rows, out_dir / curve)
            figure(curve, f"passkey accuracy by length, {model}")
            figure(heat, f"passkey accuracy by depth and length, {model}")
        lines += ["By depth:", "", passkey_depth_tables(records), ""]
    if group(records, "gen-quality"):
        lines += ["## Generation quality", "", "Corpus BLEU / mean ROUGE-L F1 of the greedy continuation:", "",
                  gen_quality_tables(records), ""]
        rows = [r for r in records if r["task"] == "gen-quality"]
        plot_gen_quality(rows, out_dir / "gen_quality.png")
        figure("gen_quality.png", "BLEU and ROUGE-L by prefix length")
    if group(records, "bench"):
        lines += ["## Speed and memory", "", bench_tables(records), ""]
        plot_bench([r for r in records if r["task"] == "bench"], out_dir / "bench.png")
        figure("bench.png", "prefill, decode and peak memory by length")
    if group(records, "ruler"):
        lines += ["## RULER-style tasks", "", "Mean recall of the expected strings in the greedy answer:", "",
                  ruler_tables(records), ""]
        for (model, data), rows in group(records, "ruler").items():
            name = f"ruler_{slug(model)}_{slug(data)}.png"
            plot_ruler_heatmap(rows, out_dir / name)
            figure(name, f"RULER-style recall by task and length, {model}")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
