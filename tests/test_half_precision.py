"""Half precision at length (docs/guarantees.md; figures: benchmarks/half_precision.py): float16 / bfloat16 logits stay finite and PPL within 1% of
float32 for vanilla, lm-infinite, yarn and dynamic-ntk at 8x the bundled model's training length."""

import math

import pytest
import torch

from lengthwise import api
from lengthwise.data.corpus import documents_of_length, stdlib_corpus

METHODS = ("vanilla", "lm-infinite", "yarn:factor=8", "dynamic-ntk")


@torch.no_grad()
def _ppl(dtype, ids):
    model, _ = api.load_model("llama-rope-256", dtype=dtype)
    result = {}
    for method in METHODS:
        with api.patch(model, method):
            logits = model(input_ids=ids[None], use_cache=False).logits[0]  # (N, V)
        assert logits.isfinite().all(), (dtype, method)
        result[method] = math.exp(float(torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:])))
    return result


@pytest.fixture(scope="module")
def document():
    _, tokenizer = api.load_model("llama-rope-256")
    (_, ids), = documents_of_length(stdlib_corpus(), tokenizer, 2048, max_docs=1).docs
    return torch.as_tensor(ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_ppl_within_one_percent_of_float32(dtype, document):
    reference, half = _ppl(torch.float32, document), _ppl(dtype, document)
    for method in METHODS:
        assert abs(half[method] / reference[method] - 1) < 0.01, (method, half[method], reference[method])
