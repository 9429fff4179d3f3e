"""`lengthwise diagnose`: LM-Infinite's three out-of-distribution diagnostics (logits at unseen distances, attention
entropy, the hidden states' implicit position), per method and length (lengthwise.eval.diagnose).

Every argument is checked before the model loads (methods, lengths, layer and head lists, the output folder); the
layer and head numbers again once the model tells how many it has. Records are JSON lines in the one schema
(`<out>/diagnose_<model>.jsonl`, one per method x length x layer, appended, locked; finished cells skipped on a
rerun); figures `diagnose_*.png` go to `--figures` (default: `--out`).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from lengthwise.api import load_model
from lengthwise.cli.app import METHODS_HELP, MODEL_HELP, app, check_methods, check_methods_fit, parse_int_list
from lengthwise.cli.outputs import NoWaitOption, check_out_dir, check_results
from lengthwise.cli.tasks import ThreadsOption
from lengthwise.data.corpus import load_corpus
from lengthwise.eval.diagnose import DiagnoseSettings, check_method, diagnose
from lengthwise.eval.results import ResultsFile
from lengthwise.report.diagnose import diagnose_figures, diagnose_table, model_tag

console = Console()


def parse_index_list(text: str | None, option: str) -> tuple[int, ...] | None:
    """'0,1,15' -> (0, 1, 15); None or 'all' -> None; anything else one line naming the option."""
    if text is None or text.strip() == "all":
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option} must be comma-separated integers >= 0 (or 'all'), got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise typer.BadParameter(f"{option} must be comma-separated integers >= 0 (or 'all'), got {text!r}")
    return tuple(dict.fromkeys(values))


@app.command("diagnose")
def diagnose_command(
    model: str = typer.Option("llama-rope-256", help=MODEL_HELP),
    data: str = typer.Option("stdlib", help="stdlib | stdlib-train | pg19-dev | pg19-train | hf:NAME[:SPLIT] | PATH "
                             "(the first document with max(--lengths) tokens is read)"),
    lengths: str = typer.Option("256,1024", help="comma-separated token lengths N (one pass per method and N)"),
    method: list[str] = typer.Option(["vanilla", "lm-infinite"], "--method", "-m", help=METHODS_HELP),
    out: Path = typer.Option(Path("results/diagnose"), help="folder for the records (diagnose_<model>.jsonl, "
                             "resumable) and, without --figures, the figures"),
    figures: Path = typer.Option(None, help="folder for the PNG figures (default: --out)"),
    layers: str = typer.Option(None, help="layers recorded, comma-separated (default: all)"),
    heads: str = typer.Option(None, help="attention heads recorded, comma-separated (default: all); the figures show "
                              "the first"),
    pca_layers: str = typer.Option(None, help="layers whose hidden states get a 2-D PCA (default: the first and the "
                                   "last of --layers)"),
    queries: int = typer.Option(16, min=1, help="entropy: queries sampled per log-spaced position bucket"),
    first_tokens: int = typer.Option(10, min=1, help="PCA: the first tokens marked (and measured as a group)"),
    block: int = typer.Option(128, min=1, help="entropy: queries per blocked logit computation"),
    threads: ThreadsOption = 0,
    quiet: bool = typer.Option(False, help="no progress bar"),
    no_wait: NoWaitOption = False,
) -> None:
    """Which of LM-Infinite's out-of-distribution factors a method removes: the last query's logits by distance,
    attention entropy by position, a PCA of hidden states; JSON lines and figures."""

    length_list = parse_int_list(lengths)
    check_methods(method)
    check_methods_fit(model, method)
    for spec in method:
        check_method(spec)
    layer_list = parse_index_list(layers, "--layers")
    head_list = parse_index_list(heads, "--heads")
    pca_list = parse_index_list(pca_layers, "--pca-layers")
    check_out_dir(out)
    check_out_dir(figures, "--figures")

    results_path = out / f"diagnose_{model_tag(model)}.jsonl"
    check_results(results_path, "diagnose", wait=not no_wait)

    documents = load_corpus(data)
    if threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)

    lm, tokenizer = load_model(model)
    recorded = layer_list if layer_list is not None else tuple(range(lm.config.num_hidden_layers))
    if pca_list is None:
        pca_list = tuple(dict.fromkeys((recorded[0], recorded[-1])))
    settings = DiagnoseSettings(layer_list, head_list, pca_list, queries, first_tokens, block)
    records = diagnose(lm, tokenizer, documents, length_list, method, settings,
                       results=ResultsFile(results_path, wait=not no_wait), model_name=model, data_name=data,
                       progress=not quiet, log=console.print)
    typer.echo(diagnose_table(records))
    written = diagnose_figures(records, figures or out, model)
    console.print(f"results: {results_path}\nfigures: " + ", ".join(str(p) for p in written))
