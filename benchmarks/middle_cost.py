"""Cost of lm-infinite's middle retrieval (top-k tokens, top blocks) vs plain lm-infinite and dense SDPA.

One attention layer of SmolLM2-135M's shape (9 query heads, 3 kv heads, head dim 64, float32, random q/k/v: time
depends on sizes, not values), the Λ pattern of lm-infinite on it (n_global 10, n_local 8192 = its training length):
- prefill: every query of an n-token sequence, as one forward pass computes it;
- decode: one new query against the n cached keys (blocks: the block index is built once, as the cache keeps it).

    .venv/bin/python benchmarks/middle_cost.py --lengths 16384,32768 --threads 2 \
        --out docs/results/middle_cost.json

Writes the JSON and a Markdown table next to it (same name, .md).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from lengthwise.attention import LambdaPattern, RopeEncoding, lambda_attention_blocked
from lengthwise.attention.middle import BlockIndex, MiddleRetrieval
from lengthwise.io import atomic_write_json, atomic_write_text
from lengthwise.rope.scaling import base_inv_freq

HEADS, KV_HEADS, HEAD_DIM, N_GLOBAL, N_LOCAL = 9, 3, 64, 10, 8192
VARIANTS = {  # name -> middle retrieval (None: plain lm-infinite)
    "lm-infinite": None,
    "top_k=5, last query (official)": MiddleRetrieval(N_LOCAL, top_k=5, queries="last"),
    "top_k=5, every query": MiddleRetrieval(N_LOCAL, top_k=5),
    "top_blocks=4 (128 x 4 boxes)": MiddleRetrieval(N_LOCAL, top_blocks=4),
}


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up: allocations, kernel choice
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(n: int, repeat: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, n, HEAD_DIM, generator=g)
    k, v = (torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g) for _ in range(2))
    pos = torch.arange(n)[None]
    encoding = RopeEncoding(base_inv_freq(HEAD_DIM, 100000.0), "half")
    scale = HEAD_DIM ** -0.5
    rows = [{"variant": "dense SDPA", "length": n,
             "prefill_s": best_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                           enable_gqa=True), repeat),
             "decode_ms": 1e3 * best_time(lambda: F.scaled_dot_product_attention(q[:, :, -1:], k, v, scale=scale,
                                                                                 enable_gqa=True), repeat * 5)}]
    for name, middle in VARIANTS.items():
        pattern = LambdaPattern(N_GLOBAL, N_LOCAL, N_LOCAL, middle=middle)
        index = BlockIndex() if middle is not None and middle.top_blocks else None

        def prefill():
            lambda_attention_blocked(q, k, v, pos, pos, None, pattern, encoding, scale)

        def step():
            lambda_attention_blocked(q[:, :, -1:], k, v, pos[:, -1:], pos, None, pattern, encoding, scale,
                                     index=index)

        rows.append({"variant": name, "length": n, "prefill_s": best_time(prefill, repeat),
                     "decode_ms": 1e3 * best_time(step, repeat * 5)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default="docs/results/middle_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for n in map(int, args.lengths.split(",")) for row in measure(n, args.repeat)]
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "threads": args.threads, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "shape": f"{HEADS} heads / {KV_HEADS} kv heads / head dim {HEAD_DIM}, n_global {N_GLOBAL}, "
                     f"n_local {N_LOCAL}, float32"}
    out = Path(args.out)
    atomic_write_json(out, {"meta": meta, "rows": rows})
    lines = [f"One attention layer, {meta['shape']}; {meta['date']}, torch {meta['torch']}, {args.threads} threads.",
             "", "| variant | length | prefill (s) | decode step (ms) |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['length']} | {r['prefill_s']:.2f} | {r['decode_ms']:.1f} |" for r in rows]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
