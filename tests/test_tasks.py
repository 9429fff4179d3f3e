"""Passkey, gen-quality and bench: the scoring shortcut against generation, resumable results, bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lengthwise.api import bundled_models, load_model, patch
from lengthwise.cli import app
from lengthwise.data.corpus import Document
from lengthwise.data.passkey import PasskeyPrompt, make_passkey_prompt
from lengthwise.eval.gen_quality import gen_quality, text_scores
from lengthwise.eval.passkey import check_depths, first_integer, passkey, predict_answer, score, trial_key
from lengthwise.scoring import RecomputeDecoder, open_scorer
from lengthwise.eval.results import ResultsFile
from lengthwise.eval.speed import bench, build_llama
from lengthwise.eval.tasks import (
    InsufficientMemoryError,
    check_memory,
    check_specs,
    estimate_memory,
    resolve_spec,
)
from lengthwise.generation import generate
from lengthwise.registry import get_entry, is_scorer, spec_names
from lengthwise.testing import tiny_model, tiny_tokenizer

PROMPT_LENGTH = 120  # the tiny tokenizer needs 111 tokens for instruction + needle + question


def _spec_cases():
    for name in spec_names():
        families = ["llama"] if "rope" in get_entry(name).encodings else []
        families += ["bloom"] if "alibi" in get_entry(name).encodings else []
        for family in families:
            yield pytest.param(family, name, id=f"{family}-{name}")
    for spec in ("lm-infinite:n_local=16,top_k=3,middle_queries=last",
                 "lm-infinite:n_local=16,top_blocks=2,retrieval_block=8"):
        yield pytest.param("llama", spec, id=f"llama-{spec}")  # middle retrieval depends on the calls made


@pytest.mark.parametrize(("family", "method"), list(_spec_cases()))
def test_teacher_forced_argmax_equals_greedy_generation(family, method):
    # Exact match under greedy decoding == every answer token is the argmax when teacher-forced: feed the greedy
    # continuation back as the "answer"; one pass must predict exactly it (any method, cache and prefill paths).
    model = tiny_model(family, length=32)
    prompt = make_passkey_prompt(tiny_tokenizer(), PROMPT_LENGTH, 0.5, "12345")
    greedy = generate(model, torch.tensor([prompt.input_ids]), method, max_new_tokens=6).tolist()
    as_answer = PasskeyPrompt(prompt.input_ids, greedy, "", 0.5)
    with open_scorer(model, method) as scorer:
        predicted, free = predict_answer(scorer.decoder(), as_answer, greedy_tokens=6)
        if not is_scorer(method):
            one_pass, _ = predict_answer(RecomputeDecoder(model), as_answer)  # without a cache: one pass
            assert scorer.handle.new_cache() is not None or one_pass == greedy
    assert predicted == greedy and free == greedy  # teacher-forced and greedy branches both reproduce generate()
    # A wrong token at position 3 is caught there, and the tokens before it still match.
    wrong = greedy[:3] + [(greedy[3] + 1) % 300] + greedy[4:]
    exact, fraction = score(predicted, wrong)
    assert not exact and fraction == pytest.approx(5 / 6)


def test_found_metric_takes_the_first_integer_as_the_official_script_does():
    assert first_integer("the 49484. Remember") == "49484"
    assert first_integer(" 4948 4") == "4948" and first_integer("no digits") is None


def test_passkey_cells_keys_and_resume(tmp_path):
    model, tokenizer = tiny_model("llama", length=64), tiny_tokenizer()
    path = tmp_path / "passkey.jsonl"
    methods = ["vanilla", "sliding-window", "yarn:factor={s}"]
    records = passkey(model, tokenizer, [120, 160], [0, 100], methods, trials=2, results=ResultsFile(path),
                      model_name="tiny", progress=False)
    assert len(records) == 12
    # Short lengths first, every method (a run stopped early still covers every method at its first lengths).
    assert [r["length"] for r in records] == [120] * 6 + [160] * 6
    by_cell = {(r["method"], r["length"], r["depth"]): r for r in records}
    # The same keys for every method (fixed by seed, length, depth, trial); the resolved scale is n / L.
    assert by_cell[("vanilla", 160, 0)]["keys"] == by_cell[("yarn:factor={s}", 160, 0)]["keys"]
    assert by_cell[("vanilla", 160, 0)]["keys"] == [trial_key(0, 160, 0, t) for t in range(2)]
    assert by_cell[("yarn:factor={s}", 160, 0)]["method_resolved"] == "yarn:factor=2.5"
    assert by_cell[("yarn:factor={s}", 160, 0)]["method_config"][0]["factor"] == 2.5
    assert by_cell[("sliding-window", 120, 100)]["method_config"] == [{"method": "sliding-window", "window": 64, "stride": 8}]
    for r in records:
        assert 0 <= r["metrics"]["accuracy"] <= 1 and r["metrics"]["trials"] == 2 and r["data"] == "passkey"
        assert r["machine"] and r["versions"]["torch"]
    lines = path.read_text().splitlines()
    again = passkey(model, tokenizer, [120, 160], [0, 100], methods, trials=2, results=ResultsFile(path),
                    model_name="tiny", progress=False)
    assert path.read_text().splitlines() == lines and [r["key"] for r in again] == [r["key"] for r in records]
    assert "_lengthwise_handle" not in model.__dict__  # every patch removed


@pytest.mark.skipif("llama-rope-256" not in bundled_models(), reason="reference model not bundled")
def test_reference_model_retrieves_the_passkey_inside_its_training_length():
    # The precondition: >= 90% at the training length, otherwise the task measures nothing.
    model, tokenizer = load_model("llama-rope-256")
    # The grid of benchmarks/passkey.py at 256 tokens: 5 depths x 3 trials (measured: 14/15).
    records = passkey(model, tokenizer, [256], [0, 25, 50, 75, 100], ["vanilla"], trials=3, progress=False)
    correct = sum(r["metrics"]["correct"] for r in records)
    assert correct / 15 >= 0.9


def test_passkey_bad_input_is_named_before_any_work():
    model, tokenizer = tiny_model("llama", length=64), tiny_tokenizer()
    with pytest.raises(ValueError, match=r"depth 150 is outside 0..100"):
        passkey(model, tokenizer, [120], [0, 150], ["vanilla"], progress=False)
    with pytest.raises(ValueError, match=r"unknown method 'nosuch'; accepted: .*vanilla"):
        passkey(model, tokenizer, [120], [0], ["nosuch"], progress=False)
    with pytest.raises(ValueError, match=r"passkey length 10 is too short"):
        passkey(model, tokenizer, [10], [0], ["vanilla"], progress=False)
    with pytest.raises(ValueError, match=r"passkey prompt needs at least 111 tokens, asked for 100"):
        passkey(model, tokenizer, [100, 200], [0], ["vanilla"], progress=False)  # before the 200-token cells run
    with pytest.raises(ValueError, match=r"no option 'scale'"):
        check_specs(["yarn:scale={s}"])
    with pytest.raises(ValueError, match=r"trials must be >= 1"):
        passkey(model, tokenizer, [120], [0], ["vanilla"], trials=0, progress=False)
    assert check_depths([0, 37.5, 100]) == [0, 37.5, 100]


def test_scale_template():
    assert resolve_spec("yarn:factor={s}+lm-infinite", 1024, 256) == "yarn:factor=4+lm-infinite"
    assert resolve_spec("linear:factor={s}", 100, 256) == "linear:factor=1"  # never below 1
    assert resolve_spec("ntk:factor={s}", 356, 256) == "ntk:factor=1.3906"
    assert resolve_spec("vanilla", 4096, 256) == "vanilla"


def test_memory_estimate_scales_and_refuses_what_cannot_fit():
    model = tiny_model("llama", length=64)
    model.config._attn_implementation = "eager"
    small, big = estimate_memory(model, 1000), estimate_memory(model, 2000)
    assert big.attention == 4 * small.attention and big.kv == 2 * small.kv
    # SDPA's fused kernels hold no n x n scores: dense SDPA is estimated like the blocked kernel, plus the mask of a
    # padded batch.
    model.config._attn_implementation = "sdpa"
    assert estimate_memory(model, 100_000).attention == estimate_memory(model, 100_000, "lm-infinite").attention
    assert estimate_memory(model, 100_000, batch=2).attention > 2 * estimate_memory(model, 100_000).attention
    model.config._attn_implementation = "eager"
    # Λ attention (blocked kernel) and the sliding window keep the score tensor small.
    assert estimate_memory(model, 100_000, "lm-infinite").attention < estimate_memory(model, 100_000).attention / 40
    assert estimate_memory(model, 100_000, "sliding-window").total == estimate_memory(model, 64).total
    with pytest.raises(InsufficientMemoryError, match=r"length 1000000 with method 'vanilla' needs about .* GiB"):
        check_memory(model, [1000, 1_000_000], ["vanilla", "lm-infinite"], limit_bytes=2**30)
    check_memory(model, [1000], ["vanilla"], limit_bytes=2**30)  # fits: no error


def _documents():
    text = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(200))
    return [Document("a.py", text), Document("short.py", "x = 1\n"), Document("b.py", text[::-1])]


def test_gen_quality_scores_match_generate_and_resume(tmp_path):
    model, tokenizer = tiny_model("llama", length=32), tiny_tokenizer()
    path = tmp_path / "gq.jsonl"
    records = gen_quality(model, tokenizer, _documents(), [40], ["vanilla", "sliding-window"], new_tokens=12,
                          max_docs=2, results=ResultsFile(path), model_name="tiny", data_name="code",
                          progress=False)
    assert [(r["method"], r["length"]) for r in records] == [("vanilla", 40), ("sliding-window", 40)]
    record = records[0]
    assert record["metrics"]["docs"] == 2 and record["metrics"]["skipped"] == 1
    assert record["doc_names"] == ["a.py", "b.py"]
    assert "text" not in json.dumps(record["metrics"])
    # The scores are those of `generate` on the same prefix.
    ids = tokenizer(_documents()[0].text, add_special_tokens=False)["input_ids"]
    new = generate(model, torch.tensor([ids[:40]]), "vanilla", max_new_tokens=12)
    expected = text_scores([tokenizer.decode(new.tolist())], [tokenizer.decode(ids[40:52])])
    assert record["per_doc"]["rougeL"][0] == expected["per_doc"]["rougeL"][0]
    again = gen_quality(model, tokenizer, _documents(), [40], ["vanilla", "sliding-window"], new_tokens=12,
                        max_docs=2, results=ResultsFile(path), model_name="tiny", data_name="code", progress=False)
    assert len(path.read_text().splitlines()) == 2 and again[1]["key"] == records[1]["key"]


def test_text_scores_reference_points():
    refs = ["the quick brown fox jumps over the lazy dog", "return x + 1"]
    same = text_scores(refs, refs)
    assert same["bleu"] == pytest.approx(100.0) and same["rougeL"] == pytest.approx(1.0)
    other = text_scores(["completely unrelated words here", "pass"], refs)
    assert other["bleu"] < 5 and other["rougeL"] == 0.0
    with pytest.raises(ValueError, match="as many hypotheses as references"):
        text_scores(["a"], [])


def test_gen_quality_bad_input():
    model, tokenizer = tiny_model("llama", length=32), tiny_tokenizer()
    with pytest.raises(ValueError, match="holds no documents"):
        gen_quality(model, tokenizer, [], [40], progress=False)
    with pytest.raises(ValueError, match=r"no document of 'code' has 100000 \+ 100 tokens \(3 shorter ones skipped\)"):
        gen_quality(model, tokenizer, _documents(), [100000], data_name="code", progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        gen_quality(model, tokenizer, _documents(), [40], ["nosuch"], progress=False)


def test_bench_measures_every_cell_and_the_bounded_cache(tmp_path):
    model = build_llama(hidden=32, layers=2, heads=2, vocab=64, train_length=16)
    path = tmp_path / "bench.jsonl"
    records = bench(model, [24, 64], ["vanilla", "lm-infinite", "sliding-window"], decode_steps=2,
                    results=ResultsFile(path), model_name="tiny", progress=False)
    assert len(records) == 6
    cells = {(r["method"], r["length"]): r["metrics"] for r in records}
    for metrics in cells.values():
        assert metrics["prefill_s"] > 0 and metrics["decode_s_per_token"] > 0
        assert metrics["peak_memory_mib"] == metrics["peak_memory_mib"]  # measured (not NaN)
    # Dense keeps every key; the Λ cache holds n_global + n_local (10 + 16), the step's key and 16 // 8 spare slots
    # at most; sliding-window keeps none.
    per_token = 2 * 2 * 32 * 4  # layers x (keys + values) x hidden x float32 bytes
    assert cells[("vanilla", 64)]["cache_bytes"] == (64 + 2) * per_token  # prompt + 2 decoded
    assert cells[("lm-infinite", 64)]["cache_bytes"] <= (10 + 16 + 1 + 16 // 8) * per_token
    assert cells[("sliding-window", 64)]["cache_bytes"] == 0
    assert records[0]["attn_implementation"] == "sdpa" and records[0]["device"] == "cpu"
    bench(model, [24, 64], ["vanilla", "lm-infinite", "sliding-window"], decode_steps=2, results=ResultsFile(path),
          model_name="tiny", progress=False)
    assert len(path.read_text().splitlines()) == 6


def test_build_llama_bad_sizes():
    with pytest.raises(ValueError, match=r"hidden \(30\) must split into 4 heads"):
        build_llama(hidden=30, heads=4)
    with pytest.raises(ValueError, match=r"heads \(4\) must be a multiple of kv_heads \(3\)"):
        build_llama(hidden=32, heads=4, kv_heads=3)


runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["passkey", "--depths", "0,150"], "depth 150.0 is outside 0..100"),
        (["passkey", "--lengths", "256,x"], "lengths must be comma-separated numbers"),
        (["passkey", "-m", "nosuch"], "unknown method 'nosuch'"),
        (["gen-quality", "--data", "/no/such/corpus"], "unknown corpus '/no/such/corpus'"),
        (["bench", "--lengths", "1"], "bench length 1 is too short"),
        (["bench", "--dtype", "int3"], "unknown dtype 'int3'"),
        (["bench", "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_cli_rejects_bad_input_before_loading(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()).replace("│", "").replace("  ", " ") or message in result.output


def test_cli_memory_check_and_tiny_bench(tmp_path):
    result = runner.invoke(app, ["bench", "--model", "llama", "--hidden", "32", "--layers", "1", "--heads", "2",
                                 "--lengths", "100000000", "--memory-limit-gib", "1", "--out", str(tmp_path / "b.jsonl")])
    assert result.exit_code == 2 and "needs about" in result.output
    result = runner.invoke(app, ["bench", "--model", "llama", "--hidden", "32", "--layers", "1", "--heads", "2",
                                 "--vocab", "64", "--train-length", "16", "--lengths", "24,48", "-m", "vanilla",
                                 "-m", "streaming", "--decode-steps", "1", "--quiet", "--out", str(tmp_path / "b.jsonl")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 4 and "prefill s" in result.output
