"""Passkey retrieval by (method, length, depth) (DESIGN.md protocol, prompts from `data.passkey`).

A trial is correct when greedy decoding after the prompt reproduces the answer tokens (" 48213") exactly. Greedy
decoding emits answer token j exactly when, with the true tokens 0..j-1 already in place, token j is the argmax;
so "all answer tokens are the argmax under teacher forcing" is the same event as "the first len(answer) greedy
tokens equal the answer" (the first mismatch ends both). One forward pass over prompt + answer[:-1] therefore
scores a trial (tested against `generation.generate` for every method on tiny models). Each trial runs through a
decoder of the spec's scorer (`lengthwise.scoring`): methods with their own KV cache (lm-infinite, streaming) are
scored through it with the calls `generate()` makes (the prompt, then one answer token per call: their middle
retrieval depends on the calls); the sliding-window baseline predicts each answer token from the last `window`
tokens, the same rows its greedy decoding recomputes.

A second metric, `found_accuracy`, follows the official LM-Infinite passkey script: greedy decoding of
len(answer) + 4 tokens, correct when the first run of digits in the text is the key. A model that answers
"the 49484" fails the first metric (a stray token before the key) and passes this one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lengthwise.data.passkey import PasskeyPrompt, make_passkey_prompt, random_key
from lengthwise.eval.cells import Cell, RayPool, run_cells
from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.eval.tasks import check_lengths, check_specs, resolve_spec
from lengthwise.models.families import model_info
from lengthwise.scoring import open_scorer
from lengthwise.errors import UserError

DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
MIN_PROMPT_TOKENS = 64  # instruction + needle + question take about 61 tokens with the reference tokenizer


def check_depths(depths: Sequence[float]) -> list[float]:
    """Depths are percentages of the filler, 0 (needle first) to 100 (needle last)."""
    if not depths:
        raise UserError("no depth given; accepted: percentages from 0 to 100")
    for depth in depths:
        if not isinstance(depth, (int, float)) or not 0 <= depth <= 100:
            raise UserError(f"depth {depth!r} is outside 0..100; accepted: percentages from 0 to 100")
    return list(depths)


def trial_key(seed: int, length: int, depth: float, trial: int, digits: int = 5) -> str:
    """The passkey of one trial: fixed by (seed, length, depth, trial), the same for every method."""
    return random_key(random.Random(f"passkey|{seed}|{length}|{depth:g}|{trial}"), digits)


EXTRA_TOKENS = 4  # greedy tokens past the answer's length, room for a stray word before the key ("the 49484")


@torch.no_grad()
def predict_answer(decoder, prompt: PasskeyPrompt, greedy_tokens: int = 0) -> tuple[list[int], list[int]]:
    """(teacher-forced argmax at each answer position, `greedy_tokens` tokens of greedy decoding after the prompt).

    `decoder`: a fresh context of the spec's scorer (`scorer.decoder()`). The prompt goes in one call, then the
    answer one token per call, the calls `generate()` makes (middle retrieval selects keys per call, so one pass
    would score something else; a decoder without a cache computes the same logits in as few passes as it can); the
    greedy branch continues from a fork of the context after the prompt.
    """
    first = decoder.feed(prompt.input_ids)  # (V,)
    branch = decoder.fork() if greedy_tokens else None
    forced = [int(first.argmax())] + decoder.feed_each(prompt.answer_ids[:-1]).argmax(-1).tolist()
    greedy = [int(first.argmax())][:greedy_tokens]
    while len(greedy) < greedy_tokens:
        greedy.append(int(branch.feed(greedy[-1:]).argmax()))
    return forced, greedy


def first_integer(text: str) -> str | None:
    """The first run of digits in a generated text (the official LM-Infinite passkey metric compares it with the
    key)."""
    found = re.search(r"\d+", text)
    return found.group(0) if found else None


def score(predicted: Sequence[int], answer: Sequence[int]) -> tuple[bool, float]:
    """(exact match, fraction of answer tokens right) of one trial."""
    right = sum(int(p == t) for p, t in zip(predicted, answer))
    return right == len(answer), right / len(answer)


@dataclass(frozen=True)
class PasskeyCell:
    method: str  # the spec as asked (`{s}` kept): the record's `method`
    length: int
    depth: float  # percent
    trials: int
    seed: int
    model_name: str
    key: str


def passkey(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    methods: Sequence[str] = ("vanilla",),
    *,
    trials: int = 5,
    seed: int = 0,
    results: ResultsFile | None = None,
    model_name: str = "model",
    progress: bool = True,
    pool: RayPool | None = None,
) -> list[dict]:
    """Passkey accuracy for every (method, length, depth) cell: `trials` prompts each, keys fixed by the seed.

    `methods` are spec strings; `{s}` in a spec becomes length / L_pretrain. Depths are percentages (0..100).
    Cells already in `results` are skipped and their stored records returned. `pool`: run the cells on Ray workers.
    """
    check_specs(methods)
    check_lengths(lengths, MIN_PROMPT_TOKENS, "passkey length")
    check_depths(depths)
    if trials < 1:
        raise UserError(f"trials must be >= 1, got {trials}")
    # too short for this tokenizer: fail now
    make_passkey_prompt(tokenizer, min(lengths), 0.0, trial_key(seed, 0, 0, 0))
    pretrain = model_info(model).pretrain_length
    cells = []
    for n in lengths:  # short lengths first, every method
        for method in methods:
            for depth in depths:
                key = cell_key("passkey", model=model_name, method=method, length=n, depth=depth, trials=trials,
                               seed=seed)
                label = f"passkey {resolve_spec(method, n, pretrain)} @ {n}, depth {depth:g}%"
                cells.append(Cell(key, label, trials, PasskeyCell(method, n, depth, trials, seed, model_name, key)))
    return run_cells("passkey", cells, passkey_cell, results or ResultsFile(None), model=model, tokenizer=tokenizer,
                     pool=pool, progress=progress)


def passkey_cell(model, tokenizer, cell: PasskeyCell, advance) -> dict:
    """The record of one (method, length, depth) cell: its `trials` prompts scored under the method."""
    info = model_info(model)
    n, depth = cell.length, cell.depth
    spec = resolve_spec(cell.method, n, info.pretrain_length)
    prompts = [make_passkey_prompt(tokenizer, n, depth / 100, trial_key(cell.seed, n, depth, t))
               for t in range(cell.trials)]
    correct, found, token_acc, predictions, generated = 0, 0, 0.0, [], []
    with open_scorer(model, spec) as scorer:
        method_config = scorer.method_config
        for prompt in prompts:
            greedy_tokens = len(prompt.answer_ids) + EXTRA_TOKENS
            predicted, greedy = predict_answer(scorer.decoder(), prompt, greedy_tokens)
            exact, fraction = score(predicted, prompt.answer_ids)
            correct += exact
            token_acc += fraction
            predictions.append(tokenizer.decode(predicted).strip())
            generated.append(tokenizer.decode(greedy))
            found += first_integer(generated[-1]) == prompt.key
            advance(1)
    trials = cell.trials
    metrics = {"accuracy": round(correct / trials, 4), "correct": correct, "trials": trials,
               "token_accuracy": round(token_acc / trials, 4), "found_accuracy": round(found / trials, 4)}
    return make_record("passkey", cell.key, model=cell.model_name, method=cell.method, method_config=method_config,
                       data="passkey", seed=cell.seed, metrics=metrics, length=n, depth=depth, method_resolved=spec,
                       pretrain_length=info.pretrain_length, keys=[p.key for p in prompts], predictions=predictions,
                       generated=generated)
