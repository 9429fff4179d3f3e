"""`lengthwise export`: a RoPE method as a standard HF folder (and a GGUF) that engines run without lengthwise."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from lengthwise import export
from lengthwise.api import load_model, resolve_model_path
from lengthwise.cli.app import DeviceOption, DtypeOption, MODEL_HELP, app, check_device_dtype
from lengthwise.cli.outputs import NoWaitOption, lock_output
from lengthwise.models.real import find_gguf


@app.command("export")
def export_command(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    method: str = typer.Option(..., "--method", "-m", help="one RoPE method spec, NAME[:key=value,...]: linear, ntk, "
                               "dynamic-ntk, yarn, llama3 or longrope (docs/export.md: what each engine takes)"),
    out: Path = typer.Option(..., "--out", help="folder to write, standard HF format (config.json with "
                             "rope_parameters and max_position_embeddings, tokenizer, weights)"),
    gguf: Path = typer.Option(None, "--gguf", help="also write this .gguf: a copy of the GGUF source with "
                              "llama.cpp's RoPE keys (GGUF sources only)"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out folder and an existing --gguf file"),
    no_wait: NoWaitOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Write a RoPE method as settings engines read: an HF folder that plain transformers loads (logits equal to the
    patched model's), the vLLM / SGLang overrides and, from a GGUF source, a GGUF with llama.cpp's RoPE keys. What
    no engine can express is refused in one line. Written beside the target and renamed at the end."""

    started = time.perf_counter()
    try:  # before anything loads: a method no engine has, bad options, a file that is not a GGUF
        name, options = export.check_spec(method)
        gguf_source = find_gguf(model)
        source = str(gguf_source) if gguf_source is not None else resolve_model_path(model)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    export.check_out(out, force, source=source)
    if gguf is not None:
        if gguf_source is None:
            raise typer.BadParameter(f"--gguf writes a copy of a GGUF source; {model!r} is not a GGUF file or a real "
                                     f"model read from one")
        export.require_gguf()
        export.check_out_file(gguf, force)
        refused, _ = export.engine_limits(name, export.get_method(name).make_config(**options))
        if "llama.cpp" in refused:
            raise typer.BadParameter(f"{method} cannot be written as a GGUF: {refused['llama.cpp']}")
    check_device_dtype(device, dtype)
    lock_output(out, wait=not no_wait)
    if gguf is not None:
        lock_output(gguf, wait=not no_wait)
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    result = export.export_model(lm, tokenizer, method, out, force=force, gguf_source=gguf_source, gguf_out=gguf,
                                 source=source)
    for line in result.report():
        typer.echo(line)
    typer.echo(f"took {time.perf_counter() - started:.1f} s")
