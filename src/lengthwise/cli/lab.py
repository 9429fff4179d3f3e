"""`lengthwise lab train|compare`: the position-encoding lab (docs/lab.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from lengthwise.cli.app import app
from lengthwise.cli.outputs import NoWaitOption, check_out_dir, check_results
from lengthwise.lab.compare import compare, default_variants, parse_variant
from lengthwise.lab.encodings import ENCODINGS
from lengthwise.lab.train import TrainConfig, train

lab_app = typer.Typer(help="Position-encoding lab: train small models with each encoding, compare extrapolation.",
                      no_args_is_help=True)
app.add_typer(lab_app, name="lab")


def _encodings_help() -> str:
    return "position encoding, repeatable: " + ", ".join(ENCODINGS)


def _parse_options(text: str | None) -> dict:
    if not text:
        return {}
    options = {}
    for item in text.split(","):
        if "=" not in item:
            raise typer.BadParameter(f"encoding options are key=value pairs separated by commas, got {item!r}")
        key, value = item.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        options[key.strip()] = value
    return options


@lab_app.command("train")
def train_command(
    pe: list[str] = typer.Option(..., "--pe", help=_encodings_help()),
    out: Path = typer.Option(Path("results/lab/models"), help="root folder; each model goes to OUT/<pe>"),
    pe_options: str = typer.Option("", help="encoding options key=value,... (with a single --pe)"),
    data: str = typer.Option("stdlib", help="training text: stdlib (held-in stdlib files), pg19 (PG19 train) or mix"),
    context: int = typer.Option(128, help="training length (tokens)"),
    d_model: int = typer.Option(128),
    layers: int = typer.Option(2),
    heads: int = typer.Option(4),
    steps: int = typer.Option(500),
    batch: int = typer.Option(16),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    max_chars: int = typer.Option(4_000_000, help="characters of text per source"),
    checkpoint_every: int = typer.Option(50),
    threads: int = typer.Option(0, help="torch threads (0: default)"),
) -> None:
    """Train one small model per --pe with identical size, data, steps and seed (resumes from checkpoints)."""

    options = _parse_options(pe_options)
    if options and len(pe) > 1:
        raise typer.BadParameter("--pe-options applies to one encoding; give a single --pe with it")
    try:
        configs = [TrainConfig(pe=name, pe_options=options, data=data, context=context, d_model=d_model,
                               layers=layers, heads=heads, steps=steps, batch=batch, lr=lr, seed=seed,
                               max_chars=max_chars, checkpoint_every=checkpoint_every, threads=threads)
                   for name in pe]
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    check_out_dir(out)
    for cfg in configs:
        train(cfg, out / cfg.pe, cache_dir=out / "_data", log=lambda m: typer.echo(m, err=True))


@lab_app.command("compare")
def compare_command(
    models: Path = typer.Option(Path("results/lab/models"), help="root folder of trained lab models (one subfolder each)"),
    variant: list[str] = typer.Option([], "--variant", help="MODEL[+logn|+local[=W]|+blockwise[=B]|+sliding], "
                                                           "repeatable; default: every model plus the inference "
                                                           "tricks on rope, nope (logn, local), xpos (blockwise) "
                                                           "and the sliding-window baseline of rope"),
    factors: str = typer.Option("1,2,4,8,16", help="evaluation lengths as multiples of the training length"),
    data: list[str] = typer.Option(["stdlib"], "--data", help="corpus, repeatable (stdlib, pg19-dev, a path...)"),
    max_docs: int = typer.Option(8, help="documents per length"),
    out: Path = typer.Option(Path("results/lab/compare"), help="folder for results.jsonl, table.md, ppl.png"),
    threads: int = typer.Option(0, help="torch threads (0: default)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    no_wait: NoWaitOption = False,
) -> None:
    """PPL of every variant at 1x..16x the training length; writes JSON lines, a Markdown table and a plot."""

    if not models.is_dir():
        raise typer.BadParameter(f"--models {models} is not a folder")
    try:
        factor_list = [int(f) for f in factors.split(",") if f.strip()]
    except ValueError:
        raise typer.BadParameter(f"--factors must be comma-separated positive integers, got {factors!r}") from None
    if not factor_list or min(factor_list) < 1:
        raise typer.BadParameter(f"--factors must be comma-separated positive integers, got {factors!r}")
    names = list(variant) or default_variants(models)
    if not names:
        raise typer.BadParameter(f"no lab model under {models}; train some with `lengthwise lab train`")
    try:
        for name in names:
            parse_variant(name, models)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    check_out_dir(out)
    check_results(out / "results.jsonl", "ppl", "--out", wait=not no_wait)
    if threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)
    compare(models, names, factor_list, data, max_docs, out / "results.jsonl", out / "table.md", out / "ppl.png",
            progress=not quiet, position_plot=out / "nll_by_position.png", wait=not no_wait)
    typer.echo((out / "table.md").read_text())
