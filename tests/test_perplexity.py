import math

import torch

from lengthwise.data.corpus import Document
from lengthwise.eval.perplexity import perplexity
from lengthwise.scoring import nll_one_pass, nll_sliding_window
from lengthwise.eval.results import ResultsFile
from lengthwise.testing import random_ids, tiny_model, tiny_tokenizer


def _exact_window_nll(model, ids, window):
    out = []
    for t in range(1, len(ids)):
        ctx = ids[max(0, t - window + 1) : t + 1]
        logits = model(input_ids=ctx[None]).logits[0, -2]
        out.append(torch.nn.functional.cross_entropy(logits, ids[t]))
    return torch.stack(out)


def test_sliding_window_stride_one_equals_exact_recomputation():
    model = tiny_model("llama", length=16)
    ids = random_ids(40)[0]
    fast = nll_sliding_window(model, ids, window=16, stride=1)
    torch.testing.assert_close(fast, _exact_window_nll(model, ids, 16), rtol=1e-4, atol=1e-4)


def test_sliding_window_scores_every_token_once_with_enough_context():
    model = tiny_model("llama", length=16)
    ids = random_ids(50)[0]
    nll = nll_sliding_window(model, ids, window=16, stride=5)
    assert nll.shape == (49,)
    # window >= N: identical to one pass
    torch.testing.assert_close(nll_sliding_window(model, ids[:16], 16, 4), nll_one_pass(model, ids[:16]))


def test_chunked_pass_equals_one_pass():
    model = tiny_model("llama")
    ids = random_ids(48)[0]
    torch.testing.assert_close(nll_one_pass(model, ids, chunk_size=10), nll_one_pass(model, ids), rtol=1e-4, atol=1e-5)


def test_perplexity_records_and_resume(tmp_path):
    model, tok = tiny_model("llama", length=32), tiny_tokenizer()
    docs = [Document("a", "The grass is green. The sky is blue. " * 30), Document("tiny", "x")]
    path = tmp_path / "ppl.jsonl"
    records = perplexity(model, tok, docs, [32, 64], ["vanilla", "sliding-window:stride=8"], results=ResultsFile(path),
                         progress=False)
    assert len(records) == 4
    for record in records:
        metrics = record["metrics"]
        assert metrics["skipped"] == 1 and metrics["docs"] == 1
        assert math.isclose(metrics["ppl"], math.exp(metrics["nll"]), rel_tol=1e-3)
        assert record["versions"]["transformers"].startswith("5.")
        assert len(record["nll_by_position"]["mean_nll"]) > 0
    # At the training length the sliding window with window=L is the same as one pass.
    by = {(r["method"], r["length"]): r["metrics"]["ppl"] for r in records}
    assert math.isclose(by[("vanilla", 32)], by[("sliding-window:stride=8", 32)], rel_tol=1e-4)
    # Re-running finishes nothing new: every cell is read back from the file.
    again = perplexity(model, tok, docs, [32, 64], ["vanilla", "sliding-window:stride=8"], results=ResultsFile(path),
                       progress=False)
    assert [r["time"] for r in again] == [r["time"] for r in records]
    assert len(path.read_text().splitlines()) == 4
