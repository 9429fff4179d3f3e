"""Where the cells of a task run: one after another in this process, or spread over Ray workers.

A task (ppl, passkey, ruler) is a list of cells, each a `Cell(key, label, work, args)`, and one *cell function*
`run(model, tokenizer, args, advance) -> record`, defined at module level so Ray can ship it by reference. Both
paths skip the cells already in the results file and append each record the moment it is made (a kill loses at
most the cells in flight); the records come back in cell order either way.

On Ray, each worker is an actor that loads the model once (`lengthwise.api.load_model(name)`: the name must load
on every node, e.g. a bundled model, an installed real model or a path they share) and then runs cells; torch
threads per worker are fixed (`threads`), so a cell's arithmetic, and therefore its record, equals the serial run's
at the same thread count. Records are made on the workers (their `machine` field names the worker's machine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lengthwise.api import load_model
from lengthwise.distributed import require_ray, start_ray
from lengthwise.errors import UserError
from lengthwise.eval.results import ResultsFile
from lengthwise.progress import progress_bar

# run(model, tokenizer, args, advance) -> record; advance(k) reports k units of the cell's work as done
CellFunction = Callable[[Any, Any, Any, Callable[[int], None]], dict]


@dataclass(frozen=True)
class Cell:
    key: str  # the results-file key: a rerun skips the cell when a record with it exists
    label: str  # progress-bar text
    work: int  # progress units (documents, trials, samples)
    args: Any  # what the cell function needs besides the model; picklable


@dataclass(frozen=True)
class RayPool:
    """Where `run_cells` sends cells: `workers` Ray actors, each holding its own copy of `model_name`.

    `address`: "local" starts a Ray instance here (with `workers` CPUs), anything else is passed to `ray.init`
    (`auto`, `ray://host:10001`). `threads`: torch threads per worker.
    """

    model_name: str
    workers: int = 2
    address: str = "local"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UserError(f"workers must be >= 1, got {self.workers}")
        if self.threads < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")


class _CellWorker:
    """A Ray actor's body: one model load, then cells."""

    def __init__(self, model_name: str, threads: int) -> None:
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)
        self.model, self.tokenizer = load_model(model_name)

    def run(self, function: CellFunction, args: Any) -> dict:
        return function(self.model, self.tokenizer, args, lambda _: None)


def run_cells(name: str, cells: Sequence[Cell], function: CellFunction, results: ResultsFile, *, model=None,
              tokenizer=None, pool: RayPool | None = None, progress: bool = True) -> list[dict]:
    """Records of every cell in cell order: stored ones for finished cells, new ones from `function` (here, on
    `model`/`tokenizer`, or on `pool`'s workers)."""
    keys = [cell.key for cell in cells]
    unique = list({cell.key: cell for cell in reversed(cells)}.values())[::-1]  # a repeated request runs once
    records: dict[str, dict] = {}
    with progress_bar(progress) as bar:
        job = bar.add_task(name, total=sum(cell.work for cell in unique))
        todo = []
        for cell in unique:
            if (done := results.done(cell.key)) is not None:
                records[cell.key] = done
                bar.advance(job, cell.work)
            else:
                todo.append(cell)
        if pool is None:
            for cell in todo:
                bar.update(job, description=cell.label)
                records[cell.key] = record = function(model, tokenizer, cell.args, lambda k: bar.advance(job, k))
                results.append(record)
        elif todo:
            bar.update(job, description=f"{name} on {pool.workers} Ray workers")
            for cell, record in _run_on_ray(pool, function, todo):
                records[cell.key] = record
                results.append(record)
                bar.advance(job, cell.work)
    return [records[key] for key in keys]


def _run_on_ray(pool: RayPool, function: CellFunction, cells: Sequence[Cell]):
    """(cell, record) pairs as the workers finish them; each worker takes the next cell when it is free (cells
    differ in cost by orders of magnitude, so dealing them out in advance would leave workers idle)."""
    ray = require_ray()
    started = start_ray(pool.address, pool.workers * 1.0)
    worker_class = ray.remote(num_cpus=1)(_CellWorker)
    actors = [worker_class.remote(pool.model_name, pool.threads) for _ in range(pool.workers)]
    try:
        queue = list(cells)
        running = {}
        for actor in actors:
            if queue:
                cell = queue.pop(0)
                running[actor.run.remote(function, cell.args)] = (actor, cell)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, cell = running.pop(ref)
            record = ray.get(ref)
            if queue:
                following = queue.pop(0)
                running[actor.run.remote(function, following.args)] = (actor, following)
            yield cell, record
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
