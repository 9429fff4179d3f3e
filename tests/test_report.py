"""`lengthwise report`: tables and plots for any mix of ppl / passkey / gen-quality / bench results."""

import json

import pytest
from typer.testing import CliRunner

from lengthwise.cli import app
from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.report.build import build_report, read_results
from lengthwise.report.plots import legend_label
from lengthwise.report.tasks import bench_tables, gen_quality_tables, passkey_accuracy, passkey_depth_tables
from lengthwise.report.tasks import passkey_tables, task_tables


def _passkey(method, length, depth, correct, trials=2, seed=0):
    key = cell_key("passkey", model="m", method=method, length=length, depth=depth, trials=trials, seed=seed)
    return make_record("passkey", key, model="m", method=method, method_config=[], data="passkey", seed=seed,
                       metrics={"accuracy": correct / trials, "correct": correct, "trials": trials},
                       length=length, depth=depth, pretrain_length=256)


def _gen(method, length, bleu, rouge):
    key = cell_key("gen-quality", model="m", method=method, data="stdlib", length=length)
    return make_record("gen-quality", key, model="m", method=method, method_config=[], data="stdlib", seed=0,
                       metrics={"bleu": bleu, "rougeL": rouge, "docs": 3}, length=length, pretrain_length=256)


def _bench(method, length, prefill, decode, peak):
    key = cell_key("bench", model="m", method=method, length=length)
    return make_record("bench", key, model="m", method=method, method_config=[], data="random-ids", seed=0,
                       metrics={"prefill_s": prefill, "decode_s_per_token": decode, "peak_memory_mib": peak},
                       length=length, device="cpu", dtype="torch.float32", torch_threads=2)


def _ppl(method, length, ppl):
    key = cell_key("ppl", model="m", method=method, length=length)
    return make_record("ppl", key, model="m", method=method, method_config=[], data="stdlib", seed=0,
                       metrics={"ppl": ppl}, length=length, pretrain_length=256,
                       nll_by_position={"edges": [1, 100, 200], "mean_nll": [2.0, 1.5]})


def _passkey_records():
    return [_passkey("vanilla", 256, 0, 2), _passkey("vanilla", 256, 100, 1), _passkey("vanilla", 512, 0, 0),
            _passkey("vanilla", 512, 100, 0), _passkey("yarn:factor={s}", 256, 0, 2),
            _passkey("yarn:factor={s}", 512, 0, 1),
            _passkey("vanilla", 512, 0, 2)]  # a rerun of a cell: the later record wins


def test_passkey_table_pools_depths_and_latest_record_wins():
    records = _passkey_records()
    totals = passkey_accuracy(records)
    assert totals[("vanilla", 256)] == (3, 4) and totals[("vanilla", 512)] == (2, 4)
    table = passkey_tables(records)  # yarn ran at one depth: cells hold 4 and 2 trials, so each says how many
    assert "| vanilla | 0.75 (3/4) | 0.50 (2/4) |" in table
    assert "| yarn:factor={s} | 1.00 (2/2) | 0.50 (1/2) |" in table
    assert "correct / trials per cell" in table
    even = passkey_tables([r for r in records if r["method"] == "vanilla"])
    assert "| vanilla | 0.75 | 0.50 |" in even and "2 depths x 2 trials" in even


def test_passkey_runs_with_another_seed_are_pooled_as_more_trials():
    records = _passkey_records() + [_passkey("vanilla", 512, 0, 1, seed=1)]
    assert passkey_accuracy(records)[("vanilla", 512)] == (3, 6)
    assert "| 0% | 1.00 | 0.75 |" in passkey_depth_tables([r for r in records if r["method"] == "vanilla"])


def test_legend_labels_shorten_file_paths_and_wrap_long_specs_at_commas():
    assert legend_label("yarn:factor={s}") == "yarn:factor={s}"
    spec = ("longrope:long_factors=docs/results/longrope_factors_smollm2-135m_s4.json,n_hat=0,factor=4,"
            "attention_factor=1.07417,original_max_position_embeddings=8192")
    label = legend_label(spec)
    assert "docs/results" not in label and "long_factors=longrope_factors_smollm2-135m_s4.json" in label
    lines = label.split("\n")  # broken only at commas; a line of several options stays within the width
    assert len(lines) == 3 and all(line.endswith(",") for line in lines[:-1])
    assert all(len(line) <= 49 for line in lines if line.count(",") > 1)
    assert label.replace("\n", "") == spec.replace("docs/results/", "")  # nothing else lost or reordered
    # a combination keeps every method and option; a `[..]` list is never broken inside
    combined = "yarn:factor=4+longrope:long_factors=results/search/factors.json,n_hat=[1,2,3],factor=4"
    combined_label = legend_label(combined, width=20)
    assert combined_label.replace("\n", "") == combined.replace("results/search/", "")
    assert "n_hat=[1,2,3]," in combined_label.split("\n")  # whole, on a line of its own at this width


def test_gen_quality_and_bench_tables():
    table = gen_quality_tables([_gen("vanilla", 256, 12.345, 0.4), _gen("vanilla", 1024, 1.0, 0.1),
                                _gen("lm-infinite", 1024, 9.0, 0.35)])
    assert "| vanilla | 12.35 / 0.400 | 1.00 / 0.100 |" in table and "| lm-infinite | - | 9.00 / 0.350 |" in table
    table = bench_tables([_bench("vanilla", 256, 0.5, 0.002, 30.0), _bench("lm-infinite", 256, 0.25, 0.001, 12.0)])
    assert "| vanilla | 0.500 |" in table and "| vanilla | 2.00 |" in table and "| lm-infinite | 12 |" in table


def test_build_report_mixes_every_task(tmp_path):
    files = {}
    for name, records in (("passkey", _passkey_records()),
                          ("gq", [_gen("vanilla", 256, 10.0, 0.4), _gen("vanilla", 1024, 2.0, 0.2)]),
                          ("bench", [_bench("vanilla", 256, 0.5, 0.002, 30.0), _bench("vanilla", 1024, 2.0, 0.004, 90.0)]),
                          ("ppl", [_ppl("vanilla", 256, 5.0), _ppl("vanilla", 1024, 50.0)])):
        results = ResultsFile(tmp_path / f"{name}.jsonl")
        for record in records:
            results.append(record)
        files[name] = tmp_path / f"{name}.jsonl"
    path = build_report(list(files.values()), tmp_path / "report")
    text = path.read_text()
    for heading in ("## Perplexity by length", "## Passkey retrieval", "## Generation quality", "## Speed and memory"):
        assert heading in text
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["bench.png", "gen_quality.png", "passkey_by_length_m.png", "passkey_heatmap_m.png", "ppl_m_stdlib.png"]
    for png in pngs:
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in text
    assert task_tables(read_results([files["passkey"], files["gq"]])).count("\n|---|") == 2


def test_report_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="results file .*nothere.jsonl not found"):
        read_results([tmp_path / "nothere.jsonl"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no results records"):
        read_results([empty])
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"task": "sing", "key": "x"}) + "\n")
    with pytest.raises(ValueError, match="unknown task.*sing.*accepted: ppl, passkey, gen-quality, bench"):
        read_results([odd])
    with pytest.raises(ValueError, match="no results file given"):
        read_results([])


def test_report_cli(tmp_path):
    results = ResultsFile(tmp_path / "passkey.jsonl")
    for record in _passkey_records():
        results.append(record)
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path / "passkey.jsonl"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "| vanilla | 0.75 (3/4) | 0.50 (2/4) |" in result.output and (tmp_path / "out" / "report.md").exists()
    result = runner.invoke(app, ["report", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "not found" in result.output
