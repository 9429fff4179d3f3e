"""NLL by context-position bucket: how far into the document a scored token is."""

from __future__ import annotations

import torch

DEFAULT_EDGES = (0, 1024, 2048, 4096, 8192, 16384)


def bucket_label(lo: int, hi: int | None) -> str:
    def k(n: int) -> str:
        return f"{n // 1024}k" if n % 1024 == 0 and n else str(n)

    return f"{k(lo)}-{k(hi)}" if hi is not None else f"{k(lo)}+"


def bucket_start(label: str) -> int:
    """Lower edge (tokens) of a `bucket_label`: sorts labels read back from JSON (keys sorted as strings)."""
    head = label.split("-")[0].rstrip("+")
    return int(head[:-1]) * 1024 if head.endswith("k") else int(head)


def bucket_nll(nll: torch.Tensor, edges=DEFAULT_EDGES) -> dict[str, tuple[float, int]]:
    """(sum of NLL, count) per bucket. nll: (N-1,) for target positions 1..N-1 of one document.

    Sums and counts (not means) so documents can be pooled; the last bucket is open-ended.
    """
    positions = torch.arange(1, len(nll) + 1)
    out = {}
    bounds = list(edges) + [None]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mask = positions >= lo if hi is None else (positions >= lo) & (positions < hi)
        count = int(mask.sum())
        if count:
            out[bucket_label(lo, hi)] = (float(nll[mask].double().sum()), count)
    return out
