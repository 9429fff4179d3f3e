"""Every command answers bad input with one line on stderr and exit code 2, no traceback (docs/guarantees.md).
Runs `lengthwise.cli.main` in-process (the console script's entry point); one case also through the real script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lengthwise.cli import main
from lengthwise.cli.outputs import read_records

NOT_A_MODEL = "nothing-here"
CASES = [  # (command line, a piece of the expected line)
    ("ppl --model nothing-here", "neither a bundled model"),
    ("ppl -m nonsense", "unknown method 'nonsense'; accepted: dynamic-ntk"),
    ("ppl -m yarn:factor=abc", "yarn factor must be a number"),
    ("ppl -m lm-infinite:bogus=1", "has no option 'bogus'"),
    ("ppl -m yarn:factor", "key=value"),
    ("ppl --lengths -5", "lengths must be"),
    ("ppl --lengths 1,x", "lengths must be comma-separated integers"),
    ("ppl --data /no/such/folder", "unknown corpus '/no/such/folder'; accepted: stdlib"),
    ("ppl --model bloom-alibi-256 -m yarn --lengths 512", "works on rope models; model 'bloom-alibi-256' uses"),
    ("passkey --model bloom-alibi-256 -m yarn:factor={{s}}", "works on rope models; model 'bloom-alibi-256' uses"),
    ("ppl --max-docs 0", "max-docs"),
    ("models --bogus", "No such option: --bogus"),
    ("generate --model nothing-here --prompt hi", "neither a bundled model"),
    ("generate -m nonsense --prompt hi", "unknown method"),
    ("passkey --lengths 10", "passkey length 10 is too short; accepted: integers >= 64"),
    ("passkey --depths 150", "outside 0..100"),
    ("passkey -m nonsense", "unknown method"),
    ("gen-quality -m nonsense", "unknown method"),
    ("gen-quality --lengths abc", "must be comma-separated"),
    ("bench -m nonsense", "unknown method"),
    ("bench --lengths x", "must be comma-separated"),
    ("bench -m lm-infinite --decode compiled --decode-weights int4", "--decode-weights must be one of model, bfloat16"),
    ("bench -m lm-infinite --decode-weights int8", "use it with --decode static or compiled"),
    ("bench -m lm-infinite --decode static --decode-kv float16", "--decode-kv must be one of model, bfloat16"),
    ("search --model nothing-here --scale 4", "neither a bundled model"),
    ("search --population 0", "population"),
    ("temp-lora eval --model nothing-here", "neither a bundled model"),
    ("temp-lora eval --chunk 0", "chunk"),
    ("lab train --pe nonsense --out {tmp}/lab", "nonsense"),
    ("lab compare --bogus", "No such option"),
    ("report {tmp}/missing.jsonl --out {tmp}/r", "not found"),
    ("report {tmp}/empty.jsonl --out {tmp}/r", "holds no results records"),
    ("report {tmp}/foreign.jsonl --out {tmp}/r", "holds results of task other; accepted here: ppl"),
    ("report {tmp}/notjson.jsonl --out {tmp}/r", "line 2 is not JSON; not a lengthwise results file"),
    ("report {tmp}/bare.jsonl --out {tmp}/r", "line 1 lacks some of the fields"),
    ("report {tmp}/passkey.jsonl --out {tmp}/afile", "--out {tmp}/afile: {tmp}/afile is a file, not a folder"),
    ("ruler --tasks nonsense", "unknown RULER task 'nonsense'; accepted: niah_single"),
    ("ruler --lengths 10", "RULER length 10 is too short"),
    ("ppl --model {tmp}/fake.gguf", "is not a GGUF file"),
    # outputs, checked before any model is loaded
    ("ppl --out {tmp}/afile/ppl.jsonl", "--out {tmp}/afile/ppl.jsonl: {tmp}/afile is a file, not a folder"),
    ("ppl --out {tmp}", "is a folder; a file path is expected here"),
    ("ppl --out /proc/no/such/ppl.jsonl", "cannot create folder /proc/no/such"),
    ("ppl --plot {tmp}/afile/p.png", "--plot {tmp}/afile/p.png: {tmp}/afile is a file"),
    ("ppl --out {tmp}/passkey.jsonl", "holds results of task passkey; accepted here: ppl"),
    ("ppl --out {tmp}/notjson.jsonl", "line 2 is not JSON"),
    ("passkey --out {tmp}/ppl.jsonl", "holds results of task ppl; accepted here: passkey"),
    ("passkey --model nothing-here", "neither a bundled model"),
    ("gen-quality --out {tmp}/passkey.jsonl", "accepted here: gen-quality"),
    ("gen-quality --data nonsense-corpus", "unknown corpus 'nonsense-corpus'"),
    ("bench --out {tmp}/passkey.jsonl", "accepted here: bench"),
    ("bench --dtype int3", "unknown dtype 'int3'; accepted: float32"),
    ("bench --device tpu", "unknown device 'tpu'; accepted: cpu"),
    ("ruler --out {tmp}/ppl.jsonl", "accepted here: ruler"),
    ("generate --prompt hi --temp-lora --temp-lora-save {tmp}/afile/a", "--temp-lora-save {tmp}/afile/a:"),
    ("generate --prompt hi --prompt-file {tmp}/afile", "exactly one of --prompt or --prompt-file"),
    ("generate --prompt hi --decode fast", "--decode must be one of eager, static, compiled"),
    ("generate --prompt hi -m lm-infinite --decode-weights int8", "use it with --decode static or compiled"),
    ("generate --prompt hi -m lm-infinite --decode static --temp-lora", "leave --decode eager"),
    ("search --scale 2 --out {tmp}/afile", "--out {tmp}/afile: {tmp}/afile is a file"),
    ("search --scale 0.5", "--scale must be >= 1"),
    ("temp-lora eval --out {tmp}/ppl.jsonl", "accepted here: temp-lora"),
    ("temp-lora eval -m sliding-window", "is a scoring strategy"),
    ("temp-lora bogus", "No such command 'bogus'"),
    ("lab train --pe rope --steps 0 --out {tmp}/lab", "steps must be a positive integer"),
    ("lab train --pe rope --out {tmp}/afile", "--out {tmp}/afile: {tmp}/afile is a file"),
    ("lab compare --models /no/such/models", "--models /no/such/models is not a folder"),
    ("lab compare --models {tmp} --factors x", "--factors must be comma-separated positive integers"),
    ("lab bogus", "No such command 'bogus'"),
    ("demo --bogus", "No such option: --bogus"),
    ("demo --out {tmp}/afile", "{tmp}/afile is a file, not a folder"),
    ("demo --quick --out {tmp}/afile", "{tmp}/afile is a file, not a folder"),
    ("nonsense-command", "No such command 'nonsense-command'"),
]


def _record(task: str, key: str = "k") -> dict:
    return {"schema": 1, "task": task, "key": key, "model": "m", "method": "vanilla", "method_config": None,
            "data": "d", "seed": 0, "metrics": {}}


def _write_fixtures(tmp: Path) -> None:
    (tmp / "afile").write_text("a file where a folder is expected\n")
    for task in ("ppl", "passkey"):
        (tmp / f"{task}.jsonl").write_text(json.dumps(_record(task)) + "\n")
    (tmp / "notjson.jsonl").write_text(json.dumps(_record("ppl")) + "\nnot json at all\n" +
                                       json.dumps(_record("ppl", "k2")) + "\n")
    (tmp / "bare.jsonl").write_text('{"task": "ppl", "key": "x"}\n')


@pytest.mark.parametrize(("line", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_exit_code_2(line, expected, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "foreign.jsonl").write_text('{"task": "other", "key": "x"}\n')
    (tmp_path / "fake.gguf").write_bytes(b"not gguf")
    _write_fixtures(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(line.format(tmp=tmp_path).split() + ["--quiet"] * ("ppl" in line.split()[:1]))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2, err
    lines = [text for text in err.splitlines() if text.strip() and not text.startswith(("Loading", "ppl "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.format(tmp=tmp_path) in lines[0] and "Traceback" not in err


def test_the_installed_script_prints_one_line_without_traceback():
    script = Path(sys.executable).with_name("lengthwise")
    done = subprocess.run([str(script), "ppl", "--model", NOT_A_MODEL], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: model 'nothing-here'")
    debug = subprocess.run([str(script), "ppl", "--model", NOT_A_MODEL, "--debug"], capture_output=True, text=True,
                           timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
    whole = json.dumps(_record("ppl", "k1")) + "\n"
    path = tmp_path / "torn.jsonl"
    path.write_text(whole + json.dumps(_record("ppl", "k2"))[:40])  # a writer killed mid-line
    assert [r["key"] for r in read_records(path, "--out", ("ppl",))] == ["k1"]
    assert "the last line is truncated" in capsys.readouterr().err
    path.write_text(whole)
    read_records(path, "--out", ("ppl",))
    assert capsys.readouterr().err == ""
