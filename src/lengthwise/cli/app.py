"""The typer app and the option helpers every command shares."""

from __future__ import annotations

import typer

from lengthwise.registry import check_combination, get_method, method_names, parse_method_spec

app = typer.Typer(
    help="lengthwise: run pretrained causal LMs far beyond their training context, and measure how well it works.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

METHODS_HELP = (
    "method spec, repeatable: NAME[:key=value,...][+NAME...]. Methods: " + ", ".join(method_names())
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
                get_method(name).make_config(**options)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
    return methods
