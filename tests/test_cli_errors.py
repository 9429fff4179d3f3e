"""Every command answers bad input with one line on stderr and exit code 2, no traceback (docs/guarantees.md).
Runs `lengthwise.cli.main` in-process (the console script's entry point); one case also through the real script."""

import subprocess
import sys
from pathlib import Path

import pytest

from lengthwise.cli import main

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
    ("search --model nothing-here --scale 4", "neither a bundled model"),
    ("search --population 0", "population"),
    ("temp-lora eval --model nothing-here", "neither a bundled model"),
    ("temp-lora eval --chunk 0", "chunk"),
    ("lab train --pe nonsense --out {tmp}/lab", "nonsense"),
    ("lab compare --bogus", "No such option"),
    ("report {tmp}/missing.jsonl --out {tmp}/r", "not found"),
    ("report {tmp}/empty.jsonl --out {tmp}/r", "holds no results records"),
    ("report {tmp}/foreign.jsonl --out {tmp}/r", "unknown task(s) other"),
    ("ruler --tasks nonsense", "unknown RULER task 'nonsense'; accepted: niah_single"),
    ("ruler --lengths 10", "RULER length 10 is too short"),
    ("ppl --model {tmp}/fake.gguf", "is not a GGUF file"),
]


@pytest.mark.parametrize(("line", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_exit_code_2(line, expected, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "foreign.jsonl").write_text('{"task": "other", "key": "x"}\n')
    (tmp_path / "fake.gguf").write_bytes(b"not gguf")
    with pytest.raises(SystemExit) as stop:
        main(line.format(tmp=tmp_path).split() + ["--quiet"] * ("ppl" in line.split()[:1]))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2, err
    lines = [text for text in err.splitlines() if text.strip() and not text.startswith(("Loading", "ppl "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0] and "Traceback" not in err


def test_the_installed_script_prints_one_line_without_traceback():
    script = Path(sys.executable).with_name("lengthwise")
    done = subprocess.run([str(script), "ppl", "--model", NOT_A_MODEL], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: model 'nothing-here'")
    debug = subprocess.run([str(script), "ppl", "--model", NOT_A_MODEL, "--debug"], capture_output=True, text=True,
                           timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
