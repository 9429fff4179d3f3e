"""`lengthwise passkey`, `lengthwise gen-quality`, `lengthwise bench`: the long-context tasks beyond perplexity.

Every argument is checked (methods, lengths, depths, corpus, the memory the longest cell needs) before the model
runs. Results are JSON lines in the one schema (eval/results.py), appended; finished cells are skipped on a rerun.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lengthwise import distributed
from lengthwise.api import load_model, resolve_dtype
from lengthwise.cli.app import (DecodeKvOption, DecodeWeightsOption, DeviceOption, DtypeOption, METHODS_HELP,
                                MODEL_HELP, app, check_decode, check_device_dtype, check_methods_fit)
from lengthwise.cli.outputs import NoWaitOption, check_out_file, check_results
from lengthwise.data.corpus import load_corpus
from lengthwise.eval.cells import RayPool
from lengthwise.eval.gen_quality import gen_quality
from lengthwise.eval.passkey import MIN_PROMPT_TOKENS, check_depths, passkey
from lengthwise.eval.results import ResultsFile
from lengthwise.eval.speed import bench, build_llama
from lengthwise.eval.tasks import check_lengths, check_memory, check_specs, gib
from lengthwise.report.tasks import plot_gen_quality, plot_passkey_heatmap, task_tables

console = Console()

SCALED_HELP = METHODS_HELP + ". `{s}` in a spec becomes length / training length (e.g. 'yarn:factor={s}')"
MEMORY_HELP = "memory this run may use, GiB (default: 80% of what is available now); checked before the model runs"


RAY_HELP = ("run the cells on Ray: 'local' starts a Ray instance here, or a cluster address ('auto', "
            "'ray://host:10001'); one model load per worker, results as a serial run's (pip install 'lengthwise[ray]')")
RayOption = Annotated[str | None, typer.Option("--ray", help=RAY_HELP)]
WorkersOption = Annotated[int, typer.Option(min=1, help="with --ray: workers, each one model copy and one CPU")]
ThreadsOption = Annotated[int, typer.Option(
    min=0, help="torch threads (of each Ray worker with --ray; 0: torch's default, or 1 on Ray); records are "
    "identical between runs with equal threads")]


def cell_pool(ray: str | None, workers: int, threads: int, model: str):
    """The Ray pool `--ray` asks for (None: run here, with `threads` torch threads if given); checked before the
    model loads."""
    if threads and not ray:
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)
    if not ray:
        return None

    if not distributed.ray_available():
        raise typer.BadParameter("--ray needs Ray: pip install 'lengthwise[ray]' (omit --ray to run the cells here)")
    if Path(model).exists():  # workers may start elsewhere: give them the absolute path
        model = str(Path(model).resolve())
    return RayPool(model, workers=workers, address=ray, threads=threads or 1)


def _parse_numbers(text: str, what: str, cast=int) -> list:
    try:
        return [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None


def _checked(fn, *args, **kwargs):
    """Run an argument check; its ValueError becomes a usage error naming the bad value."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, MemoryError) as err:
        raise typer.BadParameter(str(err)) from None


def _print_tables(records: list[dict]) -> None:
    console.print(task_tables(records))


@app.command("passkey")
def passkey_command(
    model: str = typer.Option("llama-rope-256", help=MODEL_HELP),
    lengths: str = typer.Option("256,512,1024,2048", help="comma-separated prompt lengths in tokens"),
    depths: str = typer.Option("0,25,50,75,100", help="comma-separated needle depths, percent of the filler (0..100)"),
    method: list[str] = typer.Option(["vanilla", "sliding-window", "lm-infinite"], "--method", "-m", help=SCALED_HELP),
    trials: int = typer.Option(5, min=1, help="prompts per (length, depth); keys fixed by --seed"),
    seed: int = typer.Option(0),
    memory_limit_gib: float = typer.Option(0.0, min=0.0, help=MEMORY_HELP),
    out: Path = typer.Option(Path("results/passkey.jsonl"), help="JSON-lines results (appended; finished cells skipped)"),
    plot: Path = typer.Option(None, help="PNG heat-map of accuracy by depth and length (default: next to --out)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    ray: RayOption = None,
    workers: WorkersOption = 2,
    threads: ThreadsOption = 0,
    no_wait: NoWaitOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Passkey retrieval accuracy by (method, length, depth): table, JSON lines, heat-map."""

    length_list = _checked(check_lengths, _parse_numbers(lengths, "lengths"), MIN_PROMPT_TOKENS, "passkey length")
    depth_list = _checked(check_depths, _parse_numbers(depths, "depths", float))
    _checked(check_specs, method)
    check_methods_fit(model, method)
    check_device_dtype(device, dtype, ray)
    check_results(out, "passkey", wait=not no_wait)
    check_out_file(plot, "--plot")
    pool = cell_pool(ray, workers, threads, model)
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    _checked(check_memory, lm, length_list, method, limit_bytes=gib(memory_limit_gib),
             device=str(next(lm.parameters()).device), logits=8)
    records = passkey(lm, tokenizer, length_list, depth_list, method, trials=trials, seed=seed,
                      results=ResultsFile(out, wait=not no_wait), model_name=model, progress=not quiet, pool=pool)
    _print_tables(records)
    plot = plot or out.with_suffix(".png")
    plot_passkey_heatmap(records, plot)
    console.print(f"results: {out}\nheat-map: {plot}")


@app.command("gen-quality")
def gen_quality_command(
    model: str = typer.Option("llama-rope-256", help=MODEL_HELP),
    data: str = typer.Option("stdlib", help="stdlib | stdlib-train | pg19-dev | pg19-train | hf:NAME[:SPLIT] | PATH"),
    lengths: str = typer.Option("256,1024", help="comma-separated prefix lengths in tokens"),
    method: list[str] = typer.Option(["vanilla", "sliding-window", "lm-infinite"], "--method", "-m", help=SCALED_HELP),
    new_tokens: int = typer.Option(100, min=1, help="greedy tokens generated and compared with the true next ones"),
    max_docs: int = typer.Option(4, min=1, help="documents per prefix length (the first long enough, corpus order)"),
    seed: int = typer.Option(0),
    memory_limit_gib: float = typer.Option(0.0, min=0.0, help=MEMORY_HELP),
    out: Path = typer.Option(Path("results/gen_quality.jsonl"), help="JSON-lines results (appended; finished skipped)"),
    plot: Path = typer.Option(None, help="PNG of BLEU and ROUGE-L by prefix length (default: next to --out)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    no_wait: NoWaitOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """BLEU and ROUGE-L of 100 greedy tokens after an N-token prefix, by (method, N)."""

    length_list = _checked(check_lengths, _parse_numbers(lengths, "lengths"), 1, "prefix length")
    _checked(check_specs, method)
    check_methods_fit(model, method)
    check_device_dtype(device, dtype)
    check_results(out, "gen-quality", wait=not no_wait)
    check_out_file(plot, "--plot")
    documents = _checked(load_corpus, data)
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    _checked(check_memory, lm, [n + new_tokens for n in length_list], method, limit_bytes=gib(memory_limit_gib),
             device=str(next(lm.parameters()).device), logits=1)
    records = _checked(gen_quality, lm, tokenizer, documents, length_list, method, new_tokens=new_tokens,
                       max_docs=max_docs, results=ResultsFile(out, wait=not no_wait), model_name=model, data_name=data,
                       seed=seed, progress=not quiet)
    _print_tables(records)
    plot = plot or out.with_suffix(".png")
    plot_gen_quality(records, plot)
    console.print(f"results: {out}\nplot: {plot}")


@app.command("bench")
def bench_command(
    model: str = typer.Option("llama-rope-256", help=MODEL_HELP + ", or 'llama' (a random Llama-shaped "
                              "model built from the size options below)"),
    lengths: str = typer.Option("256,1024,4096", help="comma-separated prompt lengths in tokens"),
    method: list[str] = typer.Option(["vanilla", "lm-infinite", "streaming"], "--method", "-m", help=SCALED_HELP),
    decode_steps: int = typer.Option(8, min=1, help="tokens decoded one at a time after the prefill"),
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    threads: int = typer.Option(0, min=0, help="torch CPU threads (0: torch's default)"),
    hidden: int = typer.Option(256, min=2, help="model=llama: hidden size"),
    layers: int = typer.Option(4, min=1, help="model=llama: layers"),
    heads: int = typer.Option(4, min=1, help="model=llama: attention heads"),
    kv_heads: int = typer.Option(0, min=0, help="model=llama: key/value heads (0: = heads)"),
    mlp: int = typer.Option(0, min=0, help="model=llama: MLP size (0: 3 x hidden)"),
    vocab: int = typer.Option(2048, min=2, help="model=llama: vocabulary"),
    train_length: int = typer.Option(256, min=2, help="model=llama: training length (max_position_embeddings)"),
    seed: int = typer.Option(0),
    memory_limit_gib: float = typer.Option(0.0, min=0.0, help=MEMORY_HELP),
    out: Path = typer.Option(Path("results/bench.jsonl"), help="JSON-lines results (appended; finished cells skipped)"),
    decode: str = typer.Option("eager", help="lm-infinite cells on a Llama model: 'eager' (the model's forward on "
                               "the bounded cache), 'static' (a static Λ cache, fixed shapes) or 'compiled' (the "
                               "static step through torch.compile; eager where compilation fails, as the record "
                               "says); the first static step is checked against the eager one"),
    compile: bool = typer.Option(False, "--compile", help="the same as --decode compiled"),
    decode_weights: DecodeWeightsOption = "model",
    decode_kv: DecodeKvOption = "model",
    quiet: bool = typer.Option(False, help="no progress bar"),
    no_wait: NoWaitOption = False,
) -> None:
    """Prefill latency, per-token decode latency and peak memory by (method, length), in one run."""
    import torch  # noqa: PLC0415

    check_device_dtype(device, dtype)
    if model == "llama" and device == "auto":
        raise typer.BadParameter("--device auto places a loaded model; the built model=llama takes cpu, cuda or cuda:N")
    length_list = _checked(check_lengths, _parse_numbers(lengths, "lengths"), 2, "bench length")
    _checked(check_specs, method)
    decode = "compiled" if compile else decode
    check_decode(decode, decode_weights, decode_kv, dtype)
    check_results(out, "bench", wait=not no_wait)
    if threads:
        torch.set_num_threads(threads)
    if model == "llama":
        lm = _checked(build_llama, hidden, layers, heads, kv_heads or None, mlp or None, vocab, train_length, seed,
                      resolve_dtype(dtype), device=device).to(device)
        model_name = f"llama(hidden={hidden},layers={layers},heads={heads},kv_heads={kv_heads or heads},"
        model_name += f"mlp={mlp or 3 * hidden},vocab={vocab},train_length={train_length})"
    else:

        lm, _ = load_model(model, dtype=dtype, device=device)
        model_name = model
    device = str(next(lm.parameters()).device)
    _checked(check_memory, lm, length_list, method, limit_bytes=gib(memory_limit_gib), device=device, logits=1)
    records = bench(lm, length_list, method, decode_steps=decode_steps, seed=seed,
                    results=ResultsFile(out, wait=not no_wait), model_name=model_name, progress=not quiet,
                    decode=decode, decode_weights=decode_weights, decode_kv=decode_kv)
    _print_tables(records)
    console.print(f"results: {out}")
