"""Temp-LoRA evaluation (DESIGN.md protocol): each chunk scored before the LoRA trains on it; PPL pooled over
documents, overall and by context-position bucket; the same windows without training are the comparison.

One record per (document, arm) in the shared results schema, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict

import torch

from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.progress import progress_bar
from lengthwise.temp_lora.buckets import DEFAULT_EDGES, bucket_nll, bucket_start
from lengthwise.temp_lora.config import TempLoraConfig
from lengthwise.temp_lora.session import TempLoraSession
from lengthwise.errors import UserError


def select_documents(documents, tokenizer, max_docs: int, max_tokens: int | None, min_tokens: int = 2,
                     longest: bool = True) -> list[tuple[str, list[int]]]:
    """Tokenize, keep documents with >= min_tokens tokens, longest first (or corpus order), cap at max_tokens."""
    if max_docs < 1:
        raise UserError(f"max_docs must be >= 1, got {max_docs}")
    order = sorted(documents, key=lambda d: -len(d.text)) if longest else list(documents)
    kept = []
    for doc in order:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) < max(2, min_tokens):
            continue
        kept.append((doc.name, ids[:max_tokens] if max_tokens else ids))
        if len(kept) >= max_docs:
            break
    if not kept:
        raise UserError(f"no document has at least {max(2, min_tokens)} tokens; lower --min-tokens or pick other data")
    return kept


def run_arm(model, docs: Sequence[tuple[str, list[int]]], config: TempLoraConfig, *, arm: str, method: str | None,
            results: ResultsFile, model_name: str, data_name: str, edges=DEFAULT_EDGES,
            progress: bool = True) -> list[dict]:
    """One record per document for one arm (a config; `steps_per_chunk=0` is the no-LoRA arm)."""
    records = []
    with progress_bar(progress) as bar:
        task = bar.add_task(f"temp-lora {arm}", total=len(docs))
        for name, ids in docs:
            key = cell_key("temp-lora", model=model_name, data=data_name, doc=name, tokens=len(ids),
                           method=method or "", **asdict(config))
            done = results.done(key)
            if done:
                records.append(done)
                bar.advance(task)
                continue
            with TempLoraSession(model, config, method=method) as session:
                nll = session.process(torch.tensor(ids))
                cost = session.cost_summary(len(nll))
            mean = nll.double().mean().item()
            metrics = {"ppl": round(math.exp(mean), 4), "nll": round(mean, 5), "nll_sum": nll.double().sum().item(),
                       "tokens": len(nll), "buckets": bucket_nll(nll, edges), "cost": cost}
            record = make_record("temp-lora", key, model=model_name, method=f"temp-lora:{arm}",
                                 method_config={**asdict(config), "method": method}, data=data_name, seed=config.seed,
                                 metrics=metrics, arm=arm, doc=name)
            results.append(record)
            records.append(record)
            bar.advance(task)
    return records


def pool(records: Sequence[dict]) -> dict:
    """Pooled PPL (all scored tokens of all documents), per bucket, and cost per token of one arm."""
    nll_sum = sum(r["metrics"]["nll_sum"] for r in records)
    tokens = sum(r["metrics"]["tokens"] for r in records)
    buckets: dict[str, list[float]] = {}
    for r in records:
        for label, (s, c) in r["metrics"]["buckets"].items():
            acc = buckets.setdefault(label, [0.0, 0])
            acc[0] += s
            acc[1] += c
    costs = [r["metrics"]["cost"] for r in records]
    seconds = sum(sum(c["seconds"].values()) for c in costs)
    flops = sum(sum(c["flops"].values()) for c in costs)
    return {
        "ppl": math.exp(nll_sum / tokens),
        "tokens": tokens,
        "docs": len(records),
        "buckets": {k: {"ppl": math.exp(s / c), "tokens": c}
                    for k, (s, c) in sorted(buckets.items(), key=lambda kv: bucket_start(kv[0]))},
        "ms_per_token": 1000.0 * seconds / tokens,
        "flops_per_token": flops / tokens,
    }


def change(new: float, old: float) -> str:
    return f"{100.0 * (new / old - 1.0):+.1f}%"


def comparison_rows(base: dict, lora: dict) -> list[list[str]]:
    """Rows `bucket | tokens | PPL without | PPL with | change`, buckets then overall."""
    rows = []
    for label, b in base["buckets"].items():
        if label in lora["buckets"]:
            w = lora["buckets"][label]
            rows.append([label, str(b["tokens"]), f"{b['ppl']:.3f}", f"{w['ppl']:.3f}", change(w["ppl"], b["ppl"])])
    rows.append(["all", str(base["tokens"]), f"{base['ppl']:.3f}", f"{lora['ppl']:.3f}", change(lora["ppl"], base["ppl"])])
    return rows
