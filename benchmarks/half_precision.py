"""Half precision at length: float16 and bfloat16 against float32, per method, on held-out documents.

For each dtype the model is loaded in that dtype, patched, and run one forward pass per document truncated to N
tokens; reported: PPL, whether any logit was NaN or inf, and the PPL's relative difference to float32.

    python benchmarks/half_precision.py --model llama-rope-256 --data pg19-dev --length 8192 --docs 2 \
        --out docs/results/half_precision_llama-rope-256.json

Cells (method x dtype) are appended to OUT.jsonl as they finish and skipped on a rerun; OUT is the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from lengthwise import api
from lengthwise.data.corpus import documents_of_length, load_corpus
from lengthwise.eval.results import ResultsFile, cell_key
from lengthwise.eval.tasks import resolve_spec
from lengthwise.io import atomic_write_json, read_jsonl
from lengthwise.models.families import model_info

METHODS = ("vanilla", "lm-infinite", "yarn:factor={s}", "dynamic-ntk")
LOGIT_SLICE = 4096
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def run_cell(model, ids_list, method: str) -> dict:
    nll_sum, count, finite = 0.0, 0, True
    with api.patch(model, method):
        for ids in ids_list:
            # The vocabulary projection in slices: (N, V) float32 logits of a 32k-token book are 6 GiB.
            hidden = model.base_model(input_ids=ids[None], use_cache=False).last_hidden_state[0]  # (N, H)
            for start in range(0, len(ids) - 1, LOGIT_SLICE):
                logits = model.get_output_embeddings()(hidden[start : start + LOGIT_SLICE])  # (S, V)
                targets = ids[start + 1 : start + 1 + len(logits)]
                finite &= bool(logits.isfinite().all())
                nll = torch.nn.functional.cross_entropy(logits[: len(targets)].float(), targets, reduction="sum")
                nll_sum += float(nll)
            count += len(ids) - 1
    return {"ppl": math.exp(nll_sum / count), "finite": finite, "tokens": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-rope-256")
    parser.add_argument("--data", default="pg19-dev")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated specs; {s} = length / L")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, in the order to run")
    parser.add_argument("--float32-from", action="append", default=[],
                        help="take float32 PPL from this `lengthwise ppl` JSON-lines file (same data, length, one "
                        "document) instead of computing it; repeatable")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", required=True, help="summary JSON; the cells go to the same name + .jsonl")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # One record per (method, dtype) cell, appended as it finishes: a killed run resumes at the next cell.
    cells = ResultsFile(args.out + ".jsonl")
    models = {}
    rows = []
    dtypes = [d for d in args.dtypes.split(",") if d]
    if bad := [d for d in dtypes if d not in DTYPES]:
        parser.error(f"unknown dtype {bad[0]!r}; accepted: {', '.join(DTYPES)}")
    for method in args.methods.split(","):
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            key = cell_key("half-precision", model=args.model, data=args.data, length=args.length, docs=args.docs,
                           method=method, dtype=dtype_name)
            if (done := cells.done(key)) is None:
                if dtype_name not in models:
                    model, tokenizer = api.load_model(args.model, dtype=dtype)
                    docs = documents_of_length(load_corpus(args.data), tokenizer, args.length, max_docs=args.docs)
                    models[dtype_name] = model, [torch.as_tensor(ids) for _, ids in docs.docs]
                model, ids_list = models[dtype_name]
                spec = resolve_spec(method, args.length, model_info(model).pretrain_length)
                start = time.perf_counter()
                cell = run_cell(model, ids_list, spec)
                done = {"key": key, "dtype": dtype_name, "method": method, "method_resolved": spec, **cell,
                        "seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads(),
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                cells.append(done)
            rows.append(done)
            print(json.dumps(done), flush=True)
    reference = {r["method"]: r["ppl"] for r in rows if r["dtype"] == "float32"}
    for path in args.float32_from if args.docs == 1 else ():
        for record in read_jsonl(path):  # read only: no lock
            if record.get("data") == args.data and record.get("length") == args.length:
                for method in args.methods.split(","):
                    spec = resolve_spec(method, args.length, record["pretrain_length"])
                    if record["method"] == spec:
                        reference.setdefault(method, record["metrics"]["ppl"])
    for row in rows:
        row["float32_source"] = "this run" if any(r["dtype"] == "float32" and r["method"] == row["method"]
                                                 for r in rows) else ", ".join(args.float32_from)
    for row in rows:
        row["vs_float32"] = row["ppl"] / reference[row["method"]] - 1 if row["method"] in reference else None
    summary = {"model": args.model, "data": args.data, "length": args.length, "docs": args.docs, "rows": rows,
               "torch": torch.__version__}
    atomic_write_json(args.out, summary)
    print("| method | dtype | PPL | vs float32 | finite |\n|---|---|---|---|---|")
    for row in rows:
        change = "—" if row["vs_float32"] is None else f"{100 * row['vs_float32']:+.2f}%"
        print(f"| {row['method']} | {row['dtype']} | {row['ppl']:.3f} | {change} | {row['finite']} |")


if __name__ == "__main__":
    main()
