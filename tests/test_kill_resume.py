"""Kill and resume: a long command killed with SIGKILL mid-run and started again with the same arguments ends with
the same results as an uninterrupted run, and leaves no torn line behind (docs/guarantees.md)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lengthwise.io import append_jsonl, read_jsonl

SCRIPT = str(Path(sys.executable).with_name("lengthwise"))
COMMANDS = {
    "ppl": ["ppl", "--lengths", "256,512,1024", "-m", "vanilla", "-m", "lm-infinite", "--max-docs", "2", "--quiet"],
    "passkey": ["passkey", "--lengths", "256,512", "--depths", "0,100", "--trials", "2", "--quiet"],
    "ruler": ["ruler", "--tasks", "niah_single", "--lengths", "256,512", "--samples", "1", "--quiet"],
}
VOLATILE = ("time", "machine", "versions", "outputs_seconds")


def _stable(path: Path) -> dict:
    return {r["key"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in read_jsonl(path)}


def test_a_torn_last_line_is_cut_before_the_next_record(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, {"task": "ppl", "key": "a"})
    with open(path, "a") as handle:
        handle.write('{"task": "ppl", "key": "b", "met')  # a writer killed mid-line
    append_jsonl(path, {"task": "ppl", "key": "c"})
    assert [r["key"] for r in read_jsonl(path)] == ["a", "c"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(command, tmp_path):
    args = COMMANDS[command]
    whole, killed = tmp_path / "whole.jsonl", tmp_path / "killed.jsonl"
    subprocess.run([SCRIPT, *args, "--out", str(whole)], check=True, capture_output=True, timeout=600)
    process = subprocess.Popen([SCRIPT, *args, "--out", str(killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed.exists() and killed.read_text().count("\n") >= 1):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    first = len(read_jsonl(killed))
    assert 1 <= first < len(read_jsonl(whole)), "the kill did not land mid-run"
    subprocess.run([SCRIPT, *args, "--out", str(killed)], check=True, capture_output=True, timeout=600)
    assert _stable(killed) == _stable(whole)
    assert all(json.loads(line) for line in killed.read_text().splitlines())  # no torn line left
