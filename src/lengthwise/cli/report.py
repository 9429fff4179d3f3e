"""`lengthwise report`: Markdown tables and PNG plots for a set of results files (any task)."""

from __future__ import annotations

from pathlib import Path

import typer

from lengthwise.cli.app import app
from lengthwise.cli.outputs import check_out_dir, read_records
from lengthwise.report.build import build_report
from lengthwise.report.tasks import TASKS


@app.command("report")
def report_command(
    results: list[Path] = typer.Argument(..., help="JSON-lines results files (ppl, passkey, gen-quality, bench)"),
    out: Path = typer.Option(Path("results/report"), help="folder for report.md and the PNG plots"),
    title: str = typer.Option("lengthwise results", help="title of report.md"),
) -> None:
    """Tables (Markdown) and plots (PNG) for any mix of results files, grouped by task."""

    for path in results:  # every line a record of a task the report knows (a torn last line: warned, dropped)
        if path.is_file():
            read_records(path, "results file", TASKS)
    check_out_dir(out)
    try:
        path = build_report(results, out, title=title)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(path.read_text(encoding="utf-8"))
    typer.echo(f"report: {path}")
