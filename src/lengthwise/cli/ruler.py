"""`lengthwise ruler`: RULER-style long-context tasks (data/ruler.py) under any method, with table and heat-map."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from lengthwise.api import load_model
from lengthwise.cli.app import DeviceOption, DtypeOption, MODEL_HELP, app, check_device_dtype, check_methods_fit
from lengthwise.cli.outputs import NoWaitOption, check_out_file, check_results
from lengthwise.cli.tasks import (RayOption, SCALED_HELP, ThreadsOption, WorkersOption, _checked, _parse_numbers,
                                  cell_pool)
from lengthwise.data.corpus import load_corpus
from lengthwise.eval.passkey import check_depths
from lengthwise.eval.results import ResultsFile
from lengthwise.eval.ruler import MIN_LENGTH, check_tasks, ruler
from lengthwise.eval.tasks import check_lengths, check_specs
from lengthwise.report.tasks import plot_ruler_heatmap, ruler_tables

console = Console()


@app.command("ruler")
def ruler_command(
    model: str = typer.Option("llama-rope-256", help=MODEL_HELP),
    tasks: str = typer.Option("niah_single,niah_multikey,niah_multivalue,niah_multiquery,variable_tracking,"
                              "common_words", help="comma-separated RULER-style tasks"),
    lengths: str = typer.Option("256,512,1024", help="comma-separated prompt lengths in tokens"),
    depths: str = typer.Option("50", help="comma-separated depths of the task sentences, percent (0..100)"),
    method: list[str] = typer.Option(["vanilla", "lm-infinite"], "--method", "-m", help=SCALED_HELP),
    samples: int = typer.Option(3, min=1, help="prompts per cell (seeds --seed .. --seed+samples-1)"),
    seed: int = typer.Option(0),
    haystack: str = typer.Option("filler", help="'filler' (the passkey filler) or a corpus: pg19-dev, a file, a folder"),
    out: Path = typer.Option(Path("results/ruler.jsonl"), help="JSON-lines results (appended; finished cells skipped)"),
    plot: Path = typer.Option(None, help="PNG heat-map of recall by task and length (default: next to --out)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    ray: RayOption = None,
    workers: WorkersOption = 2,
    threads: ThreadsOption = 0,
    no_wait: NoWaitOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """RULER-style tasks (needle variants, variable tracking, common words): recall by (method, task, length)."""

    task_list = _checked(check_tasks, [t.strip() for t in tasks.split(",") if t.strip()])
    length_list = _checked(check_lengths, _parse_numbers(lengths, "lengths"), MIN_LENGTH, "RULER length")
    depth_list = _checked(check_depths, _parse_numbers(depths, "depths", float))
    _checked(check_specs, method)
    check_methods_fit(model, method)
    check_device_dtype(device, dtype, ray)
    check_results(out, "ruler", wait=not no_wait)
    check_out_file(plot, "--plot")
    text = None
    if haystack != "filler":

        text = " ".join(doc.text for doc in _checked(load_corpus, haystack))
    pool = cell_pool(ray, workers, threads, model)
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    records = ruler(lm, tokenizer, task_list, length_list, depth_list, method, samples=samples, seed=seed,
                    haystack=text, haystack_name=haystack, results=ResultsFile(out, wait=not no_wait), model_name=model,
                    progress=not quiet, pool=pool)
    console.print(ruler_tables(records))
    plot = plot or out.with_suffix(".png")
    plot_ruler_heatmap(records, plot)
    console.print(f"results: {out}\nheat-map: {plot}")
