"""Half precision at length: float16 and bfloat16 against float32, per method, on held-out documents.

For each dtype the model is loaded in that dtype, patched, and run one forward pass per document truncated to N
tokens; reported: PPL, whether any logit was NaN or inf, and the PPL's relative difference to float32.

    python benchmarks/half_precision.py --model llama-rope-256 --data pg19-dev --length 8192 --docs 2 \
        --out docs/results/half_precision_llama-rope-256.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from lengthwise import api
from lengthwise.data.corpus import documents_of_length, load_corpus

METHODS = ("vanilla", "lm-infinite", "yarn", "dynamic-ntk")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def run_cell(model, ids_list, method: str) -> dict:
    nll_sum, count, finite = 0.0, 0, True
    with api.patch(model, method):
        for ids in ids_list:
            logits = model(input_ids=ids[None], use_cache=False).logits[0]  # (N, V)
            finite &= bool(logits.isfinite().all())
            nll = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum")
            nll_sum, count = nll_sum + float(nll), count + len(ids) - 1
    return {"ppl": math.exp(nll_sum / count), "finite": finite, "tokens": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-rope-256")
    parser.add_argument("--data", default="pg19-dev")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        model, tokenizer = api.load_model(args.model, dtype=dtype)
        docs = documents_of_length(load_corpus(args.data), tokenizer, args.length, max_docs=args.docs)
        ids_list = [torch.as_tensor(ids) for _, ids in docs.docs]
        for method in args.methods.split(","):
            start = time.perf_counter()
            cell = run_cell(model, ids_list, method)
            rows.append({"dtype": dtype_name, "method": method, **cell, "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
    reference = {r["method"]: r["ppl"] for r in rows if r["dtype"] == "float32"}
    for row in rows:
        row["vs_float32"] = row["ppl"] / reference[row["method"]] - 1
    summary = {"model": args.model, "data": args.data, "length": args.length, "docs": args.docs, "rows": rows,
               "torch": torch.__version__}
    with open(args.out, "w") as handle:
        json.dump(summary, handle, indent=1)
    print("| method | dtype | PPL | vs float32 | finite |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['dtype']} | {row['ppl']:.3f} | {100 * row['vs_float32']:+.2f}% | {row['finite']} |")


if __name__ == "__main__":
    main()
