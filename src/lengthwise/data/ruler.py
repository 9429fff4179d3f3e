"""RULER-style synthetic long-context tasks (task designs after Hsieh et al. 2024, RULER, arXiv 2404.06654; the
generators and their wording are lengthwise's own).

Every task builds a prompt of about `length` tokens (the most haystack sentences that fit; never above) from a seed:
a haystack (the passkey filler, or sentences of any text, e.g. PG19 dev books) with task sentences placed at a given
depth, then a question and an answer prefix. `expected` are the strings a correct answer contains; scoring is
RULER's: the fraction of them found in the greedy output (`recall`).

| task | what is hidden | what is asked | from RULER |
|---|---|---|---|
| niah_single | one key -> number | that number | NIAH single |
| niah_multikey | 1 key -> number among 3 distractor keys | the number of the asked key | NIAH multi-key |
| niah_multivalue | 4 numbers for one key | all 4 | NIAH multi-value |
| niah_multiquery | 4 keys -> numbers | all 4 numbers | NIAH multi-query |
| variable_tracking | a chain X1 = v, X2 = X1, ... (4 hops), plus a distractor chain | every name holding v | VT |
| common_words | a word list (the whole context, sized to the length) where 5 words repeat often | the 5 most common | CWE |
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from lengthwise.data.passkey import FILLER
from lengthwise.errors import UserError

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking", "common_words")
KEY_WORDS = ("amber", "basil", "cedar", "delta", "ember", "fable", "garnet", "harbor", "indigo", "juniper", "kelp",
             "lantern", "maple", "nectar", "orchid", "pebble", "quartz", "raven", "saffron", "thistle", "umber",
             "velvet", "willow", "yarrow", "zephyr")
COMMON_POOL = ("apple", "bridge", "candle", "desert", "engine", "forest", "glove", "hammer", "island", "jacket",
               "kettle", "ladder", "mirror", "needle", "ocean", "pillow", "rocket", "saddle", "tunnel", "violin",
               "wagon", "window", "anchor", "barrel", "carpet", "dragon", "feather", "goblet", "helmet", "marble")


@dataclass(frozen=True)
class RulerSample:
    task: str
    prompt: str  # the whole text before the model's answer (chat template not applied)
    expected: tuple[str, ...]  # strings a correct answer contains
    length: int  # asked token length
    depth: float  # where the task sentences sit in the haystack, 0..1
    answer_prefix: str = ""
    meta: dict = field(default_factory=dict)


def haystack_sentences(text: str | None) -> list[str]:
    """Sentences of a haystack text (None: the passkey filler, repeated)."""
    text = FILLER if text is None else text
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s.strip()) > 1]
    if not sentences:
        raise UserError("the haystack text holds no sentences")
    return [s + " " for s in sentences]


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _task_parts(task: str, rng: random.Random) -> tuple[str, list[str], str, str, tuple[str, ...], dict]:
    """(instruction, inserted sentences, question, answer prefix, expected, meta) of one sample."""
    keys = rng.sample(KEY_WORDS, 4)
    if task == "niah_single":
        value = _number(rng)
        return ("Some special magic numbers are hidden in the text below. Memorize them.\n",
                [f"One of the special magic numbers for {keys[0]} is: {value}. "],
                f"\nWhat is the special magic number for {keys[0]} mentioned in the text?",
                f" The special magic number for {keys[0]} mentioned in the text is", (value,), {"key": keys[0]})
    if task == "niah_multikey":
        values = [_number(rng) for _ in keys]
        return ("Some special magic numbers are hidden in the text below. Memorize them.\n",
                [f"One of the special magic numbers for {k} is: {v}. " for k, v in zip(keys, values)],
                f"\nWhat is the special magic number for {keys[0]} mentioned in the text?",
                f" The special magic number for {keys[0]} mentioned in the text is", (values[0],), {"key": keys[0]})
    if task == "niah_multivalue":
        values = [_number(rng) for _ in range(4)]
        return ("Some special magic numbers are hidden in the text below. Memorize them.\n",
                [f"One of the special magic numbers for {keys[0]} is: {v}. " for v in values],
                f"\nWhat are all the special magic numbers for {keys[0]} mentioned in the text?",
                f" The special magic numbers for {keys[0]} mentioned in the text are", tuple(values), {"key": keys[0]})
    if task == "niah_multiquery":
        values = [_number(rng) for _ in keys]
        asked = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        return ("Some special magic numbers are hidden in the text below. Memorize them.\n",
                [f"One of the special magic numbers for {k} is: {v}. " for k, v in zip(keys, values)],
                f"\nWhat are the special magic numbers for {asked} mentioned in the text?",
                f" The special magic numbers for {asked} mentioned in the text are", tuple(values), {"keys": keys})
    if task == "variable_tracking":
        value, other = str(rng.randint(10000, 99999)), str(rng.randint(10000, 99999))
        names = ["".join(rng.choice("ABCDEFGHJKMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(10)]
        chain, distractor = names[:5], names[5:]
        lines = [f"VAR {chain[0]} = {value}. "] + [f"VAR {b} = {a}. " for a, b in zip(chain, chain[1:])]
        lines += [f"VAR {distractor[0]} = {other}. "] + [f"VAR {b} = {a}. " for a, b in zip(distractor, distractor[1:])]
        return ("Memorize and track the chain(s) of variable assignments hidden in the text below.\n", lines,
                f"\nFind all variables that are assigned the value {value} in the text above.",
                f" Answer: the variables assigned the value {value} are:", tuple(chain), {"value": value})
    if task == "common_words":  # the word list is the whole context; its size is fitted to the length later
        words = rng.sample(COMMON_POOL, 20)
        return ("Below is a numbered list of words. Some words appear much more often than others.\n", [],
                "\nWhat are the 5 most common words in the list above?",
                " Answer: the 5 most common words in the list are:", tuple(words[:5]),
                {"common": words[:5], "rare": words[5:], "order": rng.random()})
    raise UserError(f"unknown RULER task {task!r}; accepted: {', '.join(TASKS)}")


def make_ruler_sample(tokenizer, task: str, length: int, depth: float, seed: int,
                      haystack: str | None = None) -> RulerSample:
    """One sample of `task` of about `length` tokens (never more), task sentences at `depth` (0..1) of the haystack.
    Deterministic in (task, length, depth, seed, haystack)."""
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"ruler|{task}|{length}|{depth:g}|{seed}")
    instruction, inserted, question, prefix, expected, meta = _task_parts(task, rng)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    if task == "common_words":
        return _fit_word_list(count, length, depth, instruction, question, prefix, expected, meta)
    fixed = count(instruction + "".join(inserted) + question + prefix)
    if fixed > length:
        raise UserError(f"RULER task {task} needs at least {fixed} tokens with this tokenizer, asked for {length}")
    sentences = haystack_sentences(haystack)
    start = rng.randrange(len(sentences)) if haystack is not None else 0  # a seeded place in a long text

    def build(k: int) -> str:
        chosen = [sentences[(start + i) % len(sentences)] for i in range(k)]
        cut = round(depth * k)
        if len(inserted) > 1:  # several needles: spread from the depth on, in order
            step = max(1, (k - cut) // len(inserted))
            spots = [min(k, cut + j * step) for j in range(len(inserted))]
        else:
            spots = [cut] * len(inserted)
        body = []
        for index in range(k + 1):
            body += [sentence for sentence, spot in zip(inserted, spots) if spot == index]
            if index < k:
                body.append(chosen[index])
        return instruction + "".join(body) + question + prefix

    low, high = 0, length - fixed  # the most haystack sentences whose whole prompt fits (tokens merge across joins)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if count(build(middle)) <= length else (low, middle - 1)
    prompt = build(low)
    return RulerSample(task, prompt, expected, length, depth, prefix, meta)


def word_list(common: list[str], rare: list[str], size: int, order: float) -> str:
    """A numbered list: each common word 2*size times, up to 5*size rare words size times each
    (common words are always at least twice as frequent as any other), shuffled by `order`."""
    listed = common * (2 * size) + rare[: min(len(rare), 5 * size)] * size
    random.Random(order).shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)) + " "


def _fit_word_list(count, length, depth, instruction, question, prefix, expected, meta) -> RulerSample:
    def build(size: int) -> str:
        return instruction + word_list(meta["common"], meta["rare"], size, meta["order"]) + question + prefix

    if count(build(1)) > length:
        raise UserError(f"RULER task common_words needs at least {count(build(1))} tokens with this tokenizer, "
                         f"asked for {length}")
    low, high = 1, max(1, length // 4)
    while low < high:  # the largest list that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if count(build(middle)) <= length else (low, middle - 1)
    return RulerSample("common_words", build(low), expected, length, depth, prefix, {"size": low})


def recall(output: str, expected) -> float:
    """RULER's score of one sample: the fraction of expected strings found in the output (case-insensitive)."""
    text = output.lower()
    return sum(str(e).lower() in text for e in expected) / len(expected)
