"""Streaming perplexity (lengthwise.eval.streaming, `lengthwise ppl --stream-tokens`): one long stream through the
method's bounded cache equals one pass over the same tokens; buckets add up; a paused or crashed run resumes to the
uninterrupted result; the CLI writes its record; bad input gets one line."""

import json
import math

import pytest
import torch

import lengthwise
from lengthwise.cli import main
from lengthwise.eval import streaming
from lengthwise import scoring
from lengthwise.scoring import nll_one_pass, nll_sliding_window
from lengthwise.eval.results import ResultsFile
from lengthwise.eval.streaming import (
    Buckets,
    TokenStream,
    bucket_edges,
    document_separator,
    parse_token_count,
    stream_sources,
    stream_token_ids,
    streaming_perplexity,
)
from lengthwise.testing import tiny_model, tiny_tokenizer

TEXTS = {  # about 110, 180 and 1080 tokens of the tiny tokenizer
    "a.txt": "The grass is green. The sky is blue.\n" * 10,
    "b.txt": "The pass key is 12345. def main(): return 0\n" * 10,
    "c.txt": "def main():\n    return 0\nThe sky is blue.\n" * 60,
}
PIECE = 100  # characters per tokenised piece: several pieces per document, so piecewise tokenisation is exercised


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in TEXTS.items():
        (folder / name).write_text(text)
    return stream_sources(str(folder))


def _run(model, sources, n, method, **kwargs):
    options = dict(chunk_size=24, num_buckets=8, piece_chars=PIECE, progress=False)
    return streaming_perplexity(model, tiny_tokenizer(), sources, n, method, **{**options, **kwargs})


def _reference_buckets(nll: torch.Tensor, edges: list[int]) -> tuple[list[float], list[int]]:
    """Sums and counts per bucket of a whole per-token NLL array (target positions 1..N-1)."""
    sums = [nll[a - 1 : b - 1].double().sum().item() for a, b in zip(edges[:-1], edges[1:])]
    return sums, [b - a for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize(("family", "method"), [("llama", "lm-infinite"), ("llama", "streaming:n_sink=2"),
                                                ("llama", "yarn:factor=2+lm-infinite:n_global=4"),
                                                ("bloom", "lm-infinite")])
def test_stream_equals_one_pass_with_the_same_method(family, method, corpus):
    model, n = tiny_model(family, length=32), 300
    record = _run(model, corpus, n, method)
    ids = torch.tensor(stream_token_ids(corpus, tiny_tokenizer(), n, piece_chars=PIECE))
    with lengthwise.patch(model, method) as handle:
        one_pass = nll_one_pass(model, ids)  # the whole stream at once: fits at this length
        chunked = nll_one_pass(model, ids, chunk_size=24, cache=handle.new_cache())
    torch.testing.assert_close(chunked, one_pass, rtol=1e-4, atol=1e-5)
    buckets = record["nll_by_position"]
    sums, counts = _reference_buckets(one_pass, buckets["edges"])
    assert buckets["counts"] == counts
    assert buckets["sum_nll"] == pytest.approx(sums, rel=1e-5, abs=1e-4)
    assert record["metrics"]["nll"] == pytest.approx(one_pass.mean().item(), rel=1e-5)
    assert record["metrics"]["tokens"] == n - 1 and record["mode"] == "stream"
    assert record["stream"]["documents"] == 3  # 300 tokens reach the third document


def test_sliding_window_streams_as_the_baseline(corpus):
    model, n = tiny_model("llama", length=32), 290
    record = _run(model, corpus, n, "sliding-window:stride=8")
    ids = torch.tensor(stream_token_ids(corpus, tiny_tokenizer(), n, piece_chars=PIECE))
    sums, _ = _reference_buckets(nll_sliding_window(model, ids, 32, 8), record["nll_by_position"]["edges"])
    assert record["nll_by_position"]["sum_nll"] == pytest.approx(sums, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("scale", ["log", "linear"])
def test_buckets_sum_to_the_total(scale, corpus):
    record = _run(tiny_model("llama", length=32), corpus, 257, "lm-infinite", bucket_scale=scale, num_buckets=16)
    buckets = record["nll_by_position"]
    edges = buckets["edges"]
    assert edges[0] == 1 and edges[-1] == 257 and all(a < b for a, b in zip(edges, edges[1:]))
    assert sum(buckets["counts"]) == record["metrics"]["tokens"] == 256
    assert math.fsum(buckets["sum_nll"]) / 256 == pytest.approx(record["metrics"]["nll"], rel=1e-6)
    assert record["metrics"]["ppl"] == pytest.approx(math.exp(record["metrics"]["nll"]), rel=1e-4)
    assert len(buckets["mean_nll"]) == len(edges) - 1 and None not in buckets["mean_nll"]


def test_bucket_edges_and_running_sums():
    assert bucket_edges(1000, 4, "linear") == [1, 251, 501, 750, 1000]
    log = bucket_edges(10**7, 32, "log")
    assert log[0] == 1 and log[-1] == 10**7 and len(log) <= 33
    edges = bucket_edges(100, 4, "linear")
    buckets = Buckets(edges)
    nll = torch.rand(99)
    for start in range(0, 99, 7):  # chunk boundaries across bucket edges
        buckets.add(start + 1, nll[start : start + 7])
    assert buckets.counts.tolist() == [b - a for a, b in zip(edges, edges[1:])] and sum(buckets.counts) == 99
    assert buckets.sums.sum().item() == pytest.approx(nll.double().sum().item())
    with pytest.raises(ValueError, match="unknown bucket scale"):
        bucket_edges(100, 4, "cubic")


@pytest.mark.parametrize("text", ["200000", "200_000", "200k", "10M", "1.5M"])
def test_token_counts_parse(text):
    assert parse_token_count(text) == {"200000": 200000, "200_000": 200000, "200k": 200000, "10M": 10**7,
                                       "1.5M": 1_500_000}[text]


@pytest.mark.parametrize("text", ["0", "1", "-5", "abc", "1.5", "", "1e400"])
def test_token_counts_refuse(text):
    with pytest.raises(ValueError, match="must be a positive integer number of tokens"):
        parse_token_count(text)


def test_token_stream_resumes_at_any_position(corpus):
    tok = tiny_tokenizer()
    separator = document_separator(tok)
    whole = stream_token_ids(corpus, tok, 10**6, piece_chars=PIECE)
    assert whole.count(separator[0]) >= 3  # one separator after each document (EOS)
    one_piece = stream_token_ids(corpus[:1], tok, 10**6, piece_chars=10**6)
    assert one_piece == tok(TEXTS["a.txt"], add_special_tokens=False)["input_ids"] + separator
    stream = TokenStream(corpus, tok, separator=separator, piece_chars=PIECE)
    taken = []
    for size in (5, 37, 1, 200, 64):
        taken += stream.take(size)
        again = TokenStream(corpus, tok, separator=separator, piece_chars=PIECE, start=stream.position())
        assert taken + again.take(150) == whole[: len(taken) + 150]
    assert taken == whole[: len(taken)]


@pytest.mark.parametrize("method", ["lm-infinite", "streaming", "sliding-window:stride=8"])
def test_paused_runs_resume_to_the_uninterrupted_result(method, corpus, tmp_path):
    model, n = tiny_model("llama", length=32), 300
    whole = _run(model, corpus, n, method, checkpoint_dir=tmp_path / "whole")
    ckpts, results = tmp_path / "paused", ResultsFile(tmp_path / "paused.jsonl")
    record, calls = None, 0
    while record is None:  # 2 chunks per call: pauses at checkpoints that fall anywhere in the buckets
        record = _run(model, corpus, n, method, checkpoint_dir=ckpts, results=results, max_chunks=2)
        calls += 1
        if record is None:
            snapshot = json.loads(next(ckpts.glob("*.json")).read_text())
            assert 0 < snapshot["offset"] < n and snapshot["memory"][-1]["peak_rss_mib"] > 0
    assert calls > 2 and record["stream"]["resumes"] == calls - 1
    assert record["nll_by_position"]["counts"] == whole["nll_by_position"]["counts"]
    assert record["nll_by_position"]["sum_nll"] == pytest.approx(whole["nll_by_position"]["sum_nll"], rel=1e-6,
                                                                 abs=1e-5)
    assert record["metrics"]["nll"] == pytest.approx(whole["metrics"]["nll"], rel=1e-6)
    assert not list(ckpts.glob("*.pt"))  # the finished record replaces the checkpoint
    again = _run(model, corpus, n, method, checkpoint_dir=ckpts, results=ResultsFile(tmp_path / "paused.jsonl"))
    assert again["time"] == record["time"]  # a finished stream is read back, not run again


def test_a_crashed_run_resumes_from_its_last_checkpoint(corpus, tmp_path, monkeypatch):
    model, n = tiny_model("llama", length=32), 300
    whole = _run(model, corpus, n, "lm-infinite")
    original, calls = scoring.CacheStream.step, {"n": 0}

    def crash_at_the_eighth_chunk(self, *args):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt  # killed mid-run: no checkpoint is written now
        return original(self, *args)

    monkeypatch.setattr(scoring.CacheStream, "step", crash_at_the_eighth_chunk)
    with pytest.raises(KeyboardInterrupt):
        _run(model, corpus, n, "lm-infinite", checkpoint_dir=tmp_path, checkpoint_every=48)
    monkeypatch.setattr(scoring.CacheStream, "step", original)
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["offset"] == 144  # the checkpoint before the crash
    record = _run(model, corpus, n, "lm-infinite", checkpoint_dir=tmp_path, checkpoint_every=48)
    assert record["stream"]["resumes"] == 1
    assert record["nll_by_position"]["sum_nll"] == pytest.approx(whole["nll_by_position"]["sum_nll"], rel=1e-6,
                                                                 abs=1e-5)


def test_memory_held_does_not_grow_with_the_stream(corpus, tmp_path):
    """What a checkpoint holds (the running sums, the bounded cache, a one-token lookahead) does not grow for a
    stream twice as long, paused twice as far in; the cache holds at most n_global + n_local + slack + chunk keys."""
    model = tiny_model("llama", length=32)
    sizes = []
    for n, chunks in ((300, 5), (600, 10)):
        folder = tmp_path / str(n)
        assert _run(model, corpus, n, "lm-infinite", checkpoint_dir=folder, max_chunks=chunks) is None
        state = torch.load(next(folder.glob("*.pt")), weights_only=True)  # plain data: no cache object
        assert len(state["buffer"]) == 1 and state["offset"] == 24 * chunks
        layers = state["scorer"]["layers"]
        assert all(layer["seen"] == 24 * chunks and layer["keys"].shape[-2] <= 10 + 32 + 4 + 24 for layer in layers)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for layer in layers
                    for value in layer.values() for t in (value if isinstance(value, tuple) else (value,))
                    if isinstance(t, torch.Tensor)}
        sizes.append((sum(storages.values()), len(state["buckets"]["sums"])))
    assert sizes[1][1] == sizes[0][1] and sizes[1][0] <= 1.25 * sizes[0][0], sizes


def test_checkpoint_of_another_stream_or_a_torn_file_is_refused(corpus, tmp_path):
    model = tiny_model("llama", length=32)
    assert _run(model, corpus, 300, "lm-infinite", checkpoint_dir=tmp_path, max_chunks=2) is None
    path = next(tmp_path.glob("*.pt"))
    changed = stream_sources(str(corpus[0].path.parent))
    changed[0].path.write_text(TEXTS["a.txt"] + "one more line\n")
    with pytest.raises(ValueError, match="belongs to another stream"):
        _run(model, changed, 300, "lm-infinite", checkpoint_dir=tmp_path)
    path.write_bytes(b"torn")
    with pytest.raises(ValueError, match="cannot be read"):
        _run(model, changed, 300, "lm-infinite", checkpoint_dir=tmp_path)


def test_methods_without_a_bounded_cache_are_refused(corpus):
    model = tiny_model("llama", length=32)
    for method in ("vanilla", "yarn:factor=2"):
        with pytest.raises(ValueError, match="has no bounded KV cache"):
            _run(model, corpus, 100, method)
    assert "_lengthwise_handle" not in model.__dict__  # nothing left patched


def test_lm_infinite_with_middle_retrieval_is_refused(corpus):
    model = tiny_model("llama", length=32)
    with pytest.raises(ValueError, match="memory grows with the stream"):
        _run(model, corpus, 100, "lm-infinite:top_k=4")
    assert "_lengthwise_handle" not in model.__dict__


# ---------------------------------------------------------------------------------------------------- command line


def _cli(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args + ["--quiet"])
    return stop.value.code, capsys.readouterr()


def test_cli_writes_its_record_and_resumes(tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text("".join(TEXTS.values()) * 4)
    out = tmp_path / "res" / "ppl.jsonl"
    args = ["ppl", "--model", "llama-rope-256", "--data", str(text), "--stream-tokens", "1k", "-m", "lm-infinite",
            "--chunk-size", "128", "--buckets", "8", "--out", str(out)]
    code, captured = _cli(args + ["--stop-after-chunks", "3"], capsys)
    assert code == 0 and "run the same command again to resume" in " ".join(captured.out.split())
    assert not out.exists() and json.loads(next((tmp_path / "res" / "ppl.stream").glob("*.json")).read_text())[
        "offset"] == 384
    code, captured = _cli(args, capsys)
    assert code == 0, captured.err
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["task"] == "ppl" and record["mode"] == "stream" and record["length"] == 1000
    assert record["stream"]["resumes"] == 1 and record["metrics"]["tokens"] == 999
    assert record["metrics"]["peak_rss_mib"] > 0 and len(record["stream"]["memory"]) >= 2
    assert (tmp_path / "res" / "ppl.png").exists() and "tokens/s" in captured.out
    code, _ = _cli(args, capsys)  # finished: read back, nothing appended
    assert code == 0 and len(out.read_text().splitlines()) == 1


BAD = [  # (arguments after `ppl`, a piece of the expected line)
    ("--stream-tokens 0", "--stream-tokens must be a positive integer number of tokens"),
    ("--stream-tokens -5", "--stream-tokens must be a positive integer number of tokens"),
    ("--stream-tokens abc", "got 'abc'"),
    ("--stream-tokens 1.5", "--stream-tokens must be a positive integer"),
    ("--stream-tokens 1000", "method 'vanilla' has no bounded KV cache"),  # the default methods
    ("--stream-tokens 1000 -m yarn:factor=2", "method 'yarn:factor=2' has no bounded KV cache"),
    ("--stream-tokens 1000 -m lm-infinite --data /no/such/book.txt", "unknown corpus '/no/such/book.txt'"),
    ("--stream-tokens 1000 -m lm-infinite --data {tmp}/empty.txt", "holds no non-empty documents"),
    ("--stream-tokens 1000 -m lm-infinite --bucket-scale cubic", "unknown bucket scale 'cubic'; accepted: log"),
    ("--stream-tokens 1000 -m lm-infinite --buckets 0", "--buckets"),
    ("--stream-tokens 1000 -m lm-infinite --checkpoint-every x", "--checkpoint-every must be a positive integer"),
    ("--stream-tokens 1000 -m lm-infinite --out {tmp}/passkey.jsonl", "holds results of task passkey"),
    ("--stream-tokens 10M -m lm-infinite --data {tmp}/small.txt", "fewer than the 10,000,000 asked"),
]


@pytest.mark.parametrize(("line", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_one_line(line, expected, tmp_path, capsys):
    (tmp_path / "small.txt").write_text(TEXTS["a.txt"])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "passkey.jsonl").write_text(json.dumps({"schema": 1, "task": "passkey", "key": "k", "model": "m",
                                                        "method": "vanilla", "metrics": {}}) + "\n")
    args = ["ppl", "--model", "llama-rope-256", "--out", str(tmp_path / "ppl.jsonl")]
    code, captured = _cli(args + line.format(tmp=tmp_path).split(), capsys)
    lines = [t for t in captured.err.splitlines() if t.strip() and not t.startswith(("Loading", "ppl "))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected.format(tmp=tmp_path) in lines[0] and "Traceback" not in captured.err
