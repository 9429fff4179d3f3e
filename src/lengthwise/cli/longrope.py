"""`lengthwise longrope finetune | extend | readjust`: LongRoPE's steps after the search (docs/longrope-pipeline.md).

finetune: fine-tune at the target length with fixed factors (LoRA through peft, or --full), resumable;
extend:   the progressive second search on a fine-tuned model, seeded from its factors;
readjust: short factors searched at the training length, used below it by the `longrope` method.
"""

from __future__ import annotations

from pathlib import Path

import typer

from lengthwise.api import load_model
from lengthwise.cli.app import MODEL_HELP, app
from lengthwise.cli.outputs import NoWaitOption, check_out_dir, lock_output
from lengthwise.data.corpus import load_corpus
from lengthwise.eval.perplexity import perplexity
from lengthwise.eval.results import ResultsFile
from lengthwise.models.families import model_info
from lengthwise.search import EvolutionConfig
from lengthwise.search.finetune import (FinetuneConfig, check_model, finetune, load_finetuned, method_parts,
                                        read_manifest)
from lengthwise.search.progressive import extend, read_previous, readjust

longrope_app = typer.Typer(help="LongRoPE after the search: fine-tuning, progressive extension, short readjustment.",
                           no_args_is_help=True)
app.add_typer(longrope_app, name="longrope")

FINETUNED_HELP = "a `lengthwise longrope finetune` output folder (its base model, adapter and factors)"


def _evolution(population, parents, mutations, crossovers, iterations, seed):
    try:
        return EvolutionConfig(population=population, parents=parents, mutations=mutations, crossovers=crossovers,
                               iterations=iterations, seed=seed)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _show(phase: str, row: dict) -> None:
    typer.echo(f"[{phase}] generation {row['generation'] + 1}: best {row['best']:.4f}  mean {row['mean']:.4f}  "
               f"best so far {row['best_so_far']:.4f}  {row['evaluations']} evals in {row['seconds']:.1f}s")


def _load(model: str, finetuned: Path | None):
    """(model, tokenizer, name): the base model, or a fine-tuned folder loaded without its patch."""

    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()  # a refusal after loading stays one line (no weight-loading bar before it)
    try:
        if finetuned is None:
            lm, tokenizer = load_model(model)
            return lm, tokenizer, model
        read_manifest(finetuned)  # one line when the folder is not a finished run
        lm, tokenizer, _ = load_finetuned(finetuned, patch_method=False)
        return lm, tokenizer, f"finetuned:{finetuned}"
    finally:
        hf_logging.enable_progress_bar()


def _first_stage(factors: Path | None, finetuned: Path | None) -> dict:
    """The first stage's factors (from --factors, or the --finetuned folder's), read and checked: one line when the
    folder is not a finished fine-tuning run or the file is missing or torn."""

    if finetuned is not None:
        read_manifest(finetuned)
    return read_previous(_factors_of(factors, finetuned))


def _echo_outputs(result) -> None:
    for what, path in result.files.items():
        typer.echo(f"{what}: {path}")
    typer.echo(f"apply: -m {result.method_spec(result.files['factors'])}")


def _factors_of(factors: Path | None, finetuned: Path | None) -> Path:
    if factors is not None:
        return factors
    if finetuned is not None and (finetuned / "factors.json").is_file():
        return finetuned / "factors.json"
    raise typer.BadParameter("give --factors FILE (a factors.json), or --finetuned DIR of a longrope fine-tuning run "
                             "(its factors.json)")


@longrope_app.command("finetune")
def finetune_command(
    model: str = typer.Option("llama-rope-256", help=MODEL_HELP + " (RoPE models)"),
    method: str = typer.Option(..., "--method", "-m", help="the RoPE method in force while training, e.g. "
                               "'longrope:long_factors=FILE,factor=8' (searched), 'linear:factor=8' (PI), "
                               "'yarn:factor=8'"),
    length: int = typer.Option(None, help="tokens per training sequence (the target length; or give --scale)"),
    scale: float = typer.Option(None, help="target length / training length (> 1)"),
    data: str = typer.Option("pg19-train", help="training documents (corpus spec); windows drawn at random"),
    docs: int = typer.Option(None, min=1, help="at most this many training documents (default: all long enough)"),
    steps: int = typer.Option(200, min=1, help="optimizer steps"),
    batch_size: int = typer.Option(1, min=1, help="sequences per step (accumulated)"),
    lr: float = typer.Option(1e-3, help="peak learning rate (AdamW; warm-up, then cosine)"),
    warmup: int = typer.Option(10, min=0, help="warm-up steps"),
    min_lr_ratio: float = typer.Option(0.1, help="final learning rate / peak"),
    weight_decay: float = typer.Option(0.0),
    max_grad_norm: float = typer.Option(1.0, help="gradient clipping (0: none)"),
    full: bool = typer.Option(False, "--full", help="train every weight instead of a LoRA"),
    rank: int = typer.Option(16, min=1, help="LoRA rank"),
    alpha: float = typer.Option(32.0, help="LoRA alpha"),
    targets: str = typer.Option("all-linear", help="LoRA targets: 'all-linear' or module names (q_proj,v_proj)"),
    gradient_checkpointing: bool = typer.Option(True, help="recompute layer activations in the backward pass"),
    checkpoint_every: int = typer.Option(50, min=1, help="save adapter + optimizer + step every K steps"),
    loss_chunk: int = typer.Option(4096, min=0, help="output head + loss over this many positions at a time"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(None, min=1, help="torch threads"),
    stop_after: int = typer.Option(None, min=0, help="stop after this many steps (checkpointed; rerun to go on)"),
    eval_data: str = typer.Option(None, help="also report PPL at the target length on these held-out documents "
                                  "before and after (e.g. pg19-dev; OUT/ppl.jsonl)"),
    eval_docs: int = typer.Option(4, min=1, help="held-out documents"),
    out: Path = typer.Option(Path("results/longrope-finetune"), help="output folder (resumed if present)"),
    no_wait: NoWaitOption = False,
) -> None:
    """Fine-tune at the target length with the RoPE factors fixed; the folder holds adapter + factors."""

    if (length is None) == (scale is None):
        raise typer.BadParameter("give exactly one of --length or --scale")
    if scale is not None and not scale > 1:
        raise typer.BadParameter(f"--scale must be > 1 (the fine-tuning extends the training length), got {scale}")
    method_parts(method)  # bad spec or factor file: one line before the model loads
    target_modules = targets if targets == "all-linear" else tuple(t.strip() for t in targets.split(",") if t.strip())
    lm, tokenizer = None, None
    if length is None:
        lm, tokenizer, _ = _load(model, None)

        length = round(model_info(lm).pretrain_length * scale)
    config = FinetuneConfig(length=length, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                            min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                            max_grad_norm=max_grad_norm or None, full=full, rank=rank, alpha=alpha,
                            target_modules=target_modules, gradient_checkpointing=gradient_checkpointing,
                            checkpoint_every=checkpoint_every, loss_chunk=loss_chunk, seed=seed)
    check_out_dir(out)
    lock_output(out, not no_wait)
    if lm is None:
        lm, tokenizer, _ = _load(model, None)
    check_model(lm, config)  # one line before the corpora load, the held-out pass and the training
    documents = load_corpus(data)
    held_out = load_corpus(eval_data) if eval_data else None
    before = _ppl(lm, tokenizer, held_out, length, method, eval_docs, out, model, eval_data, threads) if held_out \
        else None

    def show(row: dict) -> None:
        if row["step"] == 1 or row["step"] % 10 == 0 or row["step"] == steps:
            typer.echo(f"step {row['step']}/{steps}: loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                       f"{row['seconds']:.1f}s")

    result = finetune(lm, tokenizer, documents, method, config, out, model_name=model, max_docs=docs,
                      threads=threads, on_step=show, stop_after=stop_after, wait=not no_wait)
    if result.steps < steps:
        typer.echo(f"stopped at step {result.steps}/{steps} (checkpointed in {out}); rerun the same command to go on")
        return
    typer.echo(f"fine-tuned {steps} steps ({steps * batch_size * length} tokens): final loss "
               f"{result.final_loss:.4f}" + (" (read back: the folder held this finished run)"
                                             if result.resumed_from == steps else ""))
    if held_out:
        result.handle.remove()
        after = _ppl(lm, tokenizer, held_out, length, method, eval_docs, out, f"{model}+finetuned:{out}", eval_data,
                     threads)
        typer.echo(f"held-out PPL at {length} ({eval_data}, {eval_docs} docs): before {before:.4f}, after {after:.4f}")
    typer.echo(f"output: {out} (load: lengthwise.search.finetune.load_finetuned('{out}'))")


def _ppl(lm, tokenizer, documents, length, method, max_docs, out, model_name, data_name, threads) -> float:
    import torch  # noqa: PLC0415

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        records = perplexity(lm, tokenizer, documents, [length], [method], max_docs=max_docs,
                             results=ResultsFile(out / "ppl.jsonl"), model_name=model_name, data_name=data_name,
                             progress=False)
    finally:
        torch.set_num_threads(previous)
    return records[0]["metrics"]["ppl"]


@longrope_app.command("extend")
def extend_command(
    finetuned: Path = typer.Option(None, help=FINETUNED_HELP),
    model: str = typer.Option("llama-rope-256", help=MODEL_HELP + " (when no --finetuned)"),
    factors: Path = typer.Option(None, help="the first stage's factors.json (default: the --finetuned folder's)"),
    target_length: int = typer.Option(None, help="tokens to extend to (or give --scale)"),
    scale: float = typer.Option(None, help="new target length / training length"),
    data: str = typer.Option("pg19-train", help="fitness documents (keep them apart from held-out data)"),
    docs: int = typer.Option(2, min=1, help="fitness documents"),
    population: int = typer.Option(16, min=1),
    parents: int = typer.Option(8, min=1),
    mutations: int = typer.Option(4, min=0),
    crossovers: int = typer.Option(4, min=0),
    iterations: int = typer.Option(4, min=1),
    seed: int = typer.Option(0),
    attention_factor: float = typer.Option(None, help="cos/sin factor (default: the first stage's)"),
    standard_seeds: bool = typer.Option(True, help="also seed with PI / NTK / YaRN at the new scale "
                                        "(--no-standard-seeds: the first stage's factors and their extensions only)"),
    threads: int = typer.Option(None, min=1, help="torch threads per evaluation"),
    out: Path = typer.Option(Path("results/longrope-extend"), help="output folder (resumed if present)"),
    no_wait: NoWaitOption = False,
) -> None:
    """Progressive extension: search factors for a longer target on the fine-tuned model, seeded from its factors."""

    if (target_length is None) == (scale is None):
        raise typer.BadParameter("give exactly one of --target-length or --scale")
    previous = _first_stage(factors, finetuned)
    if scale is not None and scale < previous["factor"]:
        raise typer.BadParameter(f"--scale {scale:g} is below the first stage's {previous['factor']:g}; the "
                                 "progressive stage extends")
    config = _evolution(population, parents, mutations, crossovers, iterations, seed)
    check_out_dir(out)
    lock_output(out, not no_wait)
    lm, tokenizer, name = _load(model, finetuned)
    result = extend(lm, tokenizer, load_corpus(data), previous, target_length=target_length, scale=scale,
                    evolution=config, attention=attention_factor, standard_seeds=standard_seeds, max_docs=docs,
                    out_dir=out, threads=threads, model_name=name, on_generation=_show, wait=not no_wait)
    typer.echo(f"long factors (s={result.scale:g}, {result.target_length} tokens): fitness {result.long.ppl:.4f} "
               f"(seeds: {', '.join(f'{k} {v:.4f}' for k, v in result.long.seed_ppl.items())})")
    _echo_outputs(result)


@longrope_app.command("readjust")
def readjust_command(
    finetuned: Path = typer.Option(None, help=FINETUNED_HELP),
    model: str = typer.Option("llama-rope-256", help=MODEL_HELP + " (when no --finetuned)"),
    factors: Path = typer.Option(None, help="factors.json holding the long factors (default: the --finetuned "
                                 "folder's)"),
    short_length: int = typer.Option(None, help="tokens per fitness document (default: the training length L)"),
    data: str = typer.Option("pg19-train", help="fitness documents (keep them apart from held-out data)"),
    docs: int = typer.Option(1, min=1, help="fitness documents"),
    population: int = typer.Option(6, min=1),
    parents: int = typer.Option(3, min=1),
    mutations: int = typer.Option(2, min=0),
    crossovers: int = typer.Option(2, min=0),
    iterations: int = typer.Option(2, min=1),
    seed: int = typer.Option(0),
    short_max_factor: float = typer.Option(None, help="short λ ceiling (default 1.25 · max(1, short_length/L))"),
    short_attention_factor: float = typer.Option(None, help="cos/sin factor while the short factors are in use "
                                                 "(default: the long one, as transformers' longrope; 1 = the "
                                                 "original model's)"),
    threads: int = typer.Option(None, min=1, help="torch threads per evaluation"),
    out: Path = typer.Option(Path("results/longrope-readjust"), help="output folder (resumed if present)"),
    no_wait: NoWaitOption = False,
) -> None:
    """Short-context readjustment: search short factors at the training length, the long factors fixed."""

    previous = _first_stage(factors, finetuned)
    if short_attention_factor is not None and not short_attention_factor > 0:
        raise typer.BadParameter(f"--short-attention-factor must be positive, got {short_attention_factor}")
    config = _evolution(population, parents, mutations, crossovers, iterations, seed)
    check_out_dir(out)
    lock_output(out, not no_wait)
    lm, tokenizer, name = _load(model, finetuned)
    result = readjust(lm, tokenizer, load_corpus(data), previous, short_length=short_length, evolution=config,
                      max_docs=docs, short_max_factor=short_max_factor, short_attention=short_attention_factor,
                      out_dir=out, threads=threads, model_name=name, on_generation=_show, wait=not no_wait)
    typer.echo(f"short factors ({result.short_length} tokens): fitness {result.ppl:.4f} (seeds: "
               f"{', '.join(f'{k} {v:.4f}' for k, v in result.seed_ppl.items())})")
    _echo_outputs(result)
