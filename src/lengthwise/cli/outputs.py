"""Checks on what a command will write and read back, made before any model is loaded.

`check_out_file` / `check_out_dir`: the output path can be created and written (the parent folder is created now),
or the command stops with one line naming the option. `check_results`: a JSON-lines results file to append to (and
resume from) holds this command's records only; a torn last line (a killed writer) is dropped with a warning, any
other line that is not a record refuses the file. `check_results` and `lock_output` also lock the output
(`lengthwise.locks`) for the rest of the command, before the model loads: a second run on the same output waits
for the first one and then skips what it finished, or, with `--no-wait`, stops with one line naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from lengthwise import locks

RECORD_FIELDS = ("task", "key", "model", "method", "metrics")  # what every record of eval/results.py carries

NoWaitOption = Annotated[bool, typer.Option(
    "--no-wait", help="when another run is writing the same output, stop at once naming it (pid, host), instead of "
    "waiting for it and then skipping what it finished")]


def _current_context():
    """The click context of the running command, or None: recent typer releases run their own copy of click
    (`typer._click`), older ones the `click` package."""
    import importlib  # noqa: PLC0415

    for name in ("typer._click.globals", "click"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        ctx = module.get_current_context(silent=True)
        if ctx is not None:
            return ctx
    return None


def lock_output(path: Path, wait: bool = True) -> Path:
    """Lock `path` (a results file or an output folder) until the command ends; another run holding it: wait for
    it, or (`wait` False) stop with one line naming it. Outside a command (no click context) the lock is only
    tested here and taken again by the writer itself (`ResultsFile`, the search)."""

    token = locks.acquire(path, wait=wait)
    ctx = _current_context()
    if ctx is None:
        locks.release(path, token)
    else:  # the command is over, failed or not: its output is free, whatever still refers to it
        ctx.call_on_close(lambda: locks.release_all(path))
    return path


def _fail(option: str, path: Path, why: str) -> None:
    raise typer.BadParameter(f"{option} {path}: {why}; give a writable path")


def _make_folder(option: str, path: Path, folder: Path) -> None:
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                _fail(option, path, f"{parent} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _fail(option, path, f"cannot create folder {folder} ({err.strerror or err})")
    if not os.access(folder, os.W_OK | os.X_OK):
        _fail(option, path, f"folder {folder} is not writable")


def check_out_file(path: Path | None, option: str = "--out") -> Path | None:
    """A file the command will write: its folder exists (created now) and is writable; the file is not a folder."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        _fail(option, path, "is a folder; a file path is expected here")
    _make_folder(option, path, path.parent if str(path.parent) else Path("."))
    if path.exists() and not os.access(path, os.W_OK):
        _fail(option, path, "the file is not writable")
    return path


def check_out_dir(path: Path | None, option: str = "--out") -> Path | None:
    """A folder the command will write into: created now, writable."""
    if path is None:
        return None
    path = Path(path)
    _make_folder(option, path, path)
    return path


def read_records(path: Path, option: str, tasks: Iterable[str] | None = None) -> list[dict]:
    """The records of a results file, checked: every line a record (a torn last line is dropped with a warning),
    and, given `tasks`, every record's task among them. One line (a usage error) otherwise."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise typer.BadParameter(f"{option} {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise typer.BadParameter(f"{option} {path} is not a JSON-lines results file (not UTF-8 text)") from None
    lines = text.split("\n")
    records, incomplete = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "task" in record:
            records.append(record)
            if incomplete is None and not all(field in record for field in RECORD_FIELDS):
                incomplete = number
            continue
        if number == len(lines) and record is None:  # no final newline: the writer was killed mid-line
            typer.echo(f"warning: {path}: the last line is truncated (a killed run?); it is dropped and its cell "
                       "runs again", err=True)
            continue
        what = "is not JSON" if record is None else "is not a results record (no 'task' field)"
        raise typer.BadParameter(f"{option} {path}: line {number} {what}; not a lengthwise results file")
    if tasks is not None:
        tasks = tuple(tasks)
        foreign = sorted({str(r["task"]) for r in records} - set(tasks))
        if foreign:
            raise typer.BadParameter(
                f"{option} {path} holds results of task {', '.join(foreign)}; accepted here: {', '.join(tasks)} "
                "(give each command a results file of its own)"
            )
    if incomplete is not None:
        raise typer.BadParameter(f"{option} {path}: line {incomplete} lacks some of the fields "
                                 f"{', '.join(RECORD_FIELDS)}; not a lengthwise results file")
    return records


def check_results(path: Path, task: str, option: str = "--out", wait: bool = True) -> Path:
    """The results file a `task` command appends to: writable, locked for this command (`lock_output`), and holding
    only `task` records so far."""
    check_out_file(path, option)
    lock_output(path, wait)
    read_records(path, option, (task,))
    return path
