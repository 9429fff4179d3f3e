"""Tables from results records."""

from __future__ import annotations

from collections import defaultdict


def pivot(records: list[dict], row: str, column: str, value) -> tuple[list, list, dict]:
    """(rows, columns, cells) with cells[(row, column)] = value(record); later records win."""
    rows, columns, cells = [], [], {}
    for record in records:
        r, c = record[row], record[column]
        if r not in rows:
            rows.append(r)
        if c not in columns:
            columns.append(c)
        cells[(r, c)] = value(record)
    return rows, sorted(columns), cells


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def ppl_table(records: list[dict], markdown: bool = True):
    """Perplexity by method (rows) and length (columns); Markdown text, or a rich Table for the terminal."""
    groups = defaultdict(list)
    for record in records:
        groups[(record["model"], record["data"])].append(record)
    blocks = []
    for (model, data), group in groups.items():
        rows, columns, cells = pivot(group, "method", "length", lambda r: r["metrics"]["ppl"])
        header = [f"PPL ({model}, {data})"] + [str(c) for c in columns]
        body = [[r] + [f"{cells[(r, c)]:.3f}" if (r, c) in cells else "-" for c in columns] for r in rows]
        blocks.append((header, body))
    if markdown:
        return "\n\n".join(markdown_table(h, b) for h, b in blocks)
    from rich.console import Group  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    tables = []
    for header, body in blocks:
        table = Table(*header)
        for cells in body:
            table.add_row(*cells)
        tables.append(table)
    return Group(*tables)
