"""Control for a streaming-perplexity run: is a change of NLL along the stream the position or the books there?

1. Scores each document of the stream on its own, from position 0 (its first --length tokens, one pass under the
   same method), and prints where it starts in the stream and its mean NLL: books that are harder on their own in
   one part of the stream explain a higher NLL there.
2. Scores one window of the first document with its first 10 tokens at positions 0..9 and the rest shifted by
   0, 1M, 3M, 6M, 9M (what the stream's cache holds there: the global tokens, and a window far away): equal NLLs
   mean the absolute position itself (float32 rotary angles) does not move the NLL.

    .venv/bin/python benchmarks/streaming_control.py --model llama-rope-256 --method lm-infinite \
        --data pg19-train,pg19-dev --tokens 10M --length 4096 --out docs/results/streaming_control_llama-rope-256.json
"""

from __future__ import annotations

import argparse

import torch

from lengthwise.api import load_model, patch
from lengthwise.scoring import nll_one_pass
from lengthwise.eval.streaming import document_separator, parse_token_count, stream_sources
from lengthwise.io import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-rope-256")
    parser.add_argument("--method", default="lm-infinite")
    parser.add_argument("--data", default="pg19-train,pg19-dev")
    parser.add_argument("--tokens", default="10M", help="the stream's length: documents starting before it count")
    parser.add_argument("--length", type=int, default=4096, help="tokens scored per document")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    limit, start, rows = parse_token_count(args.tokens), 0, []
    separator = len(document_separator(tokenizer))
    with patch(model, args.method):
        for source in stream_sources(args.data):
            if start >= limit:
                break
            ids = [t for piece in source.pieces() for t in tokenizer(piece, add_special_tokens=False)["input_ids"]]
            nll = nll_one_pass(model, torch.tensor(ids[:args.length]))
            rows.append({"document": source.name, "stream_start": start, "tokens": len(ids),
                         "mean_nll_first_tokens": round(float(nll.mean()), 4)})
            print(rows[-1], flush=True)
            start += len(ids) + separator
        first = stream_sources(args.data)[0]
        ids = torch.tensor([t for piece in first.pieces() for t in tokenizer(piece, add_special_tokens=False)
                            ["input_ids"]][:args.length + 10])[None]  # (1, 10 + length)
        offsets = {}
        for offset in (0, 1_000_000, 3_000_000, 6_000_000, 9_000_000):
            positions = torch.cat([torch.arange(10), torch.arange(10, ids.shape[1]) + offset])[None]
            with torch.no_grad():
                logits = model(input_ids=ids, position_ids=positions).logits[0]
            nll = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[0, 1:], reduction="none")[1000:]
            offsets[offset] = round(float(nll.mean()), 4)
            print(f"window shifted by {offset:,}: mean NLL {offsets[offset]}", flush=True)
    atomic_write_json(args.out, {"args": vars(args), "documents": rows, "shifted_window_nll": offsets})


if __name__ == "__main__":
    main()
