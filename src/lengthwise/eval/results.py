"""One results schema for every task: JSON lines, appended, resumable by key.

Each record: task, key, model, method (spec string), method_config, data, seed, metrics (task specific),
plus machine, versions and time. A record's `key` identifies its cell; re-running skips cells already present.
"""

from __future__ import annotations

import datetime as _dt
import functools
import platform
from pathlib import Path
from typing import Any

from lengthwise.io import append_jsonl, read_jsonl

SCHEMA_VERSION = 1


@functools.cache
def machine_info() -> dict[str, Any]:
    import os  # noqa: PLC0415

    import torch  # noqa: PLC0415

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


@functools.cache
def versions() -> dict[str, str]:
    import importlib.metadata as md  # noqa: PLC0415

    out = {"python": platform.python_version()}
    for package in ("lengthwise", "torch", "transformers", "peft"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = "not installed"
    return out


def cell_key(task: str, **fields: Any) -> str:
    return task + "|" + "|".join(f"{k}={fields[k]}" for k in sorted(fields))


def make_record(task: str, key: str, *, model: str, method: str, method_config: Any, data: str, seed: int,
                metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "task": task,
        "key": key,
        "model": model,
        "method": method,
        "method_config": method_config,
        "data": data,
        "seed": seed,
        "metrics": metrics,
        **extra,
        "machine": machine_info(),
        "versions": versions(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


class ResultsFile:
    """Append-only JSON-lines results; `done(key)` tells which cells a previous (maybe killed) run finished."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.records: list[dict] = read_jsonl(self.path) if self.path else []
        self._keys = {r.get("key") for r in self.records}

    def done(self, key: str) -> dict | None:
        if key not in self._keys:
            return None
        return next(r for r in reversed(self.records) if r.get("key") == key)

    def append(self, record: dict) -> None:
        self.records.append(record)
        self._keys.add(record["key"])
        if self.path:
            append_jsonl(self.path, record)
