"""Passkey retrieval prompts (LM-Infinite / landmark-attention protocol, DESIGN.md).

The filler is repeated around one passkey sentence placed at a chosen depth; the prompt ends with a question
whose answer is the key. The same generator makes the training documents of the reference models and the
evaluation prompts, so both agree on the format.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from lengthwise.errors import UserError

INSTRUCTION = "A pass key is hidden in the text below. Find it and remember it.\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    input_ids: list[int]  # the prompt, ending right before the answer
    answer_ids: list[int]  # tokens of " {key}"
    key: str
    depth: float


def random_key(rng: random.Random, digits: int = 5) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def make_passkey_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens (answer excluded), needle at `depth` in [0, 1] of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"depth must be in [0, 1], got {depth}")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    head, needle, question = encode(INSTRUCTION), encode(NEEDLE.format(key=key)), encode(QUESTION)
    answer = encode(" " + key)
    filler_budget = length - len(head) - len(needle) - len(question)
    if filler_budget < 0:
        raise UserError(
            f"passkey prompt needs at least {len(head) + len(needle) + len(question)} tokens, asked for {length}"
        )
    unit = encode(FILLER)
    filler = (unit * (filler_budget // len(unit) + 1))[:filler_budget]
    # Cut the filler at a whole-sentence boundary near the asked depth so the needle stays readable.
    cut = round(depth * filler_budget)
    cut = min(filler_budget, (cut // len(unit)) * len(unit) if depth < 1.0 else filler_budget)
    ids = head + filler[:cut] + needle + filler[cut:] + question
    assert len(ids) == length, (len(ids), length)
    return PasskeyPrompt(ids, answer, key, depth)
