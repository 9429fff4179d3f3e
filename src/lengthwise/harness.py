"""An lm-evaluation-harness model `lengthwise`: any model lengthwise loads, patched with any method spec.

    lengthwise-lm-eval --model lengthwise \\
        --model_args pretrained=llama-rope-256,method=lm-infinite:n_local=256;n_global=4,max_length=4096 --tasks ...

`lengthwise-lm-eval` is the harness's own command line (`lm_eval`) with this model registered first: the harness
finds models only in its registry, which an external package fills by being imported. From Python,
`import lengthwise.harness` and then `lm_eval.simple_evaluate(model="lengthwise", model_args=...)`.

model_args: `pretrained` (a bundled name, a folder, a .gguf file or a registered real model), `method` (a spec;
the harness splits model_args at commas, so separate a method's own options with ';'), `max_length` (the longest
context the harness feeds; default: the model's training length, as for `hf`), and any `hf` model argument.
Loglikelihood, rolling loglikelihood and generation requests all run through the patched model (`generate()`
uses the method's bounded cache). Needs the `eval` extra (`pip install lengthwise[eval]`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from lengthwise.api import load_model, patch
from lengthwise.data.ruler import make_ruler_sample
from lengthwise.eval.tasks import check_specs


def method_spec(text: str) -> str:
    """A method spec as written in model_args (';' between a method's options) -> lengthwise's syntax."""
    return str(text).replace(";", ",")


@register_model("lengthwise")
class LengthwiseLM(HFLM):
    def __init__(self, pretrained: str = "llama-rope-256", method: str = "vanilla", **kwargs) -> None:
        spec = method_spec(method)
        check_specs([spec])  # a spec that does not parse fails before any model is loaded
        model, tokenizer = load_model(str(pretrained))
        self.lengthwise_handle = patch(model, spec)
        self.lengthwise_method = spec
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)


RULER_TASK_YAML = """task: {name}
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


def export_ruler_task(folder: str | Path, tokenizer, length: int, samples: int, depth: float = 0.5) -> str:
    """Write a RULER niah_single task (lengthwise's generator) as a harness task in `folder`: JSON lines + task YAML
    (generate_until, the first number of the answer, exact match). Returns the task name (for `--include_path`)."""

    folder, name = Path(folder), f"lengthwise_niah_single_{length}"
    data = folder / f"{name}.json"
    rows = [make_ruler_sample(tokenizer, "niah_single", length, depth, seed) for seed in range(samples)]
    data.write_text("\n".join(json.dumps({"prompt": r.prompt, "answer": r.expected[0]}) for r in rows))
    (folder / f"{name}.yaml").write_text(RULER_TASK_YAML.format(name=name, data=data))
    return name


def main() -> None:
    """`lengthwise-lm-eval`: the harness's CLI with the `lengthwise` model registered."""
    from lm_eval.__main__ import cli_evaluate  # noqa: PLC0415

    cli_evaluate()
