"""`lengthwise models`, `lengthwise ppl`, `lengthwise demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lengthwise.api import REFERENCE_MODELS_DIR, bundled_models, load_model
from lengthwise.cli.app import (DeviceOption, DtypeOption, METHODS_HELP, MODEL_HELP, app, check_device_dtype,
                                check_methods, check_methods_fit, parse_int_list)
from lengthwise.cli.outputs import NoWaitOption, check_out_file, check_results
from lengthwise.cli.tasks import RayOption, ThreadsOption, WorkersOption, cell_pool
from lengthwise.data.corpus import load_corpus
from lengthwise.eval import streaming
from lengthwise.eval.perplexity import perplexity
from lengthwise.eval.results import ResultsFile
from lengthwise.models.real import REAL_MODELS, installed_file
from lengthwise.report.plots import plot_nll_by_position
from lengthwise.report.tables import ppl_table

console = Console()


@app.command("models")
def list_models() -> None:
    """List the bundled tiny reference models and the registered real models (source, training length, where)."""
    import json  # noqa: PLC0415

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
    model: str = typer.Option("llama-rope-256", help=MODEL_HELP),
    data: str = typer.Option("stdlib", help="stdlib | stdlib-train | pg19-dev | pg19-train | hf:NAME[:SPLIT] | PATH"),
    lengths: str = typer.Option("256,512,1024,2048", help="comma-separated token lengths"),
    method: list[str] = typer.Option(["vanilla", "sliding-window"], "--method", "-m", help=METHODS_HELP),
    max_docs: int = typer.Option(8, min=1, help="documents per length (the longest enough ones, in corpus order)"),
    chunk_size: int = typer.Option(0, min=0, help="feed documents chunk by chunk through the method's cache (0: one pass)"),
    out: Path = typer.Option(Path("results/ppl.jsonl"), help="JSON-lines results (appended; finished cells skipped)"),
    plot: Path = typer.Option(None, help="PNG of NLL by position (default: next to --out)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    # streaming mode (Annotated: plain Python defaults, so `demo` and other callers need not pass them)
    stream_tokens: Annotated[str | None, typer.Option(
        "--stream-tokens", help="streaming mode: score ONE stream of this many tokens (e.g. 200000, 200k, 10M): the "
        "documents of --data joined (several corpora: 'pg19-train,pg19-dev'), fed --chunk-size tokens at a time "
        "(default: the training length, at most 2048) through each method's bounded KV cache (lm-infinite, "
        "streaming, or the sliding-window baseline); checkpointed beside --out and resumed by running the same "
        "command again. --lengths and --max-docs do not apply")] = None,
    buckets: Annotated[int, typer.Option(min=1, help="streaming mode: number of position buckets")] = 32,
    bucket_scale: Annotated[str, typer.Option(help="streaming mode: bucket widths, log | linear")] = "log",
    checkpoint_every: Annotated[str | None, typer.Option(
        help="streaming mode: tokens between checkpoints (default: a tenth of the stream; also every 10 minutes)")
    ] = None,
    stop_after_chunks: Annotated[int | None, typer.Option(
        min=1, hidden=True, help="streaming mode: checkpoint and stop after this many chunks (tests)")] = None,
    ray: RayOption = None,
    workers: WorkersOption = 2,
    threads: ThreadsOption = 0,
    no_wait: NoWaitOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Perplexity by length for one or more methods: table, JSON lines, NLL-by-position plot. With --stream-tokens:
    perplexity of one long stream through each method's bounded cache, NLL by position bucket, resumable."""
    if stream_tokens is not None:
        if ray:
            raise typer.BadParameter("--ray runs cells of lengths and methods; the streaming mode (--stream-tokens) "
                                     "is one stream per method: run it without --ray")
        _ppl_stream(model, data, method, chunk_size, out, plot, quiet, stream_tokens, buckets, bucket_scale,
                    checkpoint_every, stop_after_chunks, not no_wait, device, dtype)
        return

    length_list = parse_int_list(lengths)
    check_methods(method)
    check_methods_fit(model, method)
    check_device_dtype(device, dtype, ray)
    check_results(out, "ppl", wait=not no_wait)
    check_out_file(plot, "--plot")
    documents = load_corpus(data)
    pool = cell_pool(ray, workers, threads, model)
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    records = perplexity(lm, tokenizer, documents, length_list, method, max_docs=max_docs,
                         chunk_size=chunk_size or None, results=ResultsFile(out, wait=not no_wait), model_name=model,
                         data_name=data, progress=not quiet, pool=pool)
    console.print(ppl_table(records, markdown=False))
    skipped = {r["length"]: r["metrics"]["skipped"] for r in records}
    if any(skipped.values()):
        console.print(f"documents shorter than the length, skipped: {skipped}")
    plot = plot or out.with_suffix(".png")
    plot_nll_by_position(records, plot, title=f"{model} on {data}")
    console.print(f"results: {out}\nplot: {plot}")


def _ppl_stream(model: str, data: str, methods: list[str], chunk_size: int, out: Path, plot: Path | None, quiet: bool,
                stream_tokens: str, buckets: int, bucket_scale: str, checkpoint_every: str | None,
                stop_after_chunks: int | None, wait: bool = True, device: str = "cpu",
                dtype: str = "float32") -> None:
    """`lengthwise ppl --stream-tokens N`: lengthwise.eval.streaming over the joined documents of --data."""
    import sys  # noqa: PLC0415

    try:  # every check before the model is loaded
        n_tokens = streaming.parse_token_count(stream_tokens, "--stream-tokens")
        every = streaming.parse_token_count(checkpoint_every, "--checkpoint-every") if checkpoint_every else None
        streaming.bucket_edges(n_tokens, buckets, bucket_scale)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    check_methods(methods)
    check_methods_fit(model, methods)
    check_device_dtype(device, dtype)
    for spec in methods:
        reason = streaming.unbounded_reason(spec)
        if reason:
            raise typer.BadParameter(reason)
    check_results(out, "ppl", wait=wait)
    check_out_file(plot, "--plot")
    sources = streaming.stream_sources(data)
    if n_tokens > streaming.EXACT_FLOAT32_POSITIONS:
        print(f"warning: positions beyond {streaming.EXACT_FLOAT32_POSITIONS:,} are not exact in float32; RoPE "
              "angles there lose precision (docs/evaluation.md)", file=sys.stderr)

    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    results = ResultsFile(out, wait=wait)
    checkpoints = out.with_name(out.stem + ".stream")
    records = []
    for spec in methods:
        record = streaming.streaming_perplexity(
            lm, tokenizer, sources, n_tokens, spec, chunk_size=chunk_size or None, num_buckets=buckets,
            bucket_scale=bucket_scale, checkpoint_dir=checkpoints, checkpoint_every=every, results=results,
            model_name=model, data_name=data, max_chunks=stop_after_chunks, progress=not quiet, log=console.print)
        if record is None:
            console.print(f"stopped after {stop_after_chunks} chunks; checkpoint in {checkpoints}; run the same "
                          "command again to resume")
            return
        records.append(record)
    console.print(ppl_table(records, markdown=False))
    for record in records:
        memory = record["stream"]["memory"]
        first = memory[0] if len(memory) > 1 else memory[-1]
        console.print(f"{record['method']}: {record['metrics']['tokens_per_s']} tokens/s; RSS {first['rss_mib']} MiB "
                      f"at token {first['offset']:,}, {memory[-1]['rss_mib']} MiB at the end (peak "
                      f"{memory[-1]['peak_rss_mib']} MiB)")
    plot = plot or out.with_suffix(".png")
    plot_nll_by_position(records, plot, title=f"{model} on {data}, one stream of {n_tokens:,} tokens")
    console.print(f"results: {out}\nplot: {plot}\ncheckpoints and snapshots: {checkpoints}")


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("results/demo"), help="folder for the results and the plot"),
    quick: bool = typer.Option(False, help="the bundled tiny model on stdlib files instead (about 30 s)"),
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """The main job: the real model (SmolLM2-135M, trained at 8192 tokens) on a held-out PG19 book at 1x and 2x its
    training length, vanilla vs the sliding-window baseline vs lm-infinite. --quick: the bundled tiny RoPE model on
    held-out stdlib files, 256..4096 tokens."""
    if quick:
        ppl_command(model="llama-rope-256", data="stdlib", lengths="256,512,1024,2048,4096",
                    method=["vanilla", "sliding-window", "lm-infinite"], max_docs=4,
                    chunk_size=0, out=out / "ppl.jsonl", plot=out / "ppl.png", quiet=False, device=device,
                    dtype=dtype)
        return
    ppl_command(model="smollm2-135m", data="pg19-dev", lengths="8192,16384",
                method=["vanilla", "sliding-window:stride=4096", "lm-infinite"], max_docs=1,
                chunk_size=0, out=out / "ppl_smollm2-135m.jsonl", plot=out / "ppl_smollm2-135m.png", quiet=False,
                device=device, dtype=dtype)
