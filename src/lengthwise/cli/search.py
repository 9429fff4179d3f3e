"""`lengthwise search`: LongRoPE evolutionary search of per-dimension RoPE factors (and short factors)."""

from __future__ import annotations

from pathlib import Path

import typer

from lengthwise.api import load_model
from lengthwise.cli.app import DeviceOption, DtypeOption, MODEL_HELP, app, check_device_dtype
from lengthwise.cli.outputs import NoWaitOption, check_out_dir, lock_output
from lengthwise.data.corpus import load_corpus
from lengthwise.search import EvolutionConfig, longrope
from lengthwise.search.backends import ray_available


@app.command("search")
def search_command(
    model: str = typer.Option("llama-rope-256", help=MODEL_HELP + " (RoPE models)"),
    target_length: int = typer.Option(None, help="tokens to extend to (or give --scale)"),
    scale: float = typer.Option(None, help="s = target length / training length (>= 1)"),
    data: str = typer.Option("pg19-train", help="fitness documents: corpus spec (keep them apart from held-out data)"),
    docs: int = typer.Option(4, min=1, help="fitness documents (each at least --target-length tokens)"),
    out: Path = typer.Option(Path("results/longrope-search"), help="output folder: factors.json, "
                             "rope_parameters.json, generations.jsonl, checkpoints (resumed if present)"),
    population: int = typer.Option(64, min=1, help="generation-0 size (paper: 64)"),
    parents: int = typer.Option(32, min=1, help="survivors per generation (paper: 32)"),
    mutations: int = typer.Option(16, min=0, help="mutants per generation (paper: 16)"),
    crossovers: int = typer.Option(16, min=0, help="crossover children per generation (paper: 16)"),
    iterations: int = typer.Option(40, min=1, help="generations, generation 0 included (paper: 40)"),
    mutation_prob: float = typer.Option(0.3, help="per-factor mutation probability (paper: 0.3)"),
    seed: int = typer.Option(0, help="random seed (same seed => same result, resumed or not)"),
    max_factor: float = typer.Option(None, help="λ ceiling (default 1.25·s)"),
    attention_factor: float = typer.Option(None, help="cos/sin factor (default √(1 + ln s / ln L))"),
    short_length: int = typer.Option(None, help="also search short factors at this length (<= training length)"),
    short_max_factor: float = typer.Option(None, help="short λ ceiling (default 1.25 · max(1, short_length/L))"),
    short_iterations: int = typer.Option(None, min=1, help="generations of the short search (default: --iterations)"),
    previous: Path = typer.Option(None, exists=True, dir_okay=False,
                                  help="factors.json of a search at a smaller scale: progressive extension"),
    ray_address: str = typer.Option(None, "--ray", "--ray-address",
                                    help="evaluate on Ray: 'local' starts one here, or a cluster address"),
    workers: int = typer.Option(2, min=1, help="Ray workers (one model copy each)"),
    threads: int = typer.Option(None, min=1, help="torch threads per evaluation (equal => serial == Ray)"),
    no_wait: NoWaitOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Search LongRoPE rescale factors λ_i (monotone, grid 0.01, in [1, 1.25 s]) and n_hat; fitness = perplexity."""
    from dataclasses import replace  # noqa: PLC0415

    if (target_length is None) == (scale is None):
        raise typer.BadParameter("give exactly one of --target-length or --scale")
    if scale is not None and scale < 1:
        raise typer.BadParameter(f"--scale must be >= 1, got {scale}")
    if ray_address and not ray_available():
        raise typer.BadParameter("--ray-address needs Ray: pip install 'lengthwise[ray]' (omit it for the serial search)")
    try:
        config = EvolutionConfig(population=population, parents=parents, mutations=mutations, crossovers=crossovers,
                                 iterations=iterations, mutation_prob=mutation_prob, seed=seed)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    short_config = replace(config, iterations=short_iterations) if short_iterations else None
    check_device_dtype(device, dtype, ray_address)
    check_out_dir(out)
    lock_output(out, not no_wait)  # before the model loads; the search resumes what another run checkpointed
    if not ray_address:
        typer.echo("fitness evaluations run serially in this process" +
                   ("" if ray_available() else " (Ray is not installed; pip install 'lengthwise[ray]' for --ray-address)"))
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    documents = load_corpus(data)

    def show(phase: str, row: dict) -> None:
        typer.echo(f"[{phase}] generation {row['generation'] + 1}/{config.iterations if phase == 'long' else (short_iterations or config.iterations)}: "
                   f"best {row['best']:.4f}  mean {row['mean']:.4f}  best so far {row['best_so_far']:.4f}  "
                   f"n_hat {row['best_n_hat']}  {row['evaluations']} evals in {row['seconds']:.1f}s")

    try:
        result = longrope(lm, tokenizer, documents, target_length=target_length, scale=scale, evolution=config,
                          max_docs=docs, max_factor=max_factor, attention=attention_factor, short_length=short_length,
                          short_max_factor=short_max_factor, short_evolution=short_config, previous=previous,
                          out_dir=out, ray_address=ray_address, workers=workers, threads=threads,
                          model_name=model, on_generation=show, wait=not no_wait)
    except (ValueError, ImportError) as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"long factors (s={result.scale:g}, {result.target_length} tokens): ppl {result.long.ppl:.4f} "
               f"(seeds: {', '.join(f'{k} {v:.4f}' for k, v in result.long.seed_ppl.items())}), n_hat {result.n_hat}")
    if result.short:
        typer.echo(f"short factors ({result.short.length} tokens): ppl {result.short.ppl:.4f}")
    for what, path in result.files.items():
        typer.echo(f"{what}: {path}")
    typer.echo(f"apply: -m {result.method_spec(result.files['factors'])}")
