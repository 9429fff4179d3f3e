"""The eager reference of Λ attention (dense, O(n^2)): the scores every kernel must reproduce, and the attention
they give. Tests compare the blocked and flex kernels against it; the diagnostics read its scores."""

from __future__ import annotations

import torch

from lengthwise.attention.middle import check_sequence, middle_selection_reference
from lengthwise.attention.pattern import (NO_MODS, AlibiEncoding, LambdaPattern, RopeEncoding, ScoreMods,
                                          expand_heads, visibility)
from lengthwise.errors import UserError


def lambda_scores(q, k, q_pos, k_pos, k_valid, pattern: LambdaPattern, encoding, scale: float,
                  mods: ScoreMods = NO_MODS) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention logits Λ attention gives, as the dense reference computes them: q (B, H, Tq, D), k (B, Hk, Tk, D)
    -> scores (B, H, Tq, Tk) float32 (distance-limited where the rule says so, soft-capped, ALiBi-biased; middle keys
    at their fixed distance) and visible (B, 1 or H, Tq, Tk) bool. Call it on a block of queries to keep memory at
    block x Tk (the diagnostics do)."""
    heads = q.shape[1]
    kx = expand_heads(k, heads)
    scores = (q.float() @ kx.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    visible, limited, d = visibility(q_pos, k_pos, k_valid, pattern)
    if isinstance(encoding, RopeEncoding):
        if pattern.limit is not None:
            q_lim = encoding.limited_query(q, q_pos, pattern).float()
            k_anc = expand_heads(encoding.anchored_key(k, k_pos, pattern), heads).float()
            scores = torch.where(limited, (q_lim @ k_anc.transpose(-1, -2)) * scale, scores)
    scores = mods.capped(scores)
    if isinstance(encoding, AlibiEncoding):
        dist = d.float()
        if pattern.limit is not None:
            dist = torch.where(limited, pattern.cap(k_pos).float()[:, None, None, :], dist)
        scores = scores - encoding.slopes.float().to(q.device)[None, :, None, None] * dist
    if pattern.middle is not None:  # selected middle keys are seen, at the fixed distance
        if mods:
            raise UserError("middle retrieval does not apply soft-capping or sinks")
        check_sequence(k_pos, k_valid)
        middle_scores, selected = middle_selection_reference(q, k, q_pos, k_pos, pattern, encoding, scale)
        scores, visible = torch.where(selected, middle_scores, scores), visible | selected
    return scores, visible


def lambda_attention_reference(q, k, v, q_pos, k_pos, k_valid, pattern: LambdaPattern, encoding, scale: float,
                               mods: ScoreMods = NO_MODS):
    """Dense masked Λ attention. q (B, H, Tq, D), k (B, Hk, Tk, D), v (B, Hk, Tk, Dv), q_pos (B, Tq), k_pos (B, Tk)
    (long), k_valid (B, Tk) bool or None -> (B, H, Tq, Dv). encoding: RopeEncoding, AlibiEncoding or None (no
    position encoding). A query that sees no key (and no sink) gets 0."""
    scores, visible = lambda_scores(q, k, q_pos, k_pos, k_valid, pattern, encoding, scale, mods)
    scores = scores.masked_fill(~visible, float("-inf"))
    if mods.sinks is not None:  # one more logit per head in every row, whose value is zero
        sink = mods.sinks.float().to(q.device)[None, :, None, None].expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    if mods.sinks is not None:
        probs = probs[..., :-1]
    return (probs @ expand_heads(v, q.shape[1]).float()).to(q.dtype)
