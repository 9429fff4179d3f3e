"""The typer app and the option helpers every command shares."""

from __future__ import annotations

from typing import Annotated

import typer

from lengthwise.api import REFERENCE_MODELS_DIR, bundled_models, check_device, resolve_dtype
from lengthwise.errors import UserError
from lengthwise.eval.tasks import resolve_spec
from lengthwise.models.families import config_encoding
from lengthwise.models.real import REAL_MODELS
from lengthwise.registry import check_combination, get_entry, parse_method_spec, spec_names
from lengthwise.scoring import DECODE_PATHS
from lengthwise.static_decode import KV_FORMATS, WEIGHT_FORMATS

app = typer.Typer(
    help="lengthwise: run pretrained causal LMs far beyond their training context, and measure how well it works.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = ("bundled or real model name (`lengthwise models`), HF folder, .gguf file (or a folder holding one), "
              "or hub id")
METHODS_HELP = (
    "method spec, repeatable: NAME[:key=value,...][+NAME...]. Methods: " + ", ".join(spec_names())
)


def parse_int_list(text: str, what: str = "lengths") -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise typer.BadParameter(f"{what} must be integers >= 2, got {text!r}")
    return values


def check_methods(methods: list[str]) -> list[str]:
    for spec in methods:
        try:  # names, option values and combinations, before any model or data is loaded
            parts = parse_method_spec(spec)
            check_combination([name for name, _ in parts])
            for name, options in parts:
                get_entry(name).make_config(**options)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
    return methods


def declared_encoding(model: str) -> str | None:
    """The position encoding a model's config declares, read without loading weights; None where only loading
    tells (a hub id, a GGUF file not yet converted)."""
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    if model in REAL_MODELS:
        return "rope"  # every registered real model is a Llama
    folder = REFERENCE_MODELS_DIR / model if model in bundled_models() else Path(model)
    config = folder / "config.json"
    if not config.is_file():
        return None
    return config_encoding(json.loads(config.read_text()))


def check_methods_fit(model: str, methods: list[str]) -> None:
    """Refuse, before loading, a method whose position encoding the model does not use (e.g. yarn on ALiBi)."""

    encoding = declared_encoding(model)
    if encoding is None:
        return
    for spec in methods:
        for name, _ in parse_method_spec(resolve_spec(spec, 2, 1)):
            accepted = get_entry(name).encodings
            if encoding not in accepted:
                raise typer.BadParameter(f"method {name!r} works on {' and '.join(accepted)} models; model {model!r} "
                                         f"uses {encoding!r} position encoding")


DEVICE_HELP = "cpu | cuda | cuda:N | mps | auto (device_map='auto' through accelerate); checked before the model loads"
DTYPE_HELP = "float32 | bfloat16 | float16 (weights and activations); checked on the device before the model loads"
DeviceOption = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
DtypeOption = Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)]


DecodeWeightsOption = Annotated[str, typer.Option(
    help="with --decode static or compiled: how the step stores the projection weights it reads: 'model' (the "
    "model's own), or 'bfloat16', 'float16', 'int8' (per-row scales) copies of a float32 model's")]
DecodeKvOption = Annotated[str, typer.Option(
    help="with --decode static or compiled: how the static buffers hold the keys and values: 'model' (the model's "
    "type) or 'bfloat16' (a float32 model)")]


def check_decode(decode: str, decode_weights: str, decode_kv: str, dtype: str) -> None:
    """Refuse, before anything loads, a decode path or a stored format that does not exist or does not apply."""
    if decode not in DECODE_PATHS:
        raise typer.BadParameter(f"--decode must be one of {', '.join(DECODE_PATHS)}, got {decode!r}")
    for option, value, accepted in (("--decode-weights", decode_weights, WEIGHT_FORMATS),
                                    ("--decode-kv", decode_kv, KV_FORMATS)):
        if value not in accepted:
            raise typer.BadParameter(f"{option} must be one of {', '.join(accepted)}, got {value!r}")
        if value != "model" and (decode == "eager" or dtype != "float32"):
            raise typer.BadParameter(f"{option} {value} stores a float32 model's tensors for the static step: use it "
                                     f"with --decode static or compiled and --dtype float32")


def check_device_dtype(device: str, dtype: str, ray: str | None = None) -> None:
    """Refuse, before anything loads, a device torch does not see here, a dtype it cannot run there (a tiny probe:
    `lengthwise.api.check_device`), and --device/--dtype with --ray (the workers load their own float32 copy)."""
    import importlib.util  # noqa: PLC0415

    try:
        resolve_dtype(dtype)
        if device == "auto":
            if importlib.util.find_spec("accelerate") is None:
                raise UserError("--device auto (device_map='auto') needs accelerate: pip install accelerate; or "
                                "give --device cpu / cuda")
        else:
            check_device(device, dtype)
    except UserError as err:
        raise typer.BadParameter(str(err)) from None
    if ray and (device != "cpu" or resolve_dtype(dtype) != resolve_dtype("float32")):
        raise typer.BadParameter("--ray workers load their own float32 copy on their CPU; --device and --dtype apply "
                                 "to runs in this process: omit --ray, or --device/--dtype")
