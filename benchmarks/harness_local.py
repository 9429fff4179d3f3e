"""One local lm-evaluation-harness task through `lengthwise-lm-eval`, under several methods: the harness's own
results table per method.

The task is written to a temporary folder: a RULER-style niah_single task (our generator, the filler haystack) at a
given length, exported as a JSON-lines file and a task YAML (generate_until, first number of the answer, exact match).

    python benchmarks/harness_local.py --model llama-rope-256 --length 1024 --samples 8 \
        -m vanilla -m 'lm-infinite:n_local=256;n_global=10'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from lengthwise.api import load_model
from lengthwise.data.ruler import make_ruler_sample

TASK_YAML = """task: lengthwise_niah_single
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
"""


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
        data = Path(folder) / "niah.json"
        rows = []
        for seed in range(args.samples):
            sample = make_ruler_sample(tokenizer, "niah_single", args.length, 0.5, seed)
            rows.append(json.dumps({"prompt": sample.prompt, "answer": sample.expected[0]}))
        data.write_text("\n".join(rows))
        (Path(folder) / "niah.yaml").write_text(TASK_YAML.format(data=data))
        script = Path(sys.executable).with_name("lengthwise-lm-eval")
        for method in args.method:
            model_args = f"pretrained={args.model},method={method},max_length={args.max_length or args.length + 64}"
            print(f"## {method}", flush=True)
            subprocess.run([str(script), "--model", "lengthwise", "--model_args", model_args, "--include_path", folder,
                            "--tasks", "lengthwise_niah_single", "--batch_size", "1"], check=True)


if __name__ == "__main__":
    main()
