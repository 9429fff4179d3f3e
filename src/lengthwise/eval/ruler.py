"""RULER-style tasks by (method, task, length, depth): greedy answers scored by recall (`data.ruler`).

Each cell runs `samples` prompts (seeds 0..samples-1 offset by the run's seed), generates greedily under the method
(`lengthwise.generation.generate`, the path `generate` and gen-quality share; the model's chat template wraps the
prompt where it has one) and records the mean recall. Cells already in the results file are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lengthwise.data.ruler import TASKS, make_ruler_sample, recall
from lengthwise.eval.passkey import check_depths
from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.eval.tasks import check_lengths, check_specs, resolve_spec
from lengthwise.generation import generate
from lengthwise.models.families import model_info
from lengthwise.progress import progress_bar

NEW_TOKENS = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64, "niah_multiquery": 64,
              "variable_tracking": 40, "common_words": 40}
MIN_LENGTH = 128


def check_tasks(tasks: Sequence[str]) -> list[str]:
    if not tasks:
        raise ValueError(f"no task given; accepted: {', '.join(TASKS)}")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown RULER task {task!r}; accepted: {', '.join(TASKS)}")
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


def ruler(model, tokenizer, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float] = (50,),
          methods: Sequence[str] = ("vanilla",), *, samples: int = 3, seed: int = 0, haystack: str | None = None,
          haystack_name: str = "filler", results: ResultsFile | None = None, model_name: str = "model",
          progress: bool = True) -> list[dict]:
    """Mean recall per (method, task, length, depth) cell; depths in percent."""
    check_specs(methods)
    check_tasks(tasks)
    check_lengths(lengths, MIN_LENGTH, "RULER length")
    check_depths(depths)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    for task in tasks:  # too short for this tokenizer: fail now, not after hours of other cells
        make_ruler_sample(tokenizer, task, min(lengths), 0.5, seed, haystack)
    results = results or ResultsFile(None)
    info = model_info(model)
    eos = tokenizer.eos_token_id
    cells = [(m, t, n, d) for n in lengths for t in tasks for m in methods for d in depths]
    records = []
    with progress_bar(progress) as bar:
        job = bar.add_task("ruler", total=len(cells) * samples)
        for method, task, n, depth in cells:
            key = cell_key("ruler", model=model_name, method=method, ruler_task=task, length=n, depth=depth,
                           samples=samples, seed=seed, haystack=haystack_name)
            if (done := results.done(key)):
                records.append(done)
                bar.advance(job, samples)
                continue
            spec = resolve_spec(method, n + NEW_TOKENS[task], info.pretrain_length)
            bar.update(job, description=f"ruler {task} {spec} @ {n}, depth {depth:g}%")
            scores, outputs = [], []
            for sample in range(samples):
                item = make_ruler_sample(tokenizer, task, n, depth / 100, seed + sample, haystack)
                ids = torch.tensor([encode_prompt(tokenizer, item.prompt, item.answer_prefix)])
                new = generate(model, ids, spec, NEW_TOKENS[task], eos_token_id=eos)
                output = tokenizer.decode(new, skip_special_tokens=True)
                scores.append(recall(output, item.expected))
                outputs.append(output)
                bar.advance(job)
            metrics = {"recall": round(sum(scores) / samples, 4), "samples": samples}
            record = make_record("ruler", key, model=model_name, method=method, method_config=[{"method": spec}],
                                 data=haystack_name, seed=seed, metrics=metrics, length=n, depth=depth, ruler_task=task,
                                 method_resolved=spec, pretrain_length=info.pretrain_length, outputs=outputs)
            results.append(record)
            records.append(record)
    return records
