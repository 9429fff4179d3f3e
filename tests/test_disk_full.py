"""A full disk while a record is appended: one line naming the file, exit code 2, the records before it intact; the
next run drops the torn line and computes that cell again, each cell recorded once (docs/reliability.md)."""

import errno

import pytest

from lengthwise import io as lw_io
from lengthwise import locks
from lengthwise.cli import main
from lengthwise.io import read_jsonl

ARGS = ["ppl", "--model", "llama-rope-256", "--data", "stdlib", "--lengths", "64,128", "-m", "vanilla", "--max-docs",
        "1", "--quiet", "--threads", "1"]


class _FillsUp:
    """A text file whose disk is full: it writes the first half of what it is given, then raises ENOSPC."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def write(self, text: str) -> int:
        self.handle.write(text[: len(text) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_a_full_disk_mid_record_is_one_line_and_the_rerun_completes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.jsonl"
    appends = []

    def open_filling_up(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        if "a" in mode:
            appends.append(path)
            if len(appends) == 2:  # the second record finds the disk full
                return _FillsUp(handle)
        return handle

    monkeypatch.setattr(lw_io, "open", open_filling_up, raising=False)
    with pytest.raises(SystemExit) as stop:
        main([*ARGS, "--out", str(out)])
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and not line.startswith("Loading weights")]  # transformers' progress bar
    assert len(lines) == 1 and lines[0].startswith("error: [Errno 28] No space left on device"), lines
    assert str(out) in lines[0] and "Traceback" not in lines[0]
    assert len(read_jsonl(out)) == 1 and not out.read_text().endswith("\n")  # one whole record, then a torn one
    assert not locks.lock_path(out).exists()  # the lock went with the failed command

    monkeypatch.undo()  # space again
    with pytest.raises(SystemExit) as stop:
        main([*ARGS, "--out", str(out)])
    assert stop.value.code == 0
    assert "the last line is truncated" in capsys.readouterr().err
    keys = [r["key"] for r in read_jsonl(out)]
    assert len(keys) == 2 and len(set(keys)) == 2
    assert all(line.startswith("{") for line in out.read_text().splitlines())  # the torn fragment was cut off
