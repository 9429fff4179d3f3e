"""Stored decode weights and keys: quality and compiled decode speed of each format the static step reads.

For each weight format of `lengthwise.static_decode.WEIGHT_FORMATS` ("model": the float32 weights themselves;
"bfloat16", "float16", "int8" with one scale per output row), with the keys and values held as `--kv`
(`KV_FORMATS`: "model" or "bfloat16"):
- prefill PPL: one document of the demo's data (pg19-dev) under lm-infinite, the model computing with those weights
  (`projections_as_stored`: what the static step computes); it does not depend on `--kv`;
- decode PPL: the same document's first `--decode-prefix` tokens prefilled, then its next `--decode-tokens` tokens
  fed one at a time through the compiled static step, each step's logits scoring the token after it: the quality of
  the decode path itself, keys and values included;
- speed: `lengthwise.eval.speed.bench`'s compiled decode after prompts of each depth (ms/token, median of the steps),
  with the bytes of weights a step reads and the share of the copy-bandwidth floor (weights + the keys and values
  attended, over the copy bandwidth of benchmarks/llamacpp_peer.py).

    .venv/bin/python benchmarks/decode_weights.py --model smollm2-135m --depths 512,8192 --ppl-length 8192 \
        --out docs/results/decode_weights.jsonl
    .venv/bin/python benchmarks/decode_weights.py --weights model,bfloat16,int8 --kv bfloat16 \
        --out docs/results/decode_weights.jsonl

Every cell is appended to OUT as it finishes and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from lengthwise.api import load_model, patch
from lengthwise.data.corpus import documents_of_length, load_corpus
from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.eval.speed import bench
from lengthwise.models.compat import cache_kwargs
from lengthwise.scoring import open_scorer
from lengthwise.static_decode import KV_FORMATS, WEIGHT_FORMATS, StaticDecoder, projections_as_stored

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import copy_bandwidth  # noqa: E402  (the same floor as the peer benchmark)


def attended_kv_bytes(model, record: dict, steps: int) -> int:
    """Bytes of keys and values one step reads at the middle of the timed steps: the static buffers hold `slots` of
    them (`cache_bytes`: keys, values and an 8-byte position per slot), the step reads the filled ones."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = 2 if record.get("decode_kv", "model") == "bfloat16" else 4
    per_slot = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element
    slots = record["metrics"]["cache_bytes"] // (per_slot + 8)
    return per_slot * min(record["length"] + steps // 2, slots)


def ppl_cell(model, ids: torch.Tensor, spec: str, weights: str) -> dict:
    start = time.perf_counter()
    with torch.no_grad(), projections_as_stored(model, weights), open_scorer(model, spec) as scorer:
        nll = scorer.nll(ids)
    return {"ppl": math.exp(float(nll.mean())), "tokens": len(nll), "finite": bool(nll.isfinite().all()),
            "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def decode_ppl_cell(model, ids: torch.Tensor, prefix: int, tokens: int, weights: str, kv: str) -> dict:
    """PPL of ids[prefix + 1 : prefix + tokens + 1] predicted by the compiled static step, token by token."""
    start = time.perf_counter()
    with patch(model, "lm-infinite") as handle:
        cache = handle.new_cache()
        model(input_ids=ids[None, :prefix], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        decoder = StaticDecoder(model, cache, compile=True, weights=weights, kv=kv)
        nll = []
        for index in range(prefix, prefix + tokens):
            logits = decoder.step(ids[index].reshape(1, 1))  # (1, V): the next token's distribution
            nll.append(float(torch.nn.functional.cross_entropy(logits.float(), ids[index + 1 : index + 2])))
    return {"decode_ppl": math.exp(sum(nll) / len(nll)), "decode_tokens": tokens, "decode_prefix": prefix,
            "decode_mode": decoder.mode, "check_gap": decoder.check_gap,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="pg19-dev")
    parser.add_argument("--method", default="lm-infinite")
    parser.add_argument("--weights", default=",".join(WEIGHT_FORMATS), help="comma-separated formats, in order")
    parser.add_argument("--kv", default="model", choices=KV_FORMATS, help="how the static buffers hold keys and values")
    parser.add_argument("--depths", default="512,8192", help="prompt lengths before the timed decode steps")
    parser.add_argument("--decode-prefix", type=int, default=8192, help="decode PPL: tokens prefilled first")
    parser.add_argument("--decode-tokens", type=int, default=512,
                        help="decode PPL: tokens fed one at a time (0: none)")
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
    model, tokenizer = load_model(args.model)
    bandwidth = copy_bandwidth(args.threads)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    corpus = load_corpus(args.data)

    def first_document(length: int) -> torch.Tensor | None:
        """The first document of `length` tokens or more, truncated to it (None for length 0)."""
        if not length:
            return None
        return torch.as_tensor(documents_of_length(corpus, tokenizer, length, max_docs=1).docs[0][1])

    ids = first_document(args.ppl_length)
    decode_ids = first_document(args.decode_prefix + args.decode_tokens + 1 if args.decode_tokens else 0)
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
            print(f"{weights}: prefill PPL {done['metrics']['ppl']:.4f}", flush=True)
        if decode_ids is not None:
            key = cell_key("decode-weights-decode-ppl", model=args.model, data=args.data, prefix=args.decode_prefix,
                           tokens=args.decode_tokens, method="lm-infinite", weights=weights, kv=args.kv)
            if (done := results.done(key)) is None:
                done = make_record("decode-weights-decode-ppl", key, model=args.model, method="lm-infinite",
                                   method_config=None, data=args.data, seed=0, weights=weights, kv=args.kv,
                                   metrics=decode_ppl_cell(model, decode_ids, args.decode_prefix,
                                                           args.decode_tokens, weights, args.kv),
                                   torch_threads=torch.get_num_threads())
                results.append(done)
            rows.append(done)
            print(f"{weights}, kv {args.kv}: decode PPL {done['metrics']['decode_ppl']:.4f} "
                  f"({done['metrics']['decode_mode']}, check gap {done['metrics']['check_gap']})", flush=True)
        for record in bench(model, depths, [args.method], decode_steps=args.decode_steps, results=results,
                            model_name=args.model, progress=False, decode="compiled", decode_weights=weights,
                            decode_kv=args.kv):
            rows.append(record)
            metrics = record["metrics"]
            moved = record["decode_weight_bytes"] + attended_kv_bytes(model, record, args.decode_steps)
            floor_ms = 1000 * moved / bandwidth
            print(f"{weights}, kv {args.kv} @ {record['length']}: {1000 * metrics['decode_s_per_token']:.1f} "
                  f"ms/token ({record['decode_mode']}, min {1000 * min(record['decode_s']):.1f}), weights "
                  f"{record['decode_weight_bytes'] / 1e6:.0f} MB, floor {floor_ms:.1f} ms, share "
                  f"{floor_ms / (1000 * metrics['decode_s_per_token']):.2f}, copy bandwidth "
                  f"{bandwidth / 1e9:.1f} GB/s", flush=True)
    reference = {task: next((r["metrics"][name] for r in rows if r["task"] == task and r.get("weights") == "model"
                             and r.get("kv", "model") == "model"), None)
                 for task, name in (("decode-weights-ppl", "ppl"), ("decode-weights-decode-ppl", "decode_ppl"))}
    print("| weights | kv | PPL (prefill or decode) | vs float32 |\n|---|---|---|---|")
    for row in rows:
        name = {"decode-weights-ppl": "ppl", "decode-weights-decode-ppl": "decode_ppl"}.get(row["task"])
        if name:
            base = reference[row["task"]]
            change = "—" if base is None else f"{100 * (row['metrics'][name] / base - 1):+.2f}%"
            print(f"| {row['weights']} | {row.get('kv', '—')} | {name} {row['metrics'][name]:.4f} | {change} |")


if __name__ == "__main__":
    main()
