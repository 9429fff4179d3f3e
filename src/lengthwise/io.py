"""Atomic writes (nothing half-written is ever left behind), and reading torch files without unpickling code."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any
from lengthwise.errors import UserError


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_torch_file(path: str | Path, what: str = "checkpoint", remedy: str = "delete it to start over") -> Any:
    """`torch.load(path, weights_only=True)`: tensors, plain containers (dict, list, tuple), numbers, strings, dtypes
    and devices only, never an object whose unpickling runs code. Anything else, or a file that cannot be read
    (torn, foreign), is a ValueError in one line: `{what} {path} ...; {remedy}`."""
    import pickle  # noqa: PLC0415

    import torch  # noqa: PLC0415

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "")
        found = found.split("Unsupported global:")[-1].split(" was not")[0].strip()
        raise UserError(f"{what} {path} holds more than tensors and plain containers ({found or 'an object'}); "
                         f"lengthwise does not unpickle code from files (torch.load weights_only=True): {remedy}"
                         ) from None
    except Exception as err:  # noqa: BLE001 - a torn or foreign file: one line, not a traceback
        message = " ".join(str(err).split())[:200]
        raise UserError(f"{what} {path} cannot be read ({type(err).__name__}: {message}); {remedy}") from None


def drop_torn_tail(path: Path) -> None:
    """Cut a torn last line (no final newline: its writer was killed mid-write) off the file, so the next record
    starts on a line of its own instead of being glued to the fragment."""
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        handle.truncate(data.rfind(b"\n") + 1)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line; a line is written whole with one write() and flushed to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    if path.exists():
        drop_torn_tail(path)
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:  # a full disk, a quota: name the file; what was torn is cut off by the next append
        raise OSError(err.errno, f"{err.strerror or err} (the record was not saved; the records before it are "
                      "intact, a torn last line is dropped on the next run)", str(path)) from err


def read_jsonl(path: str | Path) -> list[dict]:
    """Read JSON lines, ignoring a torn last line left by a killed writer."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files the writers above leave when killed before their rename (`.NAME.tmp`,
    `.NAME.XXXXXXXX.tmp`, in the target's folder): never read, but a half-written file all the same. Call it only on
    a folder no other live process writes into (a command's own output folder, under its lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.glob(".*.tmp") if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
