"""Streaming perplexity at any length: one stream of --tokens tokens through the method's bounded KV cache.

    .venv/bin/python benchmarks/streaming_ppl.py --model llama-rope-256 --method lm-infinite --tokens 200k \
        --chunk 256 --out results/bench/streaming_ppl.jsonl

Joins the documents of --data (default pg19-dev; several: 'pg19-train,pg19-dev') into one stream, scores it with
`lengthwise.eval.streaming.streaming_perplexity` (checkpoints beside --out every tenth of the stream; run the same
command again to resume a killed run), and prints NLL by position bucket, the resident memory (RSS) at 10% of the
stream and at the end, the throughput, and what a 10M-token run would take at that rate. The record goes to --out
(JSON lines, task "ppl", mode "stream").
"""

from __future__ import annotations

import argparse
import math
import subprocess
import time
from pathlib import Path

import torch

from lengthwise.api import load_model
from lengthwise.eval.results import ResultsFile
from lengthwise.eval.streaming import parse_token_count, stream_sources, streaming_perplexity

ROOT = Path(__file__).resolve().parents[1]


def bucket_table(record: dict) -> str:
    buckets = record["nll_by_position"]
    lines = ["| target positions | tokens | mean NLL | PPL |", "|---|---|---|---|"]
    for a, b, count, mean in zip(buckets["edges"], buckets["edges"][1:], buckets["counts"], buckets["mean_nll"]):
        lines.append(f"| {a:,}..{b - 1:,} | {count:,} | {mean:.4f} | {math.exp(mean):.2f} |")
    return "\n".join(lines)


def memory_table(record: dict) -> str:
    lines = ["| tokens | share | elapsed s | RSS MiB | peak RSS MiB |", "|---|---|---|---|---|"]
    n = record["length"]
    for entry in record["stream"]["memory"]:
        lines.append(f"| {entry['offset']:,} | {entry['offset'] / n:.0%} | {entry['elapsed_s']} | {entry['rss_mib']} | "
                     f"{entry['peak_rss_mib']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-rope-256")
    parser.add_argument("--method", default="lm-infinite")
    parser.add_argument("--tokens", default="200k", help="stream length, e.g. 200000, 200k, 10M")
    parser.add_argument("--chunk", type=int, default=0, help="tokens per forward (0: training length, max 2048)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "streaming_ppl.jsonl")
    parser.add_argument("--data", default="pg19-dev")
    parser.add_argument("--buckets", type=int, default=16)
    parser.add_argument("--bucket-scale", default="log", choices=("log", "linear"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_tokens = parse_token_count(args.tokens, "--tokens")
    sources = stream_sources(args.data)
    model, tokenizer = load_model(args.model)
    checkpoints = args.out.with_name(args.out.stem + ".stream")
    start = time.perf_counter()
    record = streaming_perplexity(
        model, tokenizer, sources, n_tokens, args.method, chunk_size=args.chunk or None, num_buckets=args.buckets,
        bucket_scale=args.bucket_scale, checkpoint_dir=checkpoints, results=ResultsFile(args.out),
        model_name=args.model, data_name=args.data, progress=False, log=print)
    wall = time.perf_counter() - start
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    metrics, stream = record["metrics"], record["stream"]
    memory = stream["memory"]
    tenth = min(memory, key=lambda e: abs(e["offset"] - n_tokens / 10))
    print(f"{args.model} / {args.method} / {args.data}: {n_tokens:,} tokens, chunk {record['chunk_size']}, "
          f"{args.threads} thread(s), {stream['documents']} documents")
    print(f"PPL {metrics['ppl']:.3f} (NLL {metrics['nll']:.4f}) over {metrics['tokens']:,} scored tokens\n")
    print(bucket_table(record))
    print()
    print(memory_table(record))
    rate = metrics["tokens_per_s"]
    print(f"\nthroughput: {rate:,.0f} tokens/s in the model steps ({stream['elapsed_s']:.1f} s, over "
          f"{stream['resumes'] + 1} run(s)); this call {wall:.1f} s wall, tokenising included")
    print(f"RSS at {tenth['offset'] / n_tokens:.0%}: {tenth['rss_mib']} MiB (peak {tenth['peak_rss_mib']}); "
          f"at the end: {memory[-1]['rss_mib']} MiB (peak {memory[-1]['peak_rss_mib']})")
    print(f"at this rate 10M tokens take {1e7 / rate / 3600:.1f} h of model steps")
    print(f"\nresults: {args.out}\ncheckpoints: {checkpoints}\nload: {load}")


if __name__ == "__main__":
    main()
