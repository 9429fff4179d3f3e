"""Memory of lm-infinite's bounded KV cache, measured by running long contexts through the real model.

    .venv/bin/python benchmarks/bounded_cache_memory.py --threads 1        # both parts (one process each), ~10 min
    .venv/bin/python benchmarks/bounded_cache_memory.py --part real --lengths 8192,16384,32768 --threads 1
    .venv/bin/python benchmarks/bounded_cache_memory.py --part tiny --tokens 1M --chunk 256 --threads 1

Nothing is filled in by hand: every token goes through the patched model (`lengthwise.patch(model, "lm-infinite")`)
and its own cache (`handle.new_cache()`), as `lengthwise ppl --chunk-size` feeds a document.

- `real`: SmolLM2-135M (`lengthwise.load_model("smollm2-135m")`), the first 32,768 tokens of a PG19 dev book fed in
  chunks of `--prefill-chunk` tokens (chunked prefill; logits of the last token only). After 8k, 16k and 32k
  tokens (`--lengths`): the cache's bytes, its kept keys and buffer slots, and the process's resident memory.
- `tiny`: the bundled `llama-rope-256` over `--tokens` tokens (default 1M) fed `--chunk` tokens per forward (a
  decode in chunks: a chunk of C tokens adds C keys and the cache then drops all but the global and the last
  n_local keys, as a one-token step does; one-token steps over 1M tokens would take hours on this CPU), then
  `--single-steps` one-token decoding steps. The same figures at log-spaced points.

"Cache bytes" = the sum over the cache layers of the tensors each one stores (`LambdaCacheLayer.stored()`: its key
and value buffers, spare slots included; `lengthwise.eval.speed.cache_bytes`), next to what a dense cache of the
same context would hold (2 x layers x kv-heads x tokens x head_dim x 4 bytes). "RSS": psutil's resident set size of
this process after that point; "peak RSS": getrusage's maximum so far.

Writes `--out` (JSON: the records) and the same name with `.md` (a table).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import subprocess
import time
from pathlib import Path

import psutil
import torch

import lengthwise
from lengthwise.eval.speed import cache_bytes
from lengthwise.io import atomic_write_json, atomic_write_text
from lengthwise.models.compat import cache_kwargs

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def parse_count(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 10**3, "m": 10**6}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / MIB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cache_shape(cache) -> dict:
    """Kept keys (held by the attention) and buffer slots (allocated) of layer 0, the same in every layer."""
    layer = cache.layers[0]
    buffers = getattr(layer, "_buffers", None)
    return {"n_global": layer.n_global, "n_local": layer.n_local, "slack": layer.slack,
            "kept_keys": int(layer.keys.shape[-2]),
            "buffer_slots": int(buffers[0].shape[-2]) if buffers is not None else int(layer.keys.shape[-2]),
            "seen": int(cache.get_seq_length())}


def dense_mib(model, tokens: int) -> float:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * tokens * head_dim * 4 / MIB


def point(model, cache, tokens: int, started: float, **extra) -> dict:
    row = {"tokens": tokens, **cache_shape(cache), "cache_mib": round(cache_bytes(cache) / MIB, 2),
           "dense_cache_mib": round(dense_mib(model, tokens), 2), "rss_mib": round(rss_mib(), 1),
           "peak_rss_mib": round(peak_rss_mib(), 1), "elapsed_s": round(time.perf_counter() - started, 1), **extra}
    print(json.dumps(row), flush=True)
    return row


@torch.no_grad()
def feed(model, cache, ids: torch.Tensor) -> None:
    model(input_ids=ids[None], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)


def run_real(args) -> dict:
    from lengthwise.data.corpus import load_corpus  # noqa: PLC0415

    lengths = sorted(parse_count(x) for x in args.lengths.split(","))
    model, tokenizer = lengthwise.load_model(args.model)
    model.eval()
    loaded_rss = rss_mib()
    ids = None
    for doc in load_corpus(args.data):
        tokens = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(tokens) >= lengths[-1]:
            ids, book = torch.tensor(tokens[: lengths[-1]]), doc.name
            break
    if ids is None:
        raise SystemExit(f"no document of {args.data} holds {lengths[-1]} tokens")
    handle = lengthwise.patch(model, "lm-infinite")
    cache = handle.new_cache()
    rows, started, done = [], time.perf_counter(), 0
    try:
        for length in lengths:
            while done < length:
                step = min(args.prefill_chunk, length - done)
                feed(model, cache, ids[done : done + step])
                done += step
            rows.append(point(model, cache, done, started))
        config = handle.describe()
    finally:
        handle.remove()
    return {"part": "real", "model": args.model, "method": "lm-infinite", "method_config": config, "data": args.data,
            "document": book, "prefill_chunk": args.prefill_chunk, "rss_after_load_mib": round(loaded_rss, 1),
            "points": rows}


def run_tiny(args) -> dict:
    total = parse_count(args.tokens)
    model, _ = lengthwise.load_model(args.tiny_model)
    model.eval()
    loaded_rss = rss_mib()
    vocab = model.config.vocab_size
    handle = lengthwise.patch(model, "lm-infinite")
    cache = handle.new_cache()
    marks = sorted({m for m in (1_000, 10_000, 100_000, 250_000, 500_000, 750_000) if m < total} | {total})
    generator = torch.Generator().manual_seed(0)
    rows, started, done = [], time.perf_counter(), 0
    try:
        for mark in marks:
            while done < mark:
                step = min(args.chunk, mark - done)
                feed(model, cache, torch.randint(0, vocab, (step,), generator=generator))
                done += step
            rows.append(point(model, cache, done, started, mode=f"chunks of {args.chunk}"))
        for _ in range(args.single_steps):
            feed(model, cache, torch.randint(0, vocab, (1,), generator=generator))
            done += 1
        if args.single_steps:
            rows.append(point(model, cache, done, started, mode=f"then {args.single_steps} one-token steps"))
        config = handle.describe()
    finally:
        handle.remove()
    return {"part": "tiny", "model": args.tiny_model, "method": "lm-infinite", "method_config": config,
            "data": "random token ids (seed 0)", "chunk": args.chunk, "single_steps": args.single_steps,
            "rss_after_load_mib": round(loaded_rss, 1), "points": rows}


def markdown(records: list[dict], header: str) -> str:
    lines = [header, ""]
    for rec in records:
        cfg = rec["method_config"]
        first = rec["points"][0]
        lines += [f"### {rec['model']}, lm-infinite: n_global {first['n_global']}, n_local {first['n_local']}, "
                  f"slack {first['slack']}", "", f"Method config: `{json.dumps(cfg, sort_keys=True)}`", "",
                  f"RSS after loading the model: {rec['rss_after_load_mib']} MiB. " +
                  (f"Input: {rec['document']}, prefill in chunks of {rec['prefill_chunk']} tokens."
                   if rec["part"] == "real" else f"Input: {rec['data']}, fed in chunks of {rec['chunk']} tokens."),
                  "",
                  "| tokens through the model | mode | keys held / buffer slots | cache MiB | dense cache would be MiB "
                  "| RSS MiB | peak RSS MiB | elapsed s |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in rec["points"]:
            mode = p.get("mode", f"prefill, chunks of {rec.get('prefill_chunk')}")
            lines.append(f"| {p['tokens']:,} | {mode} | {p['kept_keys']} / {p['buffer_slots']} | {p['cache_mib']} | "
                         f"{p['dense_cache_mib']} | {p['rss_mib']} | {p['peak_rss_mib']} | {p['elapsed_s']} |")
        lines.append("")
    return "\n".join(lines)


def write_markdown(out: Path, records: list[dict]) -> None:
    header = "\n\n".join(f"Part {r['part']}: `{r['run']['argv']}`; {r['run']['machine']['platform']}, "
                       f"{r['run']['machine']['cpu_count']} CPUs, torch {r['run']['machine']['torch']}, transformers "
                       f"{r['run']['machine']['transformers']}, "
                       f"{r['run']['machine']['torch_threads']} torch thread(s); "
                       f"{r['run']['started']} to {r['run']['finished']}; load before: {r['run']['load_before']}"
                       for r in records)
    atomic_write_text(out.with_suffix(".md"), markdown(records, header) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("real", "tiny", "both"), default="both")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="pg19-dev")
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--tiny-model", default="llama-rope-256")
    parser.add_argument("--tokens", default="1M")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--single-steps", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/bounded_cache_memory.json")
    parser.add_argument("--render-only", action="store_true", help="rewrite the Markdown table from --out")
    args = parser.parse_args()
    if args.render_only:
        write_markdown(args.out, json.loads(args.out.read_text())["records"])
        return
    if args.part == "both":  # one process per part: the real model's memory would stay in the tiny part's RSS
        import sys  # noqa: PLC0415

        for part in ("real", "tiny"):
            argv, rest = [], iter(sys.argv[1:])
            for arg in rest:
                if arg == "--part":
                    next(rest, None)
                elif not arg.startswith("--part="):
                    argv.append(arg)
            subprocess.run([sys.executable, __file__, *argv, "--part", part], check=True)
        return
    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    previous = json.loads(args.out.read_text())["records"] if args.out.exists() else []
    records = []
    if args.part in ("real", "both"):
        records.append(run_real(args))
    if args.part in ("tiny", "both"):
        records.append(run_tiny(args))
    kept = [r for r in previous if r["part"] not in {x["part"] for x in records}]
    machine = {"platform": platform.platform(), "cpu_count": psutil.cpu_count(), "torch": torch.__version__,
               "transformers": __import__("transformers").__version__, "torch_threads": torch.get_num_threads()}
    run = {"started": started.isoformat(timespec="seconds"),
           "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "load_before": load_before, "load_after": subprocess.run(["uptime"], capture_output=True,
                                                                    text=True).stdout.strip(),
           "machine": machine, "argv": " ".join(__import__("sys").argv)}
    for rec in records:
        rec["run"] = run
    all_records = sorted(kept + records, key=lambda r: r["part"])
    atomic_write_json(args.out, {"records": all_records})
    write_markdown(args.out, all_records)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
