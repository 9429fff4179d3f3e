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
import torch.nn.functional as F

from lengthwise.api import patch
from lengthwise.data.corpus import Document, documents_of_length
from lengthwise.eval.cells import Cell, RayPool, run_cells
from lengthwise.eval.results import ResultsFile, cell_key, make_record
from lengthwise.models.families import model_info
from lengthwise.methods.baselines import resolve_sliding_window
from lengthwise.registry import get_method, parse_method_spec
from lengthwise.models.compat import cache_kwargs
from lengthwise.errors import UserError

NUM_BUCKETS = 32


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # logits: (T, V), targets: (T,) -> (T,) float32
    return F.cross_entropy(logits.float(), targets, reduction="none")


@torch.no_grad()
def nll_one_pass(model, ids: torch.Tensor, chunk_size: int | None = None, cache=None) -> torch.Tensor:
    """NLL of tokens 1..N-1 of `ids` (shape (N,)), one causal pass; chunked through `cache` when asked."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    if not chunk_size or chunk_size >= len(ids):
        logits = model(input_ids=ids[None], use_cache=False).logits[0]  # (N, V)
        return _token_nll(logits[:-1], ids[1:]).cpu()
    if cache is None:
        from transformers import DynamicCache  # noqa: PLC0415

        cache = DynamicCache(config=model.config)
    pieces = []
    for start in range(0, len(ids), chunk_size):
        chunk = ids[start : start + chunk_size]
        logits = model(input_ids=chunk[None], **cache_kwargs(model, cache), use_cache=True).logits[0]  # (C, V)
        targets = ids[start + 1 : start + 1 + len(chunk)]
        pieces.append(_token_nll(logits[: len(targets)], targets).cpu())
    return torch.cat(pieces)


@torch.no_grad()
def windows_nll(model, ids: torch.Tensor, ends: list[int], window: int, previous: int, offset: int = 0,
                logits_to_keep: int = 0) -> torch.Tensor:
    """One batch of sliding windows: the window ending at each of `ends` (ascending) scores the targets it adds
    after the one before it (the first after `previous`). ids[i] is position offset + i; `logits_to_keep` (where the
    model takes it): logits of the last positions only, enough for the targets a window adds."""
    rows = torch.stack([ids[end - window - offset : end - offset] for end in ends])  # (B, window)
    kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    logits = model(input_ids=rows, use_cache=False, **kwargs).logits  # (B, window or logits_to_keep, V)
    width, pieces = logits.shape[1], []
    for row, end in enumerate(ends):
        scored = end - previous
        targets = ids[end - scored - offset : end - offset]
        pieces.append(_token_nll(logits[row, width - scored - 1 : width - 1], targets))
        previous = end
    return torch.cat(pieces).cpu()


@torch.no_grad()
def nll_sliding_window(model, ids: torch.Tensor, window: int, stride: int, batch_size: int = 8) -> torch.Tensor:
    """NLL of tokens 1..N-1, each predicted from at least `window - stride` and at most `window - 1` earlier tokens.

    The first window scores its own positions (less context is all there is); each later window of `window`
    tokens ends `stride` tokens after the previous one and scores only the targets it adds.
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    n = len(ids)
    first = min(window, n)
    out = [_token_nll(model(input_ids=ids[None, :first], use_cache=False).logits[0, :-1], ids[1:first]).cpu()]
    ends = [min(e, n) for e in range(first + stride, n + stride, stride)]  # every end > first >= window
    for i in range(0, len(ends), batch_size):
        out.append(windows_nll(model, ids, ends[i : i + batch_size], window, ends[i - 1] if i else first))
    nll = torch.cat(out)
    assert len(nll) == n - 1, (len(nll), n)
    return nll


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
    nll_sum, count, total, tokens, handle = torch.zeros(n - 1), 0, 0.0, 0, None
    parts = parse_method_spec(method)
    scoring = get_method(parts[0][0]).role == "scoring"
    try:
        if scoring:
            setting = resolve_sliding_window(method, info.pretrain_length)
            window, stride, method_config = setting.window, setting.stride, setting.describe()
        else:
            handle = patch(model, method)
            method_config = handle.describe()
        for ids in cell.docs:
            ids = torch.tensor(ids)
            if scoring:
                nll = nll_sliding_window(model, ids, window, stride)
            else:
                cache = handle.new_cache() if cell.chunk_size else None
                nll = nll_one_pass(model, ids, cell.chunk_size, cache)
            nll_sum += nll
            count += 1
            total += nll.sum().item()
            tokens += len(nll)
            advance(1)
    finally:
        if handle is not None:
            handle.remove()
    mean = total / tokens
    metrics = {"ppl": round(math.exp(mean), 4), "nll": round(mean, 5), "tokens": tokens, "docs": count,
               "skipped": cell.skipped}
    return make_record("ppl", cell.key, model=cell.model_name, method=method, method_config=method_config,
                       data=cell.data_name, seed=cell.seed, metrics=metrics, length=n,
                       pretrain_length=info.pretrain_length, chunk_size=cell.chunk_size,
                       nll_by_position=bucketize(nll_sum, count))
