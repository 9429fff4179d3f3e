"""`lengthwise methods`, `lengthwise models`, `lengthwise ppl`, `lengthwise demo`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lengthwise.cli.app import METHODS_HELP, app, check_methods, check_methods_fit, parse_int_list
from lengthwise.cli.outputs import check_out_file, check_results

console = Console()


@app.command("methods")
def list_methods(markdown: bool = typer.Option(False, help="print the Markdown page docs/methods.md instead")) -> None:
    """List the registered methods (the same registry the API and docs read)."""
    from lengthwise.registry import get_method, method_names, registry_markdown  # noqa: PLC0415

    if markdown:
        print(registry_markdown())
        return
    table = Table("method", "role", "paper", "what it does")
    for name in method_names():
        spec = get_method(name)
        table.add_row(name, spec.role, spec.paper, spec.summary)
    console.print(table)


@app.command("models")
def list_models() -> None:
    """List the bundled tiny reference models and the registered real models (source, training length, where)."""
    import json  # noqa: PLC0415

    from lengthwise.api import REFERENCE_MODELS_DIR, bundled_models  # noqa: PLC0415
    from lengthwise.models.real import REAL_MODELS, installed_file  # noqa: PLC0415

    table = Table("model", "kind", "training length", "source", "where")
    for name in bundled_models():
        config = json.loads((REFERENCE_MODELS_DIR / name / "config.json").read_text())
        table.add_row(name, "bundled tiny", str(config.get("max_position_embeddings", "?")),
                      "trained by lengthwise.training.reference", str(REFERENCE_MODELS_DIR / name))
    for name, real in REAL_MODELS.items():
        path = installed_file(real)
        table.add_row(name, f"real ({real.licence})", str(real.pretrain_length), real.source,
                      str(path) if path else f"not installed: {real.install}")
    console.print(table)


@app.command("ppl")
def ppl_command(
    model: str = typer.Option("llama-rope-256", help="bundled model name, local HF folder, or hub id"),
    data: str = typer.Option("stdlib", help="stdlib | stdlib-train | pg19-dev | pg19-train | hf:NAME[:SPLIT] | PATH"),
    lengths: str = typer.Option("256,512,1024,2048", help="comma-separated token lengths"),
    method: list[str] = typer.Option(["vanilla", "sliding-window"], "--method", "-m", help=METHODS_HELP),
    max_docs: int = typer.Option(8, min=1, help="documents per length (the longest enough ones, in corpus order)"),
    chunk_size: int = typer.Option(0, min=0, help="feed documents chunk by chunk through the method's cache (0: one pass)"),
    out: Path = typer.Option(Path("results/ppl.jsonl"), help="JSON-lines results (appended; finished cells skipped)"),
    plot: Path = typer.Option(None, help="PNG of NLL by position (default: next to --out)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Perplexity by length for one or more methods: table, JSON lines, NLL-by-position plot."""
    from lengthwise.api import load_model  # noqa: PLC0415
    from lengthwise.data.corpus import load_corpus  # noqa: PLC0415
    from lengthwise.eval.perplexity import perplexity  # noqa: PLC0415
    from lengthwise.eval.results import ResultsFile  # noqa: PLC0415
    from lengthwise.report.plots import plot_nll_by_position  # noqa: PLC0415
    from lengthwise.report.tables import ppl_table  # noqa: PLC0415

    length_list = parse_int_list(lengths)
    check_methods(method)
    check_methods_fit(model, method)
    check_results(out, "ppl")
    check_out_file(plot, "--plot")
    documents = load_corpus(data)
    lm, tokenizer = load_model(model)
    records = perplexity(lm, tokenizer, documents, length_list, method, max_docs=max_docs,
                         chunk_size=chunk_size or None, results=ResultsFile(out), model_name=model,
                         data_name=data, progress=not quiet)
    console.print(ppl_table(records, markdown=False))
    skipped = {r["length"]: r["metrics"]["skipped"] for r in records}
    if any(skipped.values()):
        console.print(f"documents shorter than the length, skipped: {skipped}")
    plot = plot or out.with_suffix(".png")
    plot_nll_by_position(records, plot, title=f"{model} on {data}")
    console.print(f"results: {out}\nplot: {plot}")


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("results/demo"), help="folder for the results and the plot"),
    quick: bool = typer.Option(False, help="the bundled tiny model on stdlib files instead (about 30 s)"),
) -> None:
    """The main job: the real model (SmolLM2-135M, trained at 8192 tokens) on a held-out PG19 book at 1x and 2x its
    training length, vanilla vs the sliding-window baseline vs lm-infinite. --quick: the bundled tiny RoPE model on
    held-out stdlib files, 256..4096 tokens."""
    if quick:
        ppl_command(model="llama-rope-256", data="stdlib", lengths="256,512,1024,2048,4096",
                    method=["vanilla", "sliding-window", "lm-infinite"], max_docs=4,
                    chunk_size=0, out=out / "ppl.jsonl", plot=out / "ppl.png", quiet=False)
        return
    ppl_command(model="smollm2-135m", data="pg19-dev", lengths="8192,16384",
                method=["vanilla", "sliding-window:stride=4096", "lm-infinite"], max_docs=1,
                chunk_size=0, out=out / "ppl_smollm2-135m.jsonl", plot=out / "ppl_smollm2-135m.png", quiet=False)
