"""Softmax that also returns its log-sum-exp, so attention over disjoint key sets can be merged exactly."""

from __future__ import annotations

import torch


def softmax_with_lse(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (..., K) float32 -> probabilities (..., K) and log-sum-exp (...); a row with no finite score gets
    probabilities 0 and log-sum-exp -inf."""
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(0.0, neginf=0.0)[..., None]).nan_to_num(0.0)
    return probs, lse
