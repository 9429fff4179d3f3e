"""Cells of a task: finished ones skipped, records in cell order, each appended the moment it is made; `--ray`
checked before any model loads (the Ray runs themselves: tests/test_cells_ray.py, slow tier)."""

import pytest
from typer.testing import CliRunner

from lengthwise.cli import app
from lengthwise import distributed
from lengthwise.eval.cells import Cell, RayPool, run_cells
from lengthwise.eval.results import ResultsFile


def _cell_function(calls):
    def run(model, tokenizer, args, advance):
        calls.append(args)
        advance(1)
        return {"key": f"k{args}", "value": args * 10}
    return run


def test_finished_cells_are_skipped_and_records_come_back_in_cell_order(tmp_path):
    out = tmp_path / "r.jsonl"
    results = ResultsFile(out)
    results.append({"key": "k2", "value": "stored"})
    calls = []
    grid = [Cell(f"k{i}", f"cell {i}", 1, i) for i in (3, 2, 1)]
    records = run_cells("toy", grid, _cell_function(calls), results, progress=False)
    assert calls == [3, 1]  # the stored cell is not run again
    assert [r["value"] for r in records] == [30, "stored", 10]
    assert [r["key"] for r in ResultsFile(out).records] == ["k2", "k3", "k1"]  # appended as made


def test_a_repeated_cell_runs_once(tmp_path):
    calls = []
    grid = [Cell("k1", "a", 1, 1), Cell("k1", "a", 1, 1)]
    records = run_cells("toy", grid, _cell_function(calls), ResultsFile(None), progress=False)
    assert calls == [1] and records[0] is records[1]


def test_a_cell_function_that_raises_leaves_the_finished_cells_stored(tmp_path):
    out = tmp_path / "r.jsonl"

    def run(model, tokenizer, args, advance):
        if args == 2:
            raise RuntimeError("boom")
        return {"key": f"k{args}"}

    with pytest.raises(RuntimeError, match="boom"):
        run_cells("toy", [Cell(f"k{i}", "", 1, i) for i in (1, 2, 3)], run, ResultsFile(out), progress=False)
    assert [r["key"] for r in ResultsFile(out).records] == ["k1"]


def test_pool_arguments_are_checked():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        RayPool("m", workers=0)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        RayPool("m", threads=0)


@pytest.mark.parametrize("command", [
    ["ppl", "--lengths", "256"],
    ["passkey", "--lengths", "256"],
    ["ruler", "--lengths", "256", "--tasks", "niah_single"],
])
def test_ray_without_ray_installed_is_one_clear_line(command, monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "ray_available", lambda: False)
    result = CliRunner().invoke(app, [*command, "--ray", "local", "--out", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 2, result.output
    assert "--ray needs Ray: pip install 'lengthwise[ray]'" in result.output
    assert not (tmp_path / "r.jsonl").exists()


def test_ray_with_the_streaming_mode_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["ppl", "--stream-tokens", "1k", "--ray", "local", "--out",
                                      str(tmp_path / "r.jsonl")])
    assert result.exit_code == 2, result.output
    assert "streaming mode" in result.output and "without --ray" in result.output
