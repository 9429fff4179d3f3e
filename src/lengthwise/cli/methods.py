"""`lengthwise methods [NAME ...]`: the registered methods, or the options of some, with defaults and help.

Everything shown comes from the registry: the summaries and each config field's help metadata.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lengthwise.cli.app import app
from lengthwise.registry import get_entry, option_rows, registry_markdown, spec_names

@app.command("methods")
def list_methods(
    names: list[str] = typer.Argument(None, metavar="NAME", show_default=False,
                                      help="methods whose options to show (default: list all methods)"),
    markdown: bool = typer.Option(False, help="print the Markdown page docs/methods.md instead"),
) -> None:
    """List the registered methods (the same registry the API and docs read); with names, their options."""

    if markdown:
        print(registry_markdown())
        return
    console = Console()  # made per call, so it measures the terminal (or COLUMNS) it prints to
    if not names:
        table = Table("method", "role", "paper", "what it does")
        for name in spec_names():
            spec = get_entry(name)
            table.add_row(name, spec.role, spec.paper, spec.summary)
        console.print(table)
        console.print("`lengthwise methods NAME` lists a method's options with their defaults and help.")
        return
    specs = []
    for name in names:
        try:
            specs.append(get_entry(name))
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="NAME") from None
    for spec in specs:
        console.print(f"[bold]{spec.name}[/bold] (role {spec.role}): {escape(spec.summary)}", highlight=False)
        if spec.paper:
            console.print(f"paper: {escape(spec.paper)}", highlight=False)
        rows = option_rows(spec.config_cls)
        if not rows:
            console.print("options: (none)")
            continue
        table = Table("option", "default", "help")
        for option_name, default, help_text in rows:
            table.add_row(option_name, escape(default), escape(help_text))
        console.print(table)
        console.print(f"use as: -m {spec.name}:OPTION=VALUE,...", highlight=False, markup=False)
