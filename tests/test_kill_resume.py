"""Kill and resume: a long command killed with SIGKILL at a random point and started again with the same arguments
ends with the same outputs as an uninterrupted run, and leaves no half-written file behind (docs/guarantees.md).

The SIGKILL runs (slow tier) compare everything each command writes into its output folder: the file names (no
leftover checkpoint, lock or temporary file), and the content of every JSON, JSON-lines and torch file, read
strictly (a torn line fails), with only time, machine and version fields left out (`VOLATILE`). The default tier
holds the cheap checks of the resume logic that need no subprocess: a torn last line, or a checkpoint left by a
partial run, continued in process.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lengthwise.cli import app
from lengthwise.io import append_jsonl, read_jsonl

SCRIPT = str(Path(sys.executable).with_name("lengthwise"))
# Each command with tiny arguments: a few seconds of work after start-up, so a random kill lands mid-run. `out`: the
# command writes a file (results, with its plot and checkpoints beside it) or a folder.
COMMANDS = {
    "ppl": (["ppl", "--lengths", "256,512,1024", "-m", "vanilla", "-m", "lm-infinite", "--max-docs", "2", "--quiet"],
            "file"),
    "ppl-stream": (["ppl", "--stream-tokens", "6k", "-m", "lm-infinite", "-m", "sliding-window", "--chunk-size", "128",
                    "--buckets", "8", "--checkpoint-every", "512", "--quiet"], "file"),
    "passkey": (["passkey", "--lengths", "256,512", "--depths", "0,100", "--trials", "2", "--quiet"], "file"),
    "ruler": (["ruler", "--tasks", "niah_single", "--lengths", "256,512", "--samples", "1", "--quiet"], "file"),
    "gen-quality": (["gen-quality", "--lengths", "64,128,256", "-m", "vanilla", "-m", "lm-infinite", "--new-tokens",
                     "16", "--max-docs", "2", "--quiet"], "file"),
    "temp-lora-eval": (["temp-lora", "eval", "--max-docs", "3", "--max-tokens", "512", "--min-tokens", "256", "--chunk",
                        "64", "--window", "128", "--buckets", "128,256"], "file"),
    "search": (["search", "--scale", "2", "--docs", "1", "--data", "stdlib", "--population", "6", "--parents", "3",
                "--mutations", "2", "--crossovers", "2", "--iterations", "8", "--short-length", "128",
                "--short-iterations", "3"], "dir"),
    "lab-train": (["lab", "train", "--pe", "rope", "--pe", "alibi", "--context", "32", "--d-model", "32", "--layers",
                   "1", "--heads", "2", "--steps", "120", "--batch", "4", "--max-chars", "20000",
                   "--checkpoint-every", "5"], "dir"),
}
# Fields that differ between any two runs however they went: wall time, this machine and its resident memory,
# package versions, and how often a stream was resumed (by construction). Dropped at any depth; nothing else is.
VOLATILE = frozenset({"time", "machine", "versions", "outputs_seconds", "seconds", "elapsed_s", "train_seconds",
                      "ms_per_token", "tokens_per_s", "memory", "peak_rss_mib", "resumes"})
# Files whose bytes are not compared (matplotlib writes its version into them); that they exist is.
UNCOMPARED = (".png",)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # a shared 2-core machine: one thread each, the same in every run


def _stable(obj):
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, (list, tuple)):
        return [_stable(v) for v in obj]
    if isinstance(obj, torch.Tensor):  # bit for bit: dtype, shape and bytes
        return (str(obj.dtype), tuple(obj.shape), hashlib.sha1(obj.detach().contiguous().numpy().tobytes()).digest())
    return obj


def _read(path: Path):
    """A file's content, read strictly: a torn JSON line or a half-written file raises here."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)  # every torch file lengthwise writes is plain data
    if path.suffix in UNCOMPARED:
        return None
    return path.read_text()


def _snapshot(folder: Path) -> dict:
    """Every file under `folder` (relative name -> stable content)."""
    return {str(p.relative_to(folder)): _stable(_read(p)) for p in sorted(folder.rglob("*")) if p.is_file()}


def _argv(args: list[str], kind: str) -> list[str]:
    # a relative --out, run inside each run's own folder: paths written into the outputs are the same in both
    return [SCRIPT, *args, "--out", "r.jsonl" if kind == "file" else "out"]


def _started(folder: Path) -> bool:
    """The run has made progress worth killing: a record, a checkpoint or a snapshot is on disk."""
    return any(p.is_file() and p.suffix in (".jsonl", ".json", ".pt") and "_data" not in p.parts
               for p in folder.rglob("*"))


def _kill_at_a_random_point(argv: list[str], folder: Path, whole_seconds: float, rng: random.Random) -> str:
    """Start the command; once it has made progress, SIGKILL it after a random further delay drawn below the time an
    uninterrupted run still needed. A run that finished before its kill is started over in a fresh folder with a
    shorter draw (the last try kills at the first progress). Returns where the kill fell, for the failure message."""
    for attempt in range(4):
        shutil.rmtree(folder)
        folder.mkdir()
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=folder)
        start, deadline = time.monotonic(), time.monotonic() + 300
        while process.poll() is None and not _started(folder) and time.monotonic() < deadline:
            time.sleep(0.02)
        remaining = max(0.0, whole_seconds - (time.monotonic() - start))
        delay = rng.uniform(0.0, 0.9 * remaining) / 2 ** attempt if attempt < 3 else 0.0
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return f"killed {time.monotonic() - start:.2f} s after start ({delay:.2f} s after its first progress)"
    pytest.fail("the command finished before every kill; it is too short to kill mid-run")


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigkill_at_a_random_point_then_rerun_equals_an_uninterrupted_run(command, tmp_path):
    args, kind = COMMANDS[command]
    seed = int(os.environ.get("KILL_SEED", random.randrange(2**32)))  # KILL_SEED=N repeats a failing draw
    argv, whole, killed = _argv(args, kind), tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    killed.mkdir()
    tick = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=600, env=ENV, cwd=whole)
    whole_seconds = time.monotonic() - tick
    where = _kill_at_a_random_point(argv, killed, whole_seconds, random.Random(seed))
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=ENV, cwd=killed)
    assert rerun.returncode == 0, f"KILL_SEED={seed}, {where}: the rerun failed: {rerun.stderr[-2000:]}"
    expected, got = _snapshot(whole), _snapshot(killed)
    assert sorted(got) == sorted(expected), f"KILL_SEED={seed}, {where}: other files were left"
    for name in expected:
        assert got[name] == expected[name], f"KILL_SEED={seed}, {where}: {name} differs"


# ---- default tier: the resume logic, without a subprocess ------------------------------------------------------

def test_a_torn_last_line_is_cut_before_the_next_record(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, {"task": "ppl", "key": "a"})
    with open(path, "a") as handle:
        handle.write('{"task": "ppl", "key": "b", "met')  # a writer killed mid-line
    append_jsonl(path, {"task": "ppl", "key": "c"})
    assert [r["key"] for r in read_jsonl(path)] == ["a", "c"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def _cli(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args", [
    ["gen-quality", "--lengths", "32,64", "-m", "vanilla", "-m", "lm-infinite", "--new-tokens", "8", "--max-docs",
     "1", "--quiet"],
    ["temp-lora", "eval", "--max-docs", "2", "--max-tokens", "160", "--min-tokens", "128", "--chunk", "32",
     "--window", "64", "--buckets", "64,128"],
], ids=["gen-quality", "temp-lora-eval"])
def test_a_results_file_torn_mid_record_resumes_to_the_uninterrupted_records(one_thread, args, tmp_path):
    """What a SIGKILL mid-write leaves (the finished records, then part of the next line): the rerun drops the
    fragment, skips the finished cells and appends the rest, ending equal to an uninterrupted run."""
    whole, killed = tmp_path / "whole.jsonl", tmp_path / "killed.jsonl"
    _cli([*args, "--out", str(whole)])
    lines = whole.read_text().splitlines(keepends=True)
    assert len(lines) >= 3
    killed.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # one finished cell, the next torn
    finished = json.loads(lines[0])
    _cli([*args, "--out", str(killed)])
    records = [json.loads(line) for line in killed.read_text().splitlines()]  # strict: no torn line is left
    assert records[0] == finished  # kept, not run again
    assert _stable(records) == _stable([json.loads(line) for line in lines])
