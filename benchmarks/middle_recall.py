"""Which middle blocks lm-infinite's block retrieval reads while it answers a passkey prompt.

For one passkey trial (the key `benchmarks/passkey.py` uses for the same seed, length and depth), runs the calls
`generate()` makes (the prompt, then one answer token per call, teacher-forced) and records, for every answer step,
layer and query head, whether the middle keys the query reads include the needle ("The pass key is K. Remember it. K is
the pass key."), and the argmax each step predicts. Prints, per step, the layers in which no head read the needle and
the share of heads that did; writes the same as JSON.

    .venv/bin/python benchmarks/middle_recall.py --model smollm2-135m --length 32768 --depth 50 --seed 1 \
        --method 'lm-infinite:n_local=4096,distance_limit=4096,top_blocks=4,middle_distance=3072,middle_queries=last' \
        --out /tmp/recall.json

Recording wraps `lengthwise.attention.middle._attend_selected` for the run (a diagnostic, not an API).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--depth", type=float, default=50.0, help="percent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", required=True, help="an lm-infinite spec with top_blocks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch  # noqa: PLC0415

    import lengthwise.attention.middle as middle_module  # noqa: PLC0415
    from lengthwise.api import load_model  # noqa: PLC0415
    from lengthwise.data.passkey import NEEDLE, make_passkey_prompt  # noqa: PLC0415
    from lengthwise.eval.passkey import trial_key  # noqa: PLC0415
    from lengthwise.scoring import PatchScorer  # noqa: PLC0415
    from lengthwise.io import atomic_write_text  # noqa: PLC0415
    from lengthwise.models.families import model_info  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    key = trial_key(args.seed, args.length, args.depth, 0)
    prompt = make_passkey_prompt(tokenizer, args.length, args.depth / 100, key)
    needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]  # as the prompt encodes it
    ids = prompt.input_ids
    start = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
    needle_span = (start, start + len(needle))

    scorer = PatchScorer(model, args.method)
    calls = []  # per call of _attend_selected: (H, keys) indices of the keys the last query reads in the middle
    original = middle_module._attend_selected

    def recording(qf, keys, values, key_pos, *rest):
        calls.append(key_pos[0])
        return original(qf, keys, values, key_pos, *rest)

    middle_module._attend_selected = recording
    layers = model_info(model).num_layers
    steps = []
    try:
        decoder = scorer.decoder()
        full = torch.tensor(ids + prompt.answer_ids[:-1])
        with torch.no_grad():
            for j in range(len(prompt.answer_ids)):
                calls.clear()
                piece = full[:len(ids)] if j == 0 else full[len(ids) + j - 1:len(ids) + j]
                predicted = int(decoder.feed(piece).argmax())
                if len(calls) != layers:  # one selection per layer, else the layers below would be mislabelled
                    raise SystemExit(f"middle_recall: needs one query group per layer and step "
                                     f"(middle_queries=last, middle_from_layer=0, every layer retrieving); "
                                     f"{args.method!r} made {len(calls)} selections for {layers} layers")
                read = []  # per layer: share of query heads whose blocks hold part of the needle
                for read_keys in calls:
                    hit = ((read_keys >= needle_span[0]) & (read_keys < needle_span[1])).any(-1)  # (H,)
                    read.append(round(float(hit.float().mean()), 3))
                steps.append({"step": j, "predicted": tokenizer.decode([predicted]),
                              "expected": tokenizer.decode([prompt.answer_ids[j]]), "heads_reading_needle": read})
                blind = [i for i, r in enumerate(read) if r == 0]
                print(f"step {j}: predicted {steps[-1]['predicted']!r} expected {steps[-1]['expected']!r}; "
                      f"mean share of heads reading the needle {sum(read) / max(1, len(read)):.2f}; "
                      f"layers with none: {blind}", flush=True)
    finally:
        middle_module._attend_selected = original
        scorer.close()
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
              "model": args.model, "length": args.length, "depth": args.depth, "seed": args.seed, "key": key,
              "method": args.method, "needle_span": needle_span, "steps": steps}
    atomic_write_text(Path(args.out), json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
