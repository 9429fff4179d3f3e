"""Perplexity by length (DESIGN.md protocol).

One forward pass per document truncated to N tokens, per-position NLL kept; PPL = exp(mean NLL) over all scored
tokens; NLL by position bucket. The `sliding-window` baseline scores each token by recomputing the model over the
previous `window` tokens (strided: `stride` tokens scored per window). With `chunk_size`, a document is fed chunk
by chunk through the patched model's own KV cache (for lengths beyond memory).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lengthwise.data.corpus import Document, documents_of_length
from lengthwise.eval.cells import Cell, RayPool, run_cells
from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.models.families import model_info
from lengthwise.scoring import open_scorer
from lengthwise.errors import UserError

NUM_BUCKETS = 32


def bucketize(nll_sum: torch.Tensor, count: int, num_buckets: int = NUM_BUCKETS) -> dict:
    """Mean NLL over `num_buckets` equal position ranges (target positions 1..N-1)."""
    mean = nll_sum / count
    edges = torch.linspace(0, len(mean), num_buckets + 1).round().long().tolist()
    values = [mean[a:b].mean().item() for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return {"edges": [e + 1 for e in edges], "mean_nll": [round(v, 5) for v in values]}


@dataclass(frozen=True)
class PplCell:
    method: str
    length: int
    docs: tuple[tuple[int, ...], ...]  # token ids of each document truncated to `length`
    skipped: int  # documents shorter than `length`
    chunk_size: int | None
    model_name: str
    data_name: str
    seed: int
    key: str


def perplexity(
    model,
    tokenizer,
    documents: Sequence[Document],
    lengths: Sequence[int],
    methods: Sequence[str] = ("vanilla",),
    *,
    max_docs: int = 8,
    chunk_size: int | None = None,
    results: ResultsFile | None = None,
    model_name: str = "model",
    data_name: str = "data",
    seed: int = 0,
    progress: bool = True,
    pool: RayPool | None = None,
) -> list[dict]:
    """PPL for every (method, length) cell; returns (and appends to `results`) one record per cell.

    `methods` are spec strings (`"vanilla"`, `"sliding-window:stride=16"`, `"yarn:factor=4+lm-infinite"`).
    Cells already in `results` are skipped and their stored records returned. `pool`: run the cells on Ray.
    """
    tokenized = {n: documents_of_length(documents, tokenizer, n, max_docs) for n in lengths}
    for n, tok in tokenized.items():
        if not tok.docs:
            raise UserError(
                f"no document of {data_name!r} has {n} tokens ({tok.skipped} shorter ones skipped); "
                "use shorter lengths or longer documents"
            )
    cells = []
    for method in methods:
        for n in lengths:
            key = cell_key("ppl", model=model_name, method=method, data=data_name, length=n, docs=max_docs,
                           chunk=chunk_size or 0, seed=seed)
            docs = tuple(tuple(ids) for _, ids in tokenized[n].docs)
            args = PplCell(method, n, docs, tokenized[n].skipped, chunk_size, model_name, data_name, seed, key)
            cells.append(Cell(key, f"ppl {method} @ {n}", len(docs), args))
    return run_cells("perplexity", cells, ppl_cell, results or ResultsFile(None), model=model, tokenizer=tokenizer,
                     pool=pool, progress=progress)


def ppl_cell(model, tokenizer, cell: PplCell, advance) -> dict:
    """The record of one (method, length) cell: every document scored in one pass (or chunked, or by windows)."""
    info = model_info(model)
    n, method = cell.length, cell.method
    nll_sum, count, total, tokens = torch.zeros(n - 1), 0, 0.0, 0
    with open_scorer(model, method) as scorer:
        method_config = scorer.method_config
        for ids in cell.docs:
            nll = scorer.nll(torch.tensor(ids), cell.chunk_size)
            nll_sum += nll
            count += 1
            total += nll.sum().item()
            tokens += len(nll)
            advance(1)
    mean = total / tokens
    metrics = {"ppl": round(math.exp(mean), 4), "nll": round(mean, 5), "tokens": tokens, "docs": count,
               "skipped": cell.skipped}
    return make_record("ppl", cell.key, model=cell.model_name, method=method, method_config=method_config,
                       data=cell.data_name, seed=cell.seed, metrics=metrics, length=n,
                       pretrain_length=info.pretrain_length, chunk_size=cell.chunk_size,
                       nll_by_position=bucketize(nll_sum, count))
