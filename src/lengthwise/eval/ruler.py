"""RULER-style tasks by (method, task, length, depth): greedy answers scored by recall (`data.ruler`).

Each cell runs `samples` prompts (seeds 0..samples-1 offset by the run's seed), generates greedily under the method
(`lengthwise.generation.generate`, the path `generate` and gen-quality share; the model's chat template wraps the
prompt where it has one) and records the mean recall. Cells already in the results file are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lengthwise.data.ruler import TASKS, make_ruler_sample, recall
from lengthwise.eval.passkey import check_depths
from lengthwise.eval.cells import Cell, RayPool, run_cells
from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.eval.tasks import check_lengths, check_specs, resolve_spec
from lengthwise.generation import generate
from lengthwise.models.families import model_info
from lengthwise.errors import UserError

NEW_TOKENS = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64, "niah_multiquery": 64,
              "variable_tracking": 40, "common_words": 40}
MIN_LENGTH = 128


def check_tasks(tasks: Sequence[str]) -> list[str]:
    if not tasks:
        raise UserError(f"no task given; accepted: {', '.join(TASKS)}")
    for task in tasks:
        if task not in TASKS:
            raise UserError(f"unknown RULER task {task!r}; accepted: {', '.join(TASKS)}")
    return list(tasks)


def encode_prompt(tokenizer, prompt: str, answer_prefix: str) -> list[int]:
    """Token ids of the prompt, wrapped in the tokenizer's chat template where it has one (the answer prefix then
    opens the assistant turn)."""
    if getattr(tokenizer, "chat_template", None):
        question = prompt[: len(prompt) - len(answer_prefix)] if answer_prefix else prompt
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True) + answer_prefix.lstrip()
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class RulerCell:
    method: str  # the spec as asked (`{s}` kept)
    task: str
    length: int
    depth: float  # percent
    samples: int
    seed: int
    haystack: str | None  # the haystack text (None: the passkey filler); a few MB at most, shipped with the cell
    haystack_name: str
    model_name: str
    key: str


def ruler(model, tokenizer, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float] = (50,),
          methods: Sequence[str] = ("vanilla",), *, samples: int = 3, seed: int = 0, haystack: str | None = None,
          haystack_name: str = "filler", results: ResultsFile | None = None, model_name: str = "model",
          progress: bool = True, pool: RayPool | None = None) -> list[dict]:
    """Mean recall per (method, task, length, depth) cell; depths in percent. `pool`: run the cells on Ray."""
    check_specs(methods)
    check_tasks(tasks)
    check_lengths(lengths, MIN_LENGTH, "RULER length")
    check_depths(depths)
    if samples < 1:
        raise UserError(f"samples must be >= 1, got {samples}")
    for task in tasks:  # too short for this tokenizer: fail now, not after hours of other cells
        make_ruler_sample(tokenizer, task, min(lengths), 0.5, seed, haystack)
    pretrain = model_info(model).pretrain_length
    cells = []
    for n in lengths:
        for task in tasks:
            for method in methods:
                for depth in depths:
                    key = cell_key("ruler", model=model_name, method=method, ruler_task=task, length=n, depth=depth,
                                   samples=samples, seed=seed, haystack=haystack_name)
                    spec = resolve_spec(method, n + NEW_TOKENS[task], pretrain)
                    label = f"ruler {task} {spec} @ {n}, depth {depth:g}%"
                    args = RulerCell(method, task, n, depth, samples, seed, haystack, haystack_name, model_name, key)
                    cells.append(Cell(key, label, samples, args))
    return run_cells("ruler", cells, ruler_cell, results or ResultsFile(None), model=model, tokenizer=tokenizer,
                     pool=pool, progress=progress)


def ruler_cell(model, tokenizer, cell: RulerCell, advance) -> dict:
    """The record of one cell: `samples` prompts answered greedily under the method, mean recall."""
    pretrain = model_info(model).pretrain_length
    n, task = cell.length, cell.task
    spec = resolve_spec(cell.method, n + NEW_TOKENS[task], pretrain)
    scores, outputs = [], []
    for sample in range(cell.samples):
        item = make_ruler_sample(tokenizer, task, n, cell.depth / 100, cell.seed + sample, cell.haystack)
        ids = torch.tensor([encode_prompt(tokenizer, item.prompt, item.answer_prefix)])
        new = generate(model, ids, spec, NEW_TOKENS[task], eos_token_id=tokenizer.eos_token_id)
        output = tokenizer.decode(new, skip_special_tokens=True)
        scores.append(recall(output, item.expected))
        outputs.append(output)
        advance(1)
    metrics = {"recall": round(sum(scores) / cell.samples, 4), "samples": cell.samples}
    return make_record("ruler", cell.key, model=cell.model_name, method=cell.method, method_config=[{"method": spec}],
                       data=cell.haystack_name, seed=cell.seed, metrics=metrics, length=n, depth=cell.depth,
                       ruler_task=task, method_resolved=spec, pretrain_length=pretrain, outputs=outputs)
