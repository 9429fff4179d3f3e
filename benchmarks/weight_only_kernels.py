"""One-token matrix products of SmolLM2-135M's shapes: float32, bfloat16 and the weight-only int8 / int4 kernels
torch ships for the CPU (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`, group 64), milliseconds per
call, mean of 100 after 5 warm-up calls.

    .venv/bin/python benchmarks/weight_only_kernels.py --threads 2

The two small shapes (an MLP projection, 3.5 MB in float32) stay in the CPU's caches between calls; the vocabulary
projection (49152 x 576, 113 MB in float32) streams from memory as a decode step does. "int4 err" is the relative
error of a plain asymmetric 4-bit rounding (a speed probe, not a quantization recipe).
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(100):
        fn()
    return (time.perf_counter() - start) / 100 * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for n, k in [(1536, 576), (576, 1536), (49152, 576)]:
        x, w = torch.randn(1, k), torch.randn(n, k)
        ref = x @ w.T
        scale = w.abs().amax(1) / 127
        w8 = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        row = {"f32": timed(lambda: torch.nn.functional.linear(x, w)),
               "int8pack": timed(lambda: torch.ops.aten._weight_int8pack_mm(x, w8, scale))}
        wb, xb = w.bfloat16(), x.bfloat16()
        row["bf16"] = timed(lambda: torch.nn.functional.linear(xb, wb))
        group = 64
        wg = w.reshape(n, k // group, group)
        low, high = wg.amin(-1), wg.amax(-1)
        step = ((high - low) / 15).clamp(min=1e-6)
        q = torch.round((wg - low[..., None]) / step[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scales_zeros = torch.stack([step, low + 8 * step], -1).transpose(0, 1).contiguous()  # (K/group, N, 2)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)
        row["int4pack"] = timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros))
        row["int4 err"] = float((out - ref).abs().max() / ref.abs().max())
        print(f"{n} x {k}: " + ", ".join(f"{key} {value:.3f}" for key, value in row.items()), flush=True)


if __name__ == "__main__":
    main()
