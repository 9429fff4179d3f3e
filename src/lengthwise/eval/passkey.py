"""Passkey retrieval by (method, length, depth) (DESIGN.md protocol, prompts from `data.passkey`).

A trial is correct when greedy decoding after the prompt reproduces the answer tokens (" 48213") exactly. Greedy
decoding emits answer token j exactly when, with the true tokens 0..j-1 already in place, token j is the argmax;
so "all answer tokens are the argmax under teacher forcing" is the same event as "the first len(answer) greedy
tokens equal the answer" (the first mismatch ends both). One forward pass over prompt + answer[:-1] therefore
scores a trial (tested against `generation.generate` for every method on tiny models). The sliding-window
baseline predicts each answer token from the last `window` tokens, the same rows its greedy decoding recomputes.
Methods with their own KV cache (lm-infinite, streaming) are scored through it with the calls `generate()` makes
(the prompt, then one answer token per call): their middle retrieval depends on the calls.

A second metric, `found_accuracy`, follows the official LM-Infinite passkey script: greedy decoding of
len(answer) + 4 tokens, correct when the first run of digits in the text is the key. A model that answers
"the 49484" fails the first metric (a stray token before the key) and passes this one.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from lengthwise.api import patch
from lengthwise.data.passkey import PasskeyPrompt, make_passkey_prompt, random_key
from lengthwise.eval.cells import Cell, RayPool, run_cells
from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.eval.tasks import check_lengths, check_specs, is_scoring, resolve_spec
from lengthwise.models.compat import cache_kwargs
from lengthwise.models.families import model_info
from lengthwise.methods.baselines import resolve_sliding_window
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


def _step(model, ids, cache):
    """Logits (V,) of the last position of one call through `cache` (the calls `generate()` makes)."""
    return model(input_ids=ids[None], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits[0, -1]


@torch.no_grad()
def predict_answer(model, prompt: PasskeyPrompt, window: int | None = None, cache=None,
                   greedy_tokens: int = 0) -> tuple[list[int], list[int]]:
    """(teacher-forced argmax at each answer position, `greedy_tokens` tokens of greedy decoding after the prompt).

    window=None: one causal pass over prompt + answer[:-1] (under whatever patch is on the model);
    window=W: the sliding-window baseline, each token predicted from the W tokens before it;
    cache: a KV cache (the method's own: lm-infinite, streaming; or a DynamicCache): the prompt in one call, then one
    token per call through the cache, the calls `generate()` makes (middle retrieval depends on them, so one pass
    would score something else); the greedy branch continues from a copy of the cache after the prompt.
    """
    device = next(model.parameters()).device
    ids = torch.tensor(prompt.input_ids + prompt.answer_ids[:-1], device=device)  # (N + a - 1,)
    a, n = len(prompt.answer_ids), len(prompt.input_ids)
    if cache is not None:
        first = _step(model, ids[:n], cache)
        greedy_cache = copy.deepcopy(cache) if greedy_tokens else None
        forced = [int(first.argmax())] + [int(_step(model, ids[n + j - 1:n + j], cache).argmax()) for j in range(1, a)]
        greedy = [int(first.argmax())][:greedy_tokens]
        while len(greedy) < greedy_tokens:
            greedy.append(int(_step(model, torch.tensor(greedy[-1:], device=device), greedy_cache).argmax()))
        return forced, greedy
    if window is None:
        forced = model(input_ids=ids[None], use_cache=False, logits_to_keep=a).logits[0].argmax(-1).tolist()  # (a,)
    else:
        # Row j holds the `window` tokens ending right before answer token j (fewer when the prompt is shorter).
        width = min(window, n)
        rows = torch.stack([ids[n + j - width:n + j] for j in range(a)])  # (a, width)
        forced = model(input_ids=rows, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
    context, greedy = list(prompt.input_ids), []
    while len(greedy) < greedy_tokens:  # no cache: recompute (lab models; the sliding window recomputes anyway)
        row = torch.tensor(context[-window:] if window else context, device=device)[None]
        greedy.append(int(model(input_ids=row, use_cache=False, logits_to_keep=1).logits[0, -1].argmax()))
        context.append(greedy[-1])
    return forced, greedy


def first_integer(text: str) -> str | None:
    """The first run of digits in a generated text (the official LM-Infinite passkey metric compares it with the
    key)."""
    found = re.search(r"\d+", text)
    return found.group(0) if found else None


def own_cache(model, handle):
    """The KV cache a prompt runs through: the method's own, else a DynamicCache for transformers models (their
    greedy branch decodes through it), else None (lab models keep no cache: recomputed)."""
    cache = None if handle is None else handle.new_cache()
    if cache is None and isinstance(model, PreTrainedModel):
        cache = DynamicCache(config=model.config)
    return cache


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
    if is_scoring(spec):
        setting = resolve_sliding_window(spec, info.pretrain_length)
        window, handle, method_config = setting.window, None, setting.describe()
    else:
        window, handle = None, patch(model, spec)
        method_config = handle.describe()
    try:
        for prompt in prompts:
            cache = None if window else own_cache(model, handle)
            greedy_tokens = len(prompt.answer_ids) + EXTRA_TOKENS
            predicted, greedy = predict_answer(model, prompt, window, cache, greedy_tokens)
            exact, fraction = score(predicted, prompt.answer_ids)
            correct += exact
            token_acc += fraction
            predictions.append(tokenizer.decode(predicted).strip())
            generated.append(tokenizer.decode(greedy))
            found += first_integer(generated[-1]) == prompt.key
            advance(1)
    finally:
        if handle is not None:
            handle.remove()
    trials = cell.trials
    metrics = {"accuracy": round(correct / trials, 4), "correct": correct, "trials": trials,
               "token_accuracy": round(token_acc / trials, 4), "found_accuracy": round(found / trials, 4)}
    return make_record("passkey", cell.key, model=cell.model_name, method=cell.method, method_config=method_config,
                       data="passkey", seed=cell.seed, metrics=metrics, length=n, depth=depth, method_resolved=spec,
                       pretrain_length=info.pretrain_length, keys=[p.key for p in prompts], predictions=predictions,
                       generated=generated)
