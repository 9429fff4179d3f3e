"""`lengthwise generate`: continue a (long) prompt under any method."""

from __future__ import annotations

from pathlib import Path

import typer

from lengthwise.cli.app import METHODS_HELP, app, check_methods


@app.command("generate")
def generate_command(
    model: str = typer.Option("llama-rope-256", help="bundled model name, local HF folder, or hub id"),
    prompt: str = typer.Option(None, help="prompt text"),
    prompt_file: Path = typer.Option(None, exists=True, dir_okay=False, help="read the prompt from a file"),
    method: str = typer.Option("vanilla", "--method", "-m", help=METHODS_HELP),
    max_new_tokens: int = typer.Option(100, min=1),
    last_tokens: int = typer.Option(0, min=0, help="keep only the last N prompt tokens (0: all)"),
) -> None:
    """Greedy generation after a prompt, with the model patched by METHOD."""
    import torch  # noqa: PLC0415

    from lengthwise.api import load_model  # noqa: PLC0415
    from lengthwise.generation import generate  # noqa: PLC0415

    if (prompt is None) == (prompt_file is None):
        raise typer.BadParameter("give exactly one of --prompt or --prompt-file")
    check_methods([method])
    text = prompt if prompt is not None else prompt_file.read_text(encoding="utf-8", errors="replace")
    lm, tokenizer = load_model(model)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise typer.BadParameter("the prompt is empty")
    ids = ids[-last_tokens:] if last_tokens else ids
    new = generate(lm, torch.tensor([ids]), method, max_new_tokens)
    typer.echo(tokenizer.decode(new.tolist()))
