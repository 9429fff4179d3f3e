"""Two runs, one output: the second waits and then skips what the first finished, or (--no-wait) stops in one line
naming the first; never a duplicated cell (lengthwise.locks, docs/reliability.md)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lengthwise import locks
from lengthwise.cli import app, main
from lengthwise.eval.results import ResultsFile
from lengthwise.io import read_jsonl

SCRIPT = str(Path(sys.executable).with_name("lengthwise"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PPL = ["ppl", "--model", "llama-rope-256", "--data", "stdlib", "--lengths", "64,128", "-m", "vanilla", "--max-docs",
       "1", "--quiet", "--threads", "1"]
# a process that holds the lock on argv[2] until its stdin closes (a stand-in for any lengthwise writer); it loads
# lengthwise/locks.py alone (standard library only), without the package and torch, so it starts in milliseconds
HOLDER = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('locks', sys.argv[1]); "
          "locks = sys.modules['locks'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(locks); "
          "locks.acquire(sys.argv[2]); print('held', flush=True); sys.stdin.read()")


def _holder(out: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, locks.__file__, str(out)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=ENV)
    assert process.stdout.readline().strip() == "held"
    return process


def _wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _holder_pid(lock: Path) -> int | None:
    return locks.holder_info(lock).get("pid")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_a_second_run_waits_then_skips_and_no_wait_refuses_in_one_line(tmp_path, capsys):
    """Two real processes on one --out: A runs and is paused (SIGSTOP) while it holds the lock; B waits; a third run
    C (--no-wait, through the script's entry point in this process) stops at once with one line naming A; A resumes
    and finishes; B then finds A's cells done and appends nothing."""
    out = tmp_path / "r.jsonl"
    lock = locks.lock_path(out)
    a = subprocess.Popen([SCRIPT, *PPL, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV, cwd=tmp_path)
    stopped, b = False, None
    try:
        _wait_for(lambda: _holder_pid(lock) == a.pid or a.poll() is not None, what="A to take the lock")
        assert a.poll() is None, "A finished before the test could pause it"
        os.kill(a.pid, signal.SIGSTOP)
        stopped = True
        b_err = tmp_path / "b.err"
        with open(b_err, "w") as err:
            b = subprocess.Popen([SCRIPT, *PPL, "--out", str(out)], stdout=subprocess.PIPE, stderr=err, text=True,
                                 env=ENV, cwd=tmp_path)
        with pytest.raises(SystemExit) as stop:  # C, in this process: the entry point of the script
            main([*PPL, "--out", str(out), "--no-wait"])
        assert stop.value.code == 2
        lines = _error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and lines[0].startswith(f"error: {out} is being written by another run"), lines
        assert f"pid {a.pid} on host {socket.gethostname()}" in lines[0] and "--no-wait" in lines[0], lines[0]

        _wait_for(lambda: "waiting for another run" in b_err.read_text() or b.poll() is not None, what="B to wait")
        assert b.poll() is None and f"pid {a.pid}" in b_err.read_text(), b_err.read_text()
        os.kill(a.pid, signal.SIGCONT)
        stopped = False
        _, a_stderr = a.communicate(timeout=240)
        assert a.returncode == 0, a_stderr
        b_out, _ = b.communicate(timeout=240)
        assert b.returncode == 0, b_err.read_text()
    finally:
        if stopped:
            os.kill(a.pid, signal.SIGCONT)
        for process in (a, b):
            if process is not None and process.poll() is None:
                process.kill()
    records = read_jsonl(out)
    keys = [r["key"] for r in records]
    assert len(keys) == 2 and len(set(keys)) == 2, keys  # 2 lengths, each once: B computed nothing
    assert "vanilla" in b_out  # B reports the cells it found done
    assert not lock.exists()  # the last run out removed the lock file


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "r.jsonl"
    holder = _holder(out)
    try:
        with pytest.raises(locks.OutputLocked, match=f"pid {holder.pid} on host"):
            ResultsFile(out, wait=False)
        holder.kill()  # SIGKILL: its lock file stays, unlocked
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    lock = locks.lock_path(out)
    assert lock.exists() and _holder_pid(lock) == holder.pid
    results = ResultsFile(out, wait=False)  # taken over at once: the kernel dropped the dead run's lock
    assert _holder_pid(lock) == os.getpid()
    results.append({"key": "k", "task": "ppl"})
    results.close()
    assert not lock.exists()
    with pytest.raises(RuntimeError, match="was closed"):
        results.append({"key": "k2", "task": "ppl"})
    assert [r["key"] for r in read_jsonl(out)] == ["k"]


def test_locks_are_shared_within_a_process_and_released_by_the_last_holder(tmp_path):
    out = tmp_path / "r.jsonl"
    first = ResultsFile(out, wait=False)
    second = ResultsFile(out, wait=False)  # the same process: the lock is counted, not taken twice
    lock = locks.lock_path(out)
    second.close()
    assert lock.exists() and locks.holds(out)
    first.close()
    assert not lock.exists() and not locks.holds(out)
    with ResultsFile(out) as third:  # garbage collection or `with` release it too
        assert locks.holds(out)
    del third
    assert not locks.holds(out)


COMMANDS = [
    ["search", "--scale", "2", "--docs", "1", "--data", "stdlib", "--iterations", "1"],
    ["ppl", "--stream-tokens", "1k", "-m", "lm-infinite"],
    ["passkey", "--lengths", "256"],
    ["gen-quality", "--lengths", "64"],
    ["ruler", "--lengths", "256", "--tasks", "niah_single"],
    ["bench", "--lengths", "64"],
    ["temp-lora", "eval"],
]


def test_every_writing_command_refuses_a_held_output_with_no_wait(tmp_path):
    """Before loading any model: the one line names the other run."""
    for command in COMMANDS:
        out = tmp_path / ("search" if command[0] == "search" else f"{command[0]}.jsonl")
        holder = _holder(out)
        try:
            result = CliRunner().invoke(app, [*command, "--out", str(out), "--no-wait"])
            assert isinstance(result.exception, locks.OutputLocked), (command, result.output)
            assert f"pid {holder.pid} on host {socket.gethostname()}" in str(result.exception)
            assert "\n" not in str(result.exception)
        finally:
            holder.stdin.close()
            holder.wait(timeout=30)
        assert not locks.lock_path(out).exists()


def test_the_cli_reports_a_held_output_in_one_line_with_exit_code_2(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    holder = _holder(out)
    try:
        with pytest.raises(SystemExit) as stop:
            main(["ppl", "--lengths", "64", "--out", str(out), "--no-wait"])
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert stop.value.code == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {out} is being written by another run (pid {holder.pid}")


@pytest.mark.slow
def test_two_ray_runs_on_one_output_record_each_cell_once(tmp_path):
    """--ray: the driver holds the lock and writes; a second driver waits, then skips."""
    pytest.importorskip("ray")
    out = tmp_path / "r.jsonl"
    args = ["passkey", "--lengths", "256,512", "--depths", "0,100", "--trials", "1", "--quiet", "--ray", "local",
            "--workers", "2", "--out", str(out)]
    first = subprocess.Popen([SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for(lambda: _holder_pid(locks.lock_path(out)) == first.pid or first.poll() is not None, what="the lock")
    second = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=ENV, timeout=600)
    first.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    keys = [r["key"] for r in read_jsonl(out)]
    assert len(keys) == len(set(keys)) == 3 * 2 * 2, keys  # 3 default methods x 2 lengths x 2 depths


def test_lock_info_is_json_naming_the_holder(tmp_path):
    out = tmp_path / "r.jsonl"
    token = locks.acquire(out)
    try:
        info = json.loads(locks.lock_path(out).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
        assert locks.describe_holder(info).startswith(f"pid {os.getpid()} on host ")
    finally:
        locks.release(out, token)
    locks.release(out, token)  # twice: nothing
    assert locks.describe_holder({}) == "a run that is starting"
