"""Speed and memory of lm-infinite vs dense SDPA (and vs the sliding-window baseline), in one run.

    .venv/bin/python benchmarks/lm_infinite_speed.py            # 2-core CPU defaults: 4k..32k, n_local 2048
    .venv/bin/python benchmarks/lm_infinite_speed.py --model smollm2-135m --lengths 8192,16384,32768 \
        --prefill-repeat 0 --kernel-repeat 1 --out docs/results/lm_infinite_speed_smollm2-135m   # the real model

A Llama-shaped bench model is built in code (random weights: speed does not depend on them): 2 layers, hidden 1024,
16 heads, MLP 2816, vocab 2048, training length 2048. Measured, with the FLOP-count bound of each speed-up:
- attention kernel alone (one layer's q, k, v): dense causal SDPA vs the blocked Λ kernel;
- whole-model prefill (logits of the last token only): time and peak resident memory, vanilla (SDPA) vs lm-infinite;
- per-token decode latency at each context length: dense DynamicCache vs the bounded LambdaCache (caches filled with
  random keys of the right size: the latency depends on sizes, not values), cache bytes;
- the sliding-window baseline by recomputation: one forward over the last 2048 tokens per generated token.
By default glibc's malloc is told to keep freed memory (`--allocator retain`, both paths alike): otherwise every
tensor over 32 MiB is a fresh mmap whose pages the kernel zero-fills on first touch, which on this VM costs more
system time than the attention itself (PyTorch's CPU tuning guide recommends a caching allocator for the same
reason). `--allocator default` measures glibc as it comes.
`--model NAME` measures a real model instead (any `load_model` name or path): its shape, GQA included, is read from
its config, and n_local defaults to its training length (lm-infinite's default).
Writes docs/results/lm_infinite_speed.json and docs/results/lm_infinite_speed.md (the lead may rerun it as is).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lengthwise.attention import LambdaPattern, RopeEncoding, lambda_attention_blocked
from lengthwise.attention.cache import LambdaCache
from lengthwise.eval.speed import cache_bytes
from lengthwise.io import atomic_write_json, atomic_write_text
from lengthwise.models.compat import cache_kwargs

ROOT = Path(__file__).resolve().parents[1]


def real_model(args):
    """Load `args.model` and read the shape the FLOP bounds need from its config."""
    from lengthwise.api import load_model  # noqa: PLC0415
    from lengthwise.models.families import model_info  # noqa: PLC0415

    model, _ = load_model(args.model, dtype=args.dtype)
    c = model.config
    args.layers, args.hidden, args.heads = c.num_hidden_layers, c.hidden_size, c.num_attention_heads
    args.kv_heads, args.mlp, args.vocab = c.num_key_value_heads, c.intermediate_size, c.vocab_size
    args.n_local = args.n_local or model_info(model).pretrain_length
    return model.eval()


def bench_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    args.n_local, args.kv_heads = args.n_local or 2048, args.heads
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=args.n_local, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(args.dtype).eval()


def timed(*fns, repeat: int = 1, warm_up: bool = True) -> list[float]:
    """Best of `repeat` wall times of each function, the functions taking turns so that a slow spell of a shared
    machine falls on all of them alike."""
    for fn in fns if warm_up else ():
        fn()  # allocations, kernel selection
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@torch.no_grad()
def kernel_times(args, n: int, pattern, encoding, with_dense: bool) -> dict:
    """Seconds of one attention call over n random queries and keys, Λ and (with_dense) dense SDPA. The q/k/v
    tensors are this function's, freed on return, before the model's prefill is timed."""
    head_dim = args.hidden // args.heads
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, args.heads, n, head_dim, generator=g).to(args.dtype) for _ in range(3))  # (1,H,n,D)
    pos = torch.arange(n)[None]
    kernels = {"lambda": lambda: lambda_attention_blocked(q, k, v, pos, pos, None, pattern, encoding,
                                                          head_dim**-0.5, block=args.block)}
    if with_dense:
        kernels["dense"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return {f"kernel_{name}_s": s for name, s in zip(kernels, timed(*kernels.values(), repeat=args.kernel_repeat))}


def glibc():
    """The C library if it is glibc (mallopt and malloc_trim exist), else None."""
    return ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None


def retain_freed_memory() -> None:
    """Make glibc's malloc serve every size from its heap and keep what is freed (no mmap per large tensor, no
    trimming), so the same pages are reused instead of being unmapped and zero-filled again."""
    libc = glibc()
    if libc is None:
        raise SystemExit("--allocator retain needs glibc; use --allocator default")
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers from malloc.h
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise SystemExit("mallopt refused the retain settings; use --allocator default")


def peak_rss_during(fn) -> tuple[float, float]:
    """Peak resident MiB above the level before, during one call, and the call's seconds; Linux: VmHWM reset
    through clear_refs. Freed heap memory is given back first, so memory kept from earlier calls does not hide this
    call's peak."""
    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        return float("nan")

    if (libc := glibc()) is not None:
        libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = status("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return status("VmHWM") - base, seconds


def flops_per_token_linear(a) -> float:
    """Multiply-adds x 2 of every projection per token (q, k, v, o, gate, up, down per layer; k and v are narrower
    under GQA). The lm_head is counted apart: prefill computes it for the last token only (logits_to_keep=1), decode
    once per token."""
    kv_width = a.hidden // a.heads * a.kv_heads
    return 2 * a.layers * (2 * a.hidden**2 + 2 * a.hidden * kv_width + 3 * a.hidden * a.mlp)


def flops_lm_head(a) -> float:
    return 2 * a.hidden * a.vocab


def attention_flops(a, n: int, keys_per_query) -> float:
    """QK^T and PV: 4 * hidden FLOPs per (query, visible key) pair per layer."""
    return 4 * a.hidden * a.layers * sum(keys_per_query(i) for i in range(n))


def bounds(a, n: int) -> dict:
    window = a.n_local + a.n_global
    dense = attention_flops(a, n, lambda i: i + 1)
    lam = attention_flops(a, n, lambda i: min(i + 1, window))
    lin = flops_per_token_linear(a) * n + flops_lm_head(a)
    per_token = flops_per_token_linear(a) + flops_lm_head(a)
    decode_dense = per_token + 4 * a.hidden * a.layers * n
    decode_lam = per_token + 4 * a.hidden * a.layers * min(n, window)
    return {"kernel": dense / lam, "prefill": (lin + dense) / (lin + lam), "decode": decode_dense / decode_lam}


def fill_dense_cache(model, n, a):
    from transformers import DynamicCache  # noqa: PLC0415

    cache = DynamicCache(config=model.config)
    head_dim = a.hidden // a.heads
    for layer in range(a.layers):
        k = torch.randn(1, a.kv_heads, n, head_dim, dtype=a.dtype)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def fill_lambda_cache(n, a):
    cache = LambdaCache(a.layers, a.n_global, a.n_local)
    head_dim = a.hidden // a.heads
    kept = torch.cat([torch.arange(min(a.n_global, n)), torch.arange(max(a.n_global, n - a.n_local), n)])
    for layer in cache.layers:
        k = torch.randn(1, a.kv_heads, len(kept), head_dim, dtype=a.dtype)
        layer.update(k, torch.randn_like(k))
        layer.record(kept[None], torch.ones(1, len(kept), dtype=torch.bool))
        layer.seen = n
    return cache


def decode(model, cache, steps: int) -> None:
    """`steps` greedy-shaped decoding steps on `cache`, each at the next position."""
    ids = torch.randint(1, 100, (1, 1))
    for _ in range(steps):
        model(input_ids=ids, **cache_kwargs(model, cache), position_ids=torch.tensor([[cache.get_seq_length()]]),
              use_cache=True, logits_to_keep=1)


def decode_latencies(model, n: int, args, lm_infinite, with_dense: bool) -> dict:
    """Per-token decode latency at context n, Λ (bounded cache) and dense: best of alternating turns of
    `decode_steps` steps each; and the caches' sizes."""
    lam_cache = fill_lambda_cache(n, args)

    def decode_lambda():
        with lm_infinite():
            decode(model, lam_cache, args.decode_steps)

    decodes = {"lambda": decode_lambda}
    row = {"cache_lambda_mib": cache_bytes(lam_cache) / 2**20}
    if with_dense:
        dense_cache = fill_dense_cache(model, n, args)
        row["cache_dense_mib"] = cache_bytes(dense_cache) / 2**20
        decodes["dense"] = lambda: decode(model, dense_cache, args.decode_steps)
    for name, seconds in zip(decodes, timed(*decodes.values(), repeat=args.decode_repeat)):
        row[f"decode_{name}_s"] = seconds / args.decode_steps
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--model", default=None,
                        help="a real model (load_model name or path) instead of the random bench model")
    parser.add_argument("--n-local", type=int, default=0,
                        help="0: 2048 for the bench model, the training length for --model")
    parser.add_argument("--n-global", type=int, default=10)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--mlp", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=10, help="decoding steps per timed turn")
    parser.add_argument("--decode-repeat", type=int, default=3,
                        help="decode timings: best of this many turns, dense and Λ alternating")
    parser.add_argument("--kernel-repeat", type=int, default=3,
                        help="kernel timings: best of this many turns, dense and Λ alternating")
    parser.add_argument("--prefill-repeat", type=int, default=2,
                        help="prefill timings: best of this many turns, dense and Λ alternating (0: the one "
                        "call that measures peak memory, after a short warm-up; for long real-model cells)")
    parser.add_argument("--device", default="cpu", choices=["cpu"],
                        help="only the CPU path exists (peak memory is read from /proc/self/status)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "lm_infinite_speed"))
    parser.add_argument("--allocator", default="retain", choices=["retain", "default"],
                        help="retain: glibc keeps freed memory for reuse (both paths); default: glibc as it comes")
    parser.add_argument("--skip-dense-above", type=int, default=0, help="skip dense cells longer than this (0: none)")
    parser.add_argument("--render-only", action="store_true", help="rewrite OUT.md from OUT.json, measure nothing")
    args = parser.parse_args()
    if args.render_only:
        return write_markdown(args.out)
    args.dtype = getattr(torch, args.dtype)
    if args.allocator == "retain":
        retain_freed_memory()
    torch.set_num_threads(args.threads)
    from lengthwise.api import patch  # noqa: PLC0415

    model = real_model(args) if args.model else bench_model(args)
    pattern = LambdaPattern(args.n_global, args.n_local, args.n_local)
    encoding = RopeEncoding(model.model.rotary_emb.inv_freq, "half")
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = []
    # the sliding-window baseline: every generated token recomputes the model over the last n_local tokens
    window_ids = torch.randint(1, 100, (1, args.n_local))
    with torch.no_grad():
        sliding_token, = timed(lambda: model(input_ids=window_ids, use_cache=False, logits_to_keep=1))
    for n in [int(x) for x in args.lengths.split(",")]:
        row = {"length": n, "bound": bounds(args, n)}
        skip_dense = args.skip_dense_above and n > args.skip_dense_above
        row.update(kernel_times(args, n, pattern, encoding, with_dense=not skip_dense))
        with torch.no_grad():
            ids = torch.randint(1, 100, (1, n))
            def lm_infinite():
                return patch(model, "lm-infinite", n_global=args.n_global, n_local=args.n_local,
                             distance_limit=args.n_local, block=args.block)

            def prefill_dense():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

            def prefill_lambda():
                with lm_infinite():
                    prefill_dense()

            # Peak memory from one call each (which also warms up), then the best of alternating timed turns.
            prefills = {"lambda": prefill_lambda} | ({} if skip_dense else {"dense": prefill_dense})
            if args.prefill_repeat == 0:  # warm up on a short prompt only; time the peak-memory call itself
                short = ids[:, :256]
                with lm_infinite():
                    model(input_ids=short, use_cache=False, logits_to_keep=1)
                model(input_ids=short, use_cache=False, logits_to_keep=1)
            for name, fn in prefills.items():
                row[f"prefill_{name}_peak_mib"], row[f"prefill_{name}_s"] = peak_rss_during(fn)
            if args.prefill_repeat:
                for name, seconds in zip(prefills, timed(*prefills.values(), repeat=args.prefill_repeat,
                                                         warm_up=False)):
                    row[f"prefill_{name}_s"] = seconds
            row.update(decode_latencies(model, n, args, lm_infinite, with_dense=not skip_dense))
        row["decode_sliding_window_s"] = sliding_token
        for key in ("kernel", "prefill", "decode"):
            if f"{key}_dense_s" in row:
                row[f"{key}_speedup"] = row[f"{key}_dense_s"] / row[f"{key}_lambda_s"]
                row[f"{key}_fraction_of_bound"] = row[f"{key}_speedup"] / row["bound"][key]
        rows.append(row)
        print(json.dumps(row), flush=True)
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''} torch threads={args.threads}",
            "allocator": args.allocator,
            "device": args.device, "dtype": str(args.dtype), "load_before": load_before, "load_after": load_after,
            "model": args.model or "random Llama-shaped bench model",
            "shape": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads", "mlp", "vocab",
                                                        "n_local", "n_global", "block")},
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    atomic_write_json(args.out + ".json", {"meta": meta, "rows": rows})
    write_markdown(args.out)


def write_markdown(out: str) -> None:
    """OUT.md from OUT.json (also to re-render a finished run: `python -c` or --render-only)."""
    saved = json.loads(Path(out + ".json").read_text())
    text = markdown(saved["rows"], saved["meta"])
    atomic_write_text(out + ".md", text)
    print(text)


def _fmt(value, spec=".2f"):
    return "—" if value is None else format(value, spec)


# The speed targets on the 2-core CPU, for the bench model (n_local 2048). The kernel and decode targets are stated at
# 32k tokens; the prefill target is a fraction of the FLOP bound, so it applies at every length. A real model has
# only the prefill target and a flat cache: its bounds (n_local = its training length) can sit below 6x / 4x.
TARGET_LENGTH = 32768
TARGETS = {"kernel": 6.0, "decode": 4.0, "prefill_fraction": 0.8}


def verdict(ok: bool | None) -> str:
    return "" if ok is None else (" met" if ok else " MISSED")


def markdown(rows, meta) -> str:
    real = not meta.get("model", "random").startswith("random")  # a --model run, not the random bench model
    targets = {**TARGETS, **({"kernel": None, "decode": None} if real else {})}
    lines = [f"Model {meta.get('model', 'random bench model')}; shape {meta['shape']}; {meta['machine']}; allocator {meta['allocator']}; {meta['date_utc']} UTC; "
             f"load before: {meta['load_before']}; after: {meta['load_after']}", "",
             "Speed-ups are dense / Λ; in brackets the FLOP-count bound of that speed-up for this shape, then the "
             + ("target (whole-model prefill " if real else f"target (kernel >= {TARGETS['kernel']:g}x and decode >= "
                f"{TARGETS['decode']:g}x at {TARGET_LENGTH}; whole-model prefill ")
             + f">= {TARGETS['prefill_fraction']:.0%} of its bound at every length).", "",
             "| tokens | kernel dense s | kernel Λ s | kernel speed-up (bound; target) | prefill dense s | prefill Λ s | "
             "prefill speed-up (bound; % of bound, target) | prefill peak MiB dense / Λ | decode dense ms | "
             "decode Λ ms | decode speed-up (bound; target) | KV cache MiB dense / Λ | sliding-window ms/token |",
             "|" + "---|" * 13]
    for r in rows:
        b = r["bound"]
        at_target = r["length"] == TARGET_LENGTH
        kernel, decode = r.get("kernel_speedup"), r.get("decode_speedup")
        fraction = r.get("prefill_fraction_of_bound")
        kernel_target, decode_target = (
            "no target" if targets[name] is None else f"≥{targets[name]:g}x" + verdict(
                value >= targets[name] if at_target and value else None)
            for name, value in (("kernel", kernel), ("decode", decode)))
        prefill_target = f"≥{TARGETS['prefill_fraction']:.0%}" + verdict(
            None if fraction is None else fraction >= TARGETS["prefill_fraction"])
        lines.append(
            f"| {r['length']} | {_fmt(r.get('kernel_dense_s'))} | {_fmt(r['kernel_lambda_s'])} | "
            f"{_fmt(kernel)}x ({b['kernel']:.2f}x; {kernel_target}) | {_fmt(r.get('prefill_dense_s'))} | "
            f"{_fmt(r['prefill_lambda_s'])} | {_fmt(r.get('prefill_speedup'))}x ({b['prefill']:.2f}x; "
            f"{_fmt(None if fraction is None else 100 * fraction, '.0f')}%, {prefill_target}) | "
            f"{_fmt(r.get('prefill_dense_peak_mib'), '.0f')} / {_fmt(r['prefill_lambda_peak_mib'], '.0f')} | "
            f"{_fmt(1000 * r['decode_dense_s'] if 'decode_dense_s' in r else None, '.1f')} | "
            f"{1000 * r['decode_lambda_s']:.1f} | {_fmt(decode)}x ({b['decode']:.2f}x; {decode_target}) | "
            f"{_fmt(r.get('cache_dense_mib'), '.0f')} / {r['cache_lambda_mib']:.0f} | "
            f"{1000 * r['decode_sliding_window_s']:.0f} |")
    # Flat means: equal at every context longer than what the cache keeps (n_global + n_local); below that the
    # cache holds the whole context, as any cache does.
    window = meta["shape"]["n_local"] + meta["shape"]["n_global"]
    caches = [r["cache_lambda_mib"] for r in rows if r["length"] >= window]
    if caches:
        flat = max(caches) - min(caches) < 1e-6
        lines += ["", f"Λ KV cache across contexts of {window} tokens or more: {min(caches):.1f}..{max(caches):.1f} "
                      f"MiB ({'flat: target met' if flat else 'NOT flat: target MISSED'}). Paper (Llama-2-7B, 32k, "
                      "GPU): 3.16x encoding, 2.72x decoding."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
