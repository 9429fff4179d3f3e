"""Stored decode weights: PPL and compiled decode speed of each weight format the static step reads.

For each format of `lengthwise.static_decode.WEIGHT_FORMATS` ("model": the float32 weights themselves; "bfloat16",
"float16", "int8" with one scale per output row): the PPL of one document of the demo's data under lm-infinite, the
model computing with those weights (`projections_as_stored`: what the static step computes), and `lengthwise bench`'s
compiled decode after prompts of each depth (ms/token, median of the steps), with the bytes of weights a step reads
and the share of the copy-bandwidth floor (weights + the keys and values attended, over the copy bandwidth).

    .venv/bin/python benchmarks/decode_weights.py --model smollm2-135m --depths 512,8192 --ppl-length 8192 \
        --out docs/results/decode_weights.jsonl

Every cell (a format's PPL, a format's decode at one depth) is appended to OUT as it finishes and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from lengthwise import api
from lengthwise.data.corpus import documents_of_length, load_corpus
from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.eval.speed import bench
from lengthwise.scoring import open_scorer
from lengthwise.static_decode import WEIGHT_FORMATS, projections_as_stored

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import copy_bandwidth  # noqa: E402  (the same floor as the peer benchmark)


def attended_kv_bytes(model, record: dict, steps: int) -> int:
    """Bytes of float32 keys and values one step reads at the middle of the timed steps: the static buffers hold
    `slots` of them (`cache_bytes`: keys, values and an 8-byte position per slot), the step reads the filled ones."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_slot = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    slots = record["metrics"]["cache_bytes"] // (per_slot + 8)
    return per_slot * min(record["length"] + steps // 2, slots)


def ppl_cell(model, ids: torch.Tensor, spec: str, weights: str) -> dict:
    start = time.perf_counter()
    with torch.no_grad(), projections_as_stored(model, weights), open_scorer(model, spec) as scorer:
        nll = scorer.nll(ids)
    return {"ppl": math.exp(float(nll.mean())), "tokens": len(nll), "finite": bool(nll.isfinite().all()),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="pg19-dev")
    parser.add_argument("--method", default="lm-infinite")
    parser.add_argument("--weights", default=",".join(WEIGHT_FORMATS), help="comma-separated formats, in order")
    parser.add_argument("--depths", default="512,8192", help="prompt lengths before the timed decode steps")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--ppl-length", type=int, default=8192, help="tokens of the document scored (0: no PPL)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON-lines cells (appended; finished cells skipped)")
    args = parser.parse_args()
    formats = [w for w in args.weights.split(",") if w]
    if bad := [w for w in formats if w not in WEIGHT_FORMATS]:
        parser.error(f"unknown weight format {bad[0]!r}; accepted: {', '.join(WEIGHT_FORMATS)}")
    try:
        depths = [int(d) for d in args.depths.split(",") if d]
    except ValueError:
        parser.error(f"--depths takes comma-separated integers, got {args.depths!r}")
    torch.set_num_threads(args.threads)
    results = ResultsFile(args.out)
    model, tokenizer = api.load_model(args.model)
    bandwidth = copy_bandwidth(args.threads)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    ids = None
    if args.ppl_length:
        docs = documents_of_length(load_corpus(args.data), tokenizer, args.ppl_length, max_docs=1)
        ids = torch.as_tensor(docs.docs[0][1])
    rows = []
    for weights in formats:
        if ids is not None:
            key = cell_key("decode-weights-ppl", model=args.model, data=args.data, length=args.ppl_length,
                           method=args.method, weights=weights)
            if (done := results.done(key)) is None:
                done = make_record("decode-weights-ppl", key, model=args.model, method=args.method,
                                   method_config=None, data=args.data, seed=0, length=args.ppl_length,
                                   weights=weights, metrics=ppl_cell(model, ids, args.method, weights),
                                   torch_threads=torch.get_num_threads())
                results.append(done)
            rows.append(done)
            print(f"{weights}: PPL {done['metrics']['ppl']:.4f}", flush=True)
        for record in bench(model, depths, [args.method], decode_steps=args.decode_steps, results=results,
                            model_name=args.model, progress=False, decode="compiled", decode_weights=weights):
            rows.append(record)
            metrics = record["metrics"]
            moved = record["decode_weight_bytes"] + attended_kv_bytes(model, record, args.decode_steps)
            floor_ms = 1000 * moved / bandwidth
            print(f"{weights} @ {record['length']}: {1000 * metrics['decode_s_per_token']:.1f} ms/token "
                  f"({record['decode_mode']}, min {1000 * min(record['decode_s']):.1f}), weights "
                  f"{record['decode_weight_bytes'] / 1e6:.0f} MB, floor {floor_ms:.1f} ms, share "
                  f"{floor_ms / (1000 * metrics['decode_s_per_token']):.2f}, copy bandwidth "
                  f"{bandwidth / 1e9:.1f} GB/s", flush=True)
    reference = next((r["metrics"]["ppl"] for r in rows if r.get("weights") == "model" and "ppl" in r["metrics"]),
                     None)
    print("| weights | PPL | vs model |\n|---|---|---|")
    for row in rows:
        if "ppl" in row["metrics"]:
            change = "—" if reference is None else f"{100 * (row['metrics']['ppl'] / reference - 1):+.2f}%"
            print(f"| {row['weights']} | {row['metrics']['ppl']:.4f} | {change} |")


if __name__ == "__main__":
    main()
