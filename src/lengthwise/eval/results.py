"""One results schema for every task: JSON lines, appended, resumable by key.

Each record: task, key, model, method (spec string), method_config, data, seed, metrics (task specific),
plus machine, versions and time. A record's `key` identifies its cell; re-running skips cells already present.

A `ResultsFile` on a path locks it (`lengthwise.locks`: `PATH.lock` beside it) before reading it and holds the lock
until it is closed, garbage-collected or the process ends: a second run on the same file waits, then reads what the
first one appended and skips those cells (or, `wait=False`, stops naming the other run). No cell is recorded twice.
"""

from __future__ import annotations

import datetime as _dt
import functools
import platform
import weakref
from pathlib import Path
from typing import Any

from lengthwise import locks
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
    """Append-only JSON-lines results; `done(key)` tells which cells a previous (maybe killed) run finished.

    The file is locked for this process from construction to `close()` (or garbage collection, or exit); `wait`:
    block while another run holds it (True), or raise `lengthwise.locks.OutputLocked` naming that run (False).
    """

    def __init__(self, path: str | Path | None, *, wait: bool = True) -> None:
        self.path = Path(path) if path else None
        self._token = None
        if self.path:  # locked before reading: what another run appended is then in the file
            self._token = locks.acquire(self.path, wait=wait)
            weakref.finalize(self, locks.release, self.path, self._token)
        self.records: list[dict] = read_jsonl(self.path) if self.path else []
        self._keys = {r.get("key") for r in self.records}

    def close(self) -> None:
        """Let go of the lock (appending after this is refused)."""
        if self.path:
            locks.release(self.path, self._token)

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def done(self, key: str) -> dict | None:
        if key not in self._keys:
            return None
        return next(r for r in reversed(self.records) if r.get("key") == key)

    def append(self, record: dict) -> None:
        if self.path and not locks.holds(self.path, self._token):
            raise RuntimeError(f"results file {self.path} was closed (or the command that locked it ended); open a "
                               "new ResultsFile to append")
        self.records.append(record)
        self._keys.add(record["key"])
        if self.path:
            append_jsonl(self.path, record)
