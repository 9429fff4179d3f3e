"""`lengthwise temp-lora eval`: PPL by context-position bucket with and without a Temp-LoRA, same windows."""

from __future__ import annotations

from pathlib import Path

import typer

from lengthwise.api import load_model
from lengthwise.cli.app import (DeviceOption, DtypeOption, MODEL_HELP, app, check_device_dtype, check_methods,
                                parse_int_list)
from lengthwise.cli.outputs import NoWaitOption, check_results
from lengthwise.data.corpus import load_corpus
from lengthwise.eval.results import ResultsFile
from lengthwise.registry import get_method, is_scorer, parse_method_spec
from lengthwise.report.tables import markdown_table
from lengthwise.temp_lora import TempLoraConfig
from lengthwise.temp_lora.adapter import check_targets
from lengthwise.temp_lora.evaluate import comparison_rows, pool, run_arm, select_documents

temp_lora_app = typer.Typer(help="Temp-LoRA (Wang et al. 2024): a temporary LoRA trained at inference time on the "
                                 "text read.",
                            no_args_is_help=True)
app.add_typer(temp_lora_app, name="temp-lora")


def build_config(chunk: int, window: int, keep: int | None, rank: int, alpha: float, targets: str, lr: float,
                 steps: int, reuse_cache: bool, seed: int = 0):
    """TempLoraConfig from CLI options; a bad value becomes a usage error naming it."""

    target_modules = targets if targets == "all-linear" else tuple(t.strip() for t in targets.split(",") if t.strip())
    try:
        return TempLoraConfig(chunk_size=chunk, window=window, keep=keep, rank=rank, alpha=alpha,
                              target_modules=target_modules, lr=lr, steps_per_chunk=steps, reuse_cache=reuse_cache,
                              seed=seed)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def check_window_method(method: str | None) -> str | None:
    """The long-context method for the window itself: a patch (not a scoring strategy), or none."""
    if not method or method == "vanilla":
        return None

    check_methods([method])
    for name, _ in parse_method_spec(method):
        if is_scorer(name) or get_method(name).role == "none":
            raise typer.BadParameter(
                f"{name!r} is a scoring strategy, not a patch; Temp-LoRA already scores window by window. "
                "Give a long-context patch for the window (e.g. yarn, lm-infinite) or none"
            )
    return method


@temp_lora_app.command("eval")
def eval_command(
    model: str = typer.Option("llama-rope-256", help=MODEL_HELP),
    data: str = typer.Option("stdlib", help="corpus: stdlib, pg19-dev, a local file/folder, hf:NAME"),
    max_docs: int = typer.Option(4, min=1, help="documents (the longest ones, unless --corpus-order)"),
    max_tokens: int = typer.Option(8192, min=0, help="cap tokens per document (0: whole documents)"),
    min_tokens: int = typer.Option(1024, min=2, help="skip documents shorter than this"),
    corpus_order: bool = typer.Option(False, help="take documents in corpus order instead of longest first"),
    chunk: int = typer.Option(64, min=1, help="tokens scored between two LoRA updates"),
    window: int = typer.Option(256, min=1, help="tokens the model attends to (KV cache capacity)"),
    keep: int = typer.Option(None, help="context kept on overflow (default window - chunk)"),
    rank: int = typer.Option(8, min=1),
    alpha: float = typer.Option(16.0),
    targets: str = typer.Option("all-linear", help="'all-linear' or comma-separated module names (q_proj,v_proj)"),
    lr: float = typer.Option(2e-3),
    steps: int = typer.Option(1, min=1, help="optimizer steps per chunk"),
    reuse_cache: bool = typer.Option(True, help="keep KV states from older LoRA weights until the window overflows"),
    method: str = typer.Option(None, "--method", "-m", help="long-context patch for the window (e.g. yarn:factor=2)"),
    buckets: str = typer.Option("1024,2048,4096,8192", help="context-position bucket edges (tokens)"),
    baseline: bool = typer.Option(True, help="also run the same windows without the LoRA"),
    out: Path = typer.Option(Path("results/temp_lora.jsonl"), help="JSON-lines results (resumable)"),
    no_wait: NoWaitOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Score each chunk, then train the LoRA on it; report PPL by context position against no LoRA."""
    from dataclasses import replace  # noqa: PLC0415

    config = build_config(chunk, window, keep, rank, alpha, targets, lr, steps, reuse_cache)
    method = check_window_method(method)
    edges = (0, *parse_int_list(buckets, "bucket edges"))
    check_device_dtype(device, dtype)
    check_results(out, "temp-lora", wait=not no_wait)
    try:
        documents = load_corpus(data)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from None
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    try:
        check_targets(lm, config.target_modules)
        docs = select_documents(documents, tokenizer, max_docs, max_tokens or None, min_tokens, not corpus_order)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    results = ResultsFile(out, wait=not no_wait)
    common = dict(method=method, results=results, model_name=model, data_name=data, edges=edges)
    lora = pool(run_arm(lm, docs, config, arm="lora", **common))
    typer.echo(f"{len(docs)} documents, {lora['tokens']} scored tokens; chunk {chunk}, window {window}")
    if baseline:
        base = pool(run_arm(lm, docs, replace(config, steps_per_chunk=0), arm="base", **common))
        typer.echo(markdown_table(["context position", "tokens", "PPL without", "PPL with Temp-LoRA", "change"],
                                  comparison_rows(base, lora)))
        typer.echo(f"ms/token: {base['ms_per_token']:.2f} without, {lora['ms_per_token']:.2f} with; "
                   f"GFLOPs/token: {base['flops_per_token'] / 1e9:.4f} without, {lora['flops_per_token'] / 1e9:.4f} with")
    else:
        typer.echo(f"PPL with Temp-LoRA: {lora['ppl']:.3f}")
    typer.echo(f"results: {out}")
