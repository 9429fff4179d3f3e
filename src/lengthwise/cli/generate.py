"""`lengthwise generate`: continue a (long) prompt under any method."""

from __future__ import annotations

from pathlib import Path

import typer

from lengthwise.api import load_model
from lengthwise.cli.app import (DecodeKvOption, DecodeWeightsOption, DeviceOption, DtypeOption, METHODS_HELP,
                                MODEL_HELP, app, check_decode, check_device_dtype, check_methods)
from lengthwise.cli.outputs import check_out_dir
from lengthwise.cli.temp_lora import build_config, check_window_method
from lengthwise.generation import generate
from lengthwise.temp_lora import TempLoraSession
from lengthwise.temp_lora.adapter import check_targets


@app.command("generate")
def generate_command(
    model: str = typer.Option("llama-rope-256", help=MODEL_HELP),
    prompt: str = typer.Option(None, help="prompt text"),
    prompt_file: Path = typer.Option(None, exists=True, dir_okay=False, help="read the prompt from a file"),
    method: str = typer.Option("vanilla", "--method", "-m", help=METHODS_HELP),
    max_new_tokens: int = typer.Option(100, min=1),
    last_tokens: int = typer.Option(0, min=0, help="keep only the last N prompt tokens (0: all)"),
    temp_lora: bool = typer.Option(False, "--temp-lora", help="read the prompt into a temporary LoRA chunk by chunk "
                                   "and keep training it on every generated chunk (METHOD then handles the window)"),
    temp_lora_chunk: int = typer.Option(64, min=1, help="Temp-LoRA: tokens between two LoRA updates"),
    temp_lora_window: int = typer.Option(256, min=1, help="Temp-LoRA: tokens the model attends to"),
    temp_lora_lr: float = typer.Option(2e-3, help="Temp-LoRA: learning rate"),
    temp_lora_steps: int = typer.Option(1, min=1, help="Temp-LoRA: optimizer steps per chunk"),
    temp_lora_rank: int = typer.Option(8, min=1, help="Temp-LoRA: LoRA rank (alpha = 2 * rank)"),
    temp_lora_targets: str = typer.Option("all-linear", help="Temp-LoRA: 'all-linear' or module names (q_proj,v_proj)"),
    temp_lora_save: Path = typer.Option(None, help="Temp-LoRA: save the adapter (peft format) to this folder"),
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    decode: str = typer.Option("eager", help="'eager' (model.generate()), or for -m lm-infinite on a Llama model "
                               "'static' / 'compiled' (a static Λ cache, its step through torch.compile; the first "
                               "step is checked against the eager one)"),
    decode_weights: DecodeWeightsOption = "model",
    decode_kv: DecodeKvOption = "model",
) -> None:
    """Greedy generation after a prompt, with the model patched by METHOD (optionally with a Temp-LoRA)."""
    import torch  # noqa: PLC0415

    if (prompt is None) == (prompt_file is None):
        raise typer.BadParameter("give exactly one of --prompt or --prompt-file")
    check_methods([method])
    check_device_dtype(device, dtype)
    check_decode(decode, decode_weights, decode_kv, dtype)
    if temp_lora and decode != "eager":
        raise typer.BadParameter("--temp-lora decodes with its own session: leave --decode eager")
    if not temp_lora and temp_lora_save is not None:
        raise typer.BadParameter("--temp-lora-save needs --temp-lora")
    check_out_dir(temp_lora_save, "--temp-lora-save")
    config = None
    if temp_lora:

        config = build_config(temp_lora_chunk, temp_lora_window, None, temp_lora_rank, 2.0 * temp_lora_rank,
                              temp_lora_targets, temp_lora_lr, temp_lora_steps, True)
        window_method = check_window_method(method)
    text = prompt if prompt is not None else prompt_file.read_text(encoding="utf-8", errors="replace")
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise typer.BadParameter("the prompt is empty")
    ids = ids[-last_tokens:] if last_tokens else ids
    if config is not None:

        try:
            check_targets(lm, config.target_modules)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
        with TempLoraSession(lm, config, method=window_method) as session:
            session.process(torch.tensor(ids))
            new = session.generate(max_new_tokens)
            if temp_lora_save is not None:
                typer.echo(f"adapter saved to {session.save_adapter(temp_lora_save)}", err=True)
        typer.echo(tokenizer.decode(new.tolist()))
        return
    new = generate(lm, torch.tensor([ids]), method, max_new_tokens, decode=decode, decode_weights=decode_weights,
                   decode_kv=decode_kv)
    typer.echo(tokenizer.decode(new.tolist()))
