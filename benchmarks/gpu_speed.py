"""Speed and memory on one GPU: lm-infinite vs dense attention (SDPA, FlashAttention-2 when installed) on a
Llama-7B-shaped model with random weights, bfloat16, 32k-128k tokens. Run by benchmarks/gpu.sh (under 8 minutes).

    bash benchmarks/gpu.sh                    # one GPU: 32k, 64k, 128k; records in results/gpu_speed.jsonl
    bash benchmarks/gpu.sh --smoke            # any machine, CPU: a tiny shape at 256 and 512 tokens, seconds

Per cell (method, length): a random prompt (fixed by the seed) is prefilled `--chunk` tokens per forward call
through the method's own cache (`handle.new_cache()`: the bounded Λ cache for lm-infinite; a `DynamicCache` for
dense attention), then `--decode-steps` tokens are decoded one at a time. Recorded as `lengthwise.eval.speed.bench`
records them (task "bench", same key fields and metrics: prefill_s, prefill_tokens_per_s, decode_s_per_token,
peak_memory_mib above the level before the cell, cache_mib, estimated_mib), plus `peak_total_mib` (weights
included), `chunk_size`, the attention implementation and `benchmark: "gpu_speed"`. A cell that runs out of GPU
memory is recorded with `"oom": true` (dense attention at 128k: its KV cache alone is 64 GiB for this shape) and the
run goes on; cells left when `--budget-s` is spent are recorded as skipped. Results append and resume by key, like
every lengthwise results file. The model is built on the GPU in bfloat16 (no float32 copy in host memory).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from dataclasses import asdict
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=32, mlp=11008, vocab=32000, train_length=4096)
SMOKE = dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=256, train_length=64)
LMI = "lm-infinite:n_local=4096,distance_limit=4096"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 256/512 tokens, CPU: proves the script runs")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--lengths", default=None, help="default 32768,65536,131072 (smoke: 256,512)")
    parser.add_argument("--methods", default=None,
                        help=f"';'-separated lengthwise specs; 'vanilla@flash_attention_2' runs dense attention "
                        f"with that attn_implementation. Default: vanilla (SDPA), vanilla@flash_attention_2 (when "
                        f"flash_attn is installed), {LMI}, {LMI},impl=flex (GPU only)")
    parser.add_argument("--chunk", type=int, default=None, help="prefill tokens per call (default 8192; smoke 128)")
    parser.add_argument("--decode-steps", type=int, default=None, help="default 16 (smoke 2)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting cells after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON-lines records (default results/gpu_speed.jsonl; smoke: "
                        "results/gpu_speed_smoke.jsonl)")
    parser.add_argument("--md", default=None, help="Markdown table (default: --out with .md)")
    for name in LLAMA_7B:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {LLAMA_7B[name]} "
                            f"(smoke {SMOKE[name]})")
    args = parser.parse_args(argv)
    shape = SMOKE if args.smoke else LLAMA_7B
    for name, value in shape.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.lengths = [int(x) for x in (args.lengths or ("256,512" if args.smoke else "32768,65536,131072")).split(",")]
    args.chunk = args.chunk or (128 if args.smoke else 8192)
    args.decode_steps = args.decode_steps or (2 if args.smoke else 16)
    args.out = Path(args.out or ROOT / "results" / ("gpu_speed_smoke.jsonl" if args.smoke else "gpu_speed.jsonl"))
    args.md = Path(args.md) if args.md else args.out.with_suffix(".md")
    lmi = LMI if not args.smoke else "lm-infinite:n_local=64,distance_limit=64"
    if args.methods:
        args.methods = [m.strip() for m in args.methods.split(";") if m.strip()]
    else:
        args.methods = ["vanilla"]
        if importlib.util.find_spec("flash_attn") is not None and args.device.startswith("cuda"):
            args.methods.append("vanilla@flash_attention_2")
        args.methods.append(lmi)
        if args.device.startswith("cuda"):
            args.methods.append(lmi + ",impl=flex")
    return args


def split_method(method: str) -> tuple[str, str]:
    spec, _, attn = method.partition("@")
    return spec, attn or "sdpa"


def attention_label(spec: str, attn: str) -> str:
    """What computes attention in a cell: the Λ kernel of an lm-infinite / streaming patch, else `attn`."""
    from lengthwise.registry import parse_method_spec  # noqa: PLC0415

    for name, options in parse_method_spec(spec):
        if name in ("lm-infinite", "streaming"):
            return f"lengthwise_lambda ({options.get('impl', 'blocked')})"
    return attn


def oom_errors() -> tuple[type, ...]:
    errors = [torch.OutOfMemoryError] if hasattr(torch, "OutOfMemoryError") else []
    if hasattr(torch.cuda, "OutOfMemoryError"):
        errors.append(torch.cuda.OutOfMemoryError)
    return tuple(errors) or (RuntimeError,)


def free(device: torch.device) -> None:
    import gc  # noqa: PLC0415

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    from lengthwise.api import check_device, resolve_dtype  # noqa: PLC0415
    from lengthwise.eval.results import ResultsFile, cell_key, machine_info, make_record  # noqa: PLC0415
    from lengthwise.eval.speed import PeakMemory, WARMUP_TOKENS, build_llama, run_cell  # noqa: PLC0415
    from lengthwise.eval.tasks import estimate_memory  # noqa: PLC0415
    from lengthwise.registry import get_entry, parse_method_spec  # noqa: PLC0415

    dtype = resolve_dtype(args.dtype)
    check_device(args.device, dtype)
    device = torch.device(args.device)
    began = time.perf_counter()
    model = build_llama(args.hidden, args.layers, args.heads, args.kv_heads, args.mlp, args.vocab,
                        args.train_length, args.seed, dtype, device=args.device)
    built_s = time.perf_counter() - began
    shape = {k: getattr(args, k) for k in LLAMA_7B}
    model_name = "llama(" + ",".join(f"{k}={v}" for k, v in shape.items()) + ")"
    print(f"model {model_name} built on {device} in {dtype} in {built_s:.1f} s", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(1, args.vocab, (1, max(args.lengths)), generator=generator).to(device)
    results = ResultsFile(args.out)
    records, warmed = [], set()
    # FlexAttention cells last: they compile per shape, and the budget should go to the main comparison first
    late = [m for m in args.methods if "impl=flex" in m]
    cells = [(n, m) for group in ([m for m in args.methods if m not in late], late) for n in args.lengths
             for m in group]
    for n, method in cells:
        spec, attn = split_method(method)
        key = cell_key("bench", model=model_name, method=method, length=n, decode_steps=args.decode_steps,
                       device=str(device), dtype=str(dtype), seed=args.seed, chunk_size=args.chunk,
                       gpu=machine_info()["cuda"] if device.type == "cuda" else None)
        done = results.done(key)
        if done:
            records.append(done)
            continue
        common = dict(model=model_name, method=method, data="random-ids", seed=args.seed, length=n,
                      method_resolved=spec, decode_steps=args.decode_steps, device=str(device), dtype=str(dtype),
                      attn_implementation=attention_label(spec, attn), pretrain_length=args.train_length,
                      chunk_size=args.chunk,
                      torch_threads=torch.get_num_threads(), benchmark="gpu_speed", shape=shape)
        try:
            describe = [{"method": name, **asdict(get_entry(name).make_config(**options))}
                        for name, options in parse_method_spec(spec)]
        except ValueError as err:
            print(f"error: method {method!r}: {err}", file=sys.stderr)
            return 2
        if time.perf_counter() - began > args.budget_s:
            record = make_record("bench", key + "|skipped", method_config=describe, metrics={"skipped": True},
                                 note=f"time budget {args.budget_s:.0f} s spent", **common)
            records.append(record)
            print(f"{method} @ {n}: skipped (time budget)", flush=True)
            continue
        try:
            model.set_attn_implementation(attn)
            if method not in warmed:
                run_cell(model, prompt[:, :WARMUP_TOKENS], spec, 1, args.train_length, args.chunk)
                warmed.add(method)
            with PeakMemory(device) as peak:
                out = run_cell(model, prompt[:, :n], spec, args.decode_steps, args.train_length, args.chunk)
            total = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            metrics = {
                "prefill_s": round(out["prefill_s"], 5),
                "prefill_tokens_per_s": round(n / out["prefill_s"], 1),
                "decode_s_per_token": round(statistics.median(out["decode_s"]), 6),
                "peak_memory_mib": round(peak.peak / 2**20, 2),
                "peak_total_mib": None if total is None else round(total, 1),
                "cache_mib": None if out["cache_bytes"] is None else round(out["cache_bytes"] / 2**20, 4),
                "cache_bytes": out["cache_bytes"],
                "estimated_mib": round(estimate_memory(model, n, spec, logits=1).total / 2**20, 1),
                "oom": False,
            }
            record = make_record("bench", key, method_config=describe, metrics=metrics,
                                 decode_s=[round(t, 6) for t in out["decode_s"]], memory_source=peak.source,
                                 **common)
            del out
        except oom_errors() as err:
            free(device)
            record = make_record("bench", key, method_config=describe, metrics={"oom": True},
                                 note=" ".join(str(err).split())[:300], **common)
        except Exception as err:  # noqa: BLE001 - one failing kernel must not end the table
            free(device)
            record = make_record("bench", key + "|error", method_config=describe, metrics={"error": True},
                                 note=f"{type(err).__name__}: {' '.join(str(err).split())[:300]}", **common)
        finally:
            model.set_attn_implementation("sdpa")
        if not record["key"].endswith(("|error", "|skipped")):
            results.append(record)  # errors and skips are printed and tabled, not kept: a rerun tries them again
        records.append(record)
        free(device)
        print(json.dumps({"method": method, "length": n, **record["metrics"],
                          **({"note": record["note"]} if "note" in record else {})}), flush=True)
    results.close()
    table = markdown(records, model_name, device, dtype, args, time.perf_counter() - began)
    from lengthwise.io import atomic_write_text  # noqa: PLC0415

    atomic_write_text(args.md, table)
    print(table)
    print(f"records: {args.out}\ntable: {args.md}")
    return 0


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(records: list[dict], model_name: str, device, dtype, args, seconds: float) -> str:
    machine = records[0]["machine"] if records else {}
    lines = [f"Model {model_name}, random weights, {dtype}, on {device} "
             f"({machine.get('cuda') or machine.get('processor')}); prefill {args.chunk} tokens per call through each "
             f"method's cache, then {args.decode_steps} decoding steps; {seconds:.0f} s in all; "
             f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC.", "",
             "| method | attention | tokens | prefill s | prefill tokens/s | decode ms/token | "
             "peak MiB above weights | peak MiB total | KV cache MiB |", "|" + "---|" * 9]
    for r in records:
        m = r["metrics"]
        if m.get("oom") or m.get("skipped") or m.get("error"):
            what = "out of memory" if m.get("oom") else "skipped (time budget)" if m.get("skipped") else r.get("note")
            lines.append(f"| {r['method_resolved']} | {r['attn_implementation']} | {r['length']} | {what} | | | | | |")
            continue
        lines.append(
            f"| {r['method_resolved']} | {r['attn_implementation']} | {r['length']} | {m['prefill_s']:.2f} | "
            f"{m['prefill_tokens_per_s']:,.0f} | {1000 * m['decode_s_per_token']:.1f} | "
            f"{m['peak_memory_mib']:,.0f} | {_fmt(m.get('peak_total_mib'), ',.0f')} | "
            f"{_fmt(m.get('cache_mib'), ',.1f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
