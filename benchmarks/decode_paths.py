"""Decode latency of the three lm-infinite decoding paths at several contexts, interleaved on one prefill each.

    .venv/bin/python benchmarks/decode_paths.py --lengths 8192,32768 --threads 2

Per context n: one prefill of n random tokens through the method's bounded cache (`handle.new_cache()`; with
`--fill synthetic` the cache is filled directly with random keys at the positions a prefill of n tokens leaves:
the same decode work, without the minutes of a long prefill), then
`--turns` rounds of `--steps` greedy-shaped steps on each path in turn: "eager" (the model's forward on the bounded
cache), "static" (`lengthwise.static_decode`, eager) and "compiled" (the same step through torch.compile), the
last two reading the projection weights as `--weights` stores them and holding the keys and values as `--kv`. Each path
continues from the same prefill on its own copy of the state; alternating the paths within each round lets them see
the same load on a shared machine. Reported per path: the median and the minimum of all its timed steps (the
minimum is the least disturbed by other processes), and the first static steps (compilation, the eager check).
Also a work count per step (torch.profiler: operator calls and elements of their inputs) of the eager path, to show
whether any of its work grows with n.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lengthwise.api import load_model, patch
from lengthwise.models.compat import cache_kwargs
from lengthwise.static_decode import KV_FORMATS, WEIGHT_FORMATS, StaticDecoder

ROOT = Path(__file__).resolve().parent.parent


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def work_count(step) -> tuple[int, int]:
    """(operator calls, elements of their inputs) of one call of `step`."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    calls = elements = 0
    for event in prof.events():
        calls += 1
        elements += sum(math.prod(s) for s in event.input_shapes
                        if isinstance(s, list) and s and all(isinstance(x, int) for x in s))
    return calls, elements


def synthetic_fill(model, cache, n: int) -> None:
    """Random keys and values at the positions a prefill of n tokens leaves in the bounded cache: the global ones
    and the last n_local."""
    state = model.model.layers[0].self_attn.__dict__["_lengthwise_lambda"]
    n_global, n_local = state.pattern.n_global, state.pattern.n_local
    kept = torch.cat([torch.arange(min(n_global, n)), torch.arange(max(n_global, n - n_local), n)])
    generator = torch.Generator().manual_seed(0)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in cache.layers:
        k = torch.randn(1, config.num_key_value_heads, len(kept), head_dim, generator=generator)
        layer.update(k, torch.randn(k.shape, generator=generator))
        layer.record(kept[None], torch.ones(1, len(kept), dtype=torch.bool))
        layer.seen = n


@torch.no_grad()
def measure(model, n: int, args, decoders: dict) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with patch(model, "lm-infinite") as handle:
        cache = handle.new_cache()
        start = time.perf_counter()
        if args.fill == "synthetic":
            synthetic_fill(model, cache, n)
            logits = torch.zeros(1, model.config.vocab_size)
        else:
            logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True,
                           logits_to_keep=1).logits[:, -1]
        prefill = time.perf_counter() - start
        token = logits.argmax(-1, keepdim=True)
        warm = {}
        for name in ("static", "compiled"):
            decoder = decoders.get(name)
            if decoder is None:
                decoder = decoders[name] = StaticDecoder(model, compile=name == "compiled", weights=args.weights,
                                                           kv=args.kv)
            decoder.load(cache)  # copied before the eager path's steps move the cache on
            start = time.perf_counter()
            decoder.step(token)  # checked against the eager step (which spends `cache`: refill below)
            warm[name] = round(time.perf_counter() - start, 3)
        cache = handle.new_cache()
        if args.fill == "synthetic":
            synthetic_fill(model, cache, n)
        else:
            model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        position = [n]

        def eager_step():
            model(input_ids=token, **cache_kwargs(model, cache), use_cache=True,
                  position_ids=torch.tensor([[position[0]]]), logits_to_keep=1)
            position[0] += 1

        paths = {"eager": eager_step, "static": lambda: decoders["static"].step(token),
                 "compiled": lambda: decoders["compiled"].step(token)}
        work = work_count(eager_step)
        times = {name: [] for name in paths}
        for _ in range(args.turns):
            for name, step in paths.items():
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
    row = {"length": n, "fill": args.fill, "weights": args.weights, "kv": args.kv, "prefill_s": round(prefill, 2),
           "eager_work_calls": work[0],
           "eager_work_elements": work[1],
           "first_step_s": warm, "compiled_mode": decoders["compiled"].mode}
    for name, seconds in times.items():
        row[f"{name}_median_ms"] = round(1000 * statistics.median(seconds), 2)
        row[f"{name}_min_ms"] = round(1000 * min(seconds), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--fill", choices=("prefill", "synthetic"), default="prefill")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="model",
                        help="how the static and compiled steps store the projection weights (the eager path: the "
                        "model's own)")
    parser.add_argument("--kv", choices=KV_FORMATS, default="model",
                        help="how the static and compiled steps hold the keys and values")
    parser.add_argument("--out", default=str(ROOT / "docs/results/decode_paths.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    decoders: dict = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in (int(x) for x in args.lengths.split(",")):
        before = load()
        row = measure(model, n, args, decoders)
        row.update(model=args.model, threads=args.threads, steps=args.steps, turns=args.turns, load_before=before,
                   load_after=load(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                   machine="2-core x86-64 CPU (AVX2, no AVX-512), shared with other jobs: see load")
        print(json.dumps(row), flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
