"""One local lm-evaluation-harness task through `lengthwise-lm-eval`, under several methods: the harness's own
results table per method.

The task is written to a temporary folder: a RULER-style niah_single task (our generator, the filler haystack) at a
given length, exported as a JSON-lines file and a task YAML (generate_until, first number of the answer, exact match).

    python benchmarks/harness_local.py --model llama-rope-256 --length 1024 --samples 8 \
        -m vanilla -m 'lm-infinite:n_local=256;n_global=10'
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from lengthwise.api import load_model
from lengthwise.harness import export_ruler_task

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-rope-256")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="harness max_length (default: --length + 64)")
    parser.add_argument("-m", "--method", action="append", required=True)
    args = parser.parse_args()
    _, tokenizer = load_model(args.model)
    with tempfile.TemporaryDirectory() as folder:
        task = export_ruler_task(folder, tokenizer, args.length, args.samples)
        script = Path(sys.executable).with_name("lengthwise-lm-eval")
        for method in args.method:
            model_args = f"pretrained={args.model},method={method},max_length={args.max_length or args.length + 64}"
            print(f"## {method}", flush=True)
            subprocess.run([str(script), "--model", "lengthwise", "--model_args", model_args, "--include_path", folder,
                            "--tasks", task, "--batch_size", "1"], check=True)


if __name__ == "__main__":
    main()
