"""The Λ pattern as pure functions, and the dense eager reference (tests only: it builds Tq x Tk tensors).

A query at position m sees key n when 0 <= m - n and (n < n_global or m - n < n_local): the first `n_global` tokens
(the "global" or "sink" tokens) and the last `n_local` tokens (itself included).

Distance limit. A global key outside the local window is scored as if it sat at distance min(d, cap_n):
- LM-Infinite (key_anchor "zero"): cap_n = limit = L_pretrain, the same for every global key.
- StreamingLLM (key_anchor "self"): the cache re-indexes positions, so sink n sits at cache slot n and the query at
  slot n_global + n_local - 1 once the cache is full: cap_n = limit - n with limit = n_global + n_local - 1.
Local keys keep their true distance (contiguous, < n_local, inside the training length).

For RoPE the capped score is exact through the group action of rotations: the query (rotated at m) is moved to
position `limit`, the key (rotated at n) to position 0 ("zero") or left where it is ("self"), so their dot product is
the score at distance limit - 0 or limit - n. For ALiBi the bias is -slope * min(d, cap_n).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lengthwise.attention.middle import MiddleRetrieval, check_sequence, middle_selection_reference
from lengthwise.rope.rotation import rotate, rotation_angles


@dataclass(frozen=True)
class LambdaPattern:
    n_global: int
    n_local: int
    limit: int | None  # None: no distance limit (global keys keep their true distance)
    key_anchor: str = "zero"  # "zero" (LM-Infinite) | "self" (StreamingLLM re-indexing)
    middle: MiddleRetrieval | None = None  # attention to some middle keys (`lengthwise.attention.middle`)

    def __post_init__(self) -> None:
        if self.key_anchor not in ("zero", "self"):
            raise ValueError(f"key_anchor must be 'zero' or 'self', got {self.key_anchor!r}")
        if self.n_global < 0 or self.n_local < 1:
            raise ValueError(f"need n_global >= 0 and n_local >= 1, got {self.n_global}, {self.n_local}")
        middle = self.middle
        blocks_too_long = middle is not None and middle.top_blocks and middle.block_size > self.n_local
        if middle is not None and (self.key_anchor != "zero" or blocks_too_long):
            raise ValueError("middle retrieval needs key_anchor 'zero' and block_size <= n_local (blocks that hold a "
                             f"middle key are then complete), got {self.key_anchor!r}, {middle.block_size}")

    def cap(self, k_pos: torch.Tensor) -> torch.Tensor:
        """Largest distance a global key at `k_pos` may appear at (same shape as k_pos)."""
        assert self.limit is not None
        return self.limit - k_pos if self.key_anchor == "self" else torch.full_like(k_pos, self.limit)


@dataclass(frozen=True)
class RopeEncoding:
    """Keys and queries arrive rotated at their positions; moving them needs the current inverse frequencies."""

    inv_freq: torch.Tensor  # (rotary_dim/2,)
    style: str  # "half" | "interleaved"

    def move(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, D) rotated at p -> rotated at p + shift; shift (B, T)."""
        angles = rotation_angles(shift, self.inv_freq.to(x.device))[:, None]  # (B, 1, T, d/2)
        return rotate(x, angles, self.style)

    def limited_query(self, q: torch.Tensor, q_pos: torch.Tensor, pattern: LambdaPattern) -> torch.Tensor:
        return self.move(q, pattern.limit - q_pos)

    def anchored_key(self, k: torch.Tensor, k_pos: torch.Tensor, pattern: LambdaPattern) -> torch.Tensor:
        return self.move(k, -k_pos) if pattern.key_anchor == "zero" else k


@dataclass(frozen=True)
class AlibiEncoding:
    slopes: torch.Tensor  # (H,) bias = -slope * distance


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hk, T, D) -> (B, heads, T, D) for grouped-query attention (each kv head serves heads/Hk query heads)."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def lambda_rule(pattern: LambdaPattern, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """The Λ visibility rule, written once: q_pos and k_pos broadcastable position tensors (e.g. (B, 1, Tq, 1) and
    (B, 1, 1, Tk)) -> visible, limited (a global key outside the window, beyond its cap: scored at the capped
    distance) and the distances d = q - k. Every kernel and mask derives from it (see `mask_mod`)."""
    d = q_pos - k_pos
    is_global = (k_pos >= 0) & (k_pos < pattern.n_global)  # relative positions (< 0) in band masks are never global
    local = (d >= 0) & (d < pattern.n_local)
    visible = (d >= 0) & (local | is_global)
    if pattern.limit is None:
        limited = torch.zeros_like(visible)
    else:
        limited = visible & is_global & ~local & (d > pattern.cap(k_pos))
    return visible, limited, d


def mask_mod(pattern: LambdaPattern):
    """The rule as a mask function (b, h, q_idx, kv_idx) -> bool, in the style of transformers' masking_utils and
    FlexAttention, for keys at positions 0..n-1 (a full cache)."""
    def visible(batch_idx, head_idx, q_idx, kv_idx):
        return lambda_rule(pattern, q_idx, kv_idx)[0]

    return visible


def visibility(q_pos, k_pos, k_valid, pattern: LambdaPattern):
    """Boolean (B, 1, Tq, Tk) masks: visible, limited (scored at the capped distance), and distances d."""
    visible, limited, d = lambda_rule(pattern, q_pos[:, None, :, None], k_pos[:, None, None, :])  # (B, 1, Tq, Tk)
    if k_valid is not None:
        visible = visible & k_valid[:, None, None, :]
        limited = limited & k_valid[:, None, None, :]
    return visible, limited, d


def lambda_attention_reference(q, k, v, q_pos, k_pos, k_valid, pattern: LambdaPattern, encoding, scale: float):
    """Dense masked Λ attention. q (B, H, Tq, D), k/v (B, Hk, Tk, D), q_pos (B, Tq), k_pos (B, Tk) (long),
    k_valid (B, Tk) bool or None -> (B, H, Tq, D). A query that sees no key gets 0."""
    heads = q.shape[1]
    kx, vx = expand_heads(k, heads), expand_heads(v, heads)
    scores = (q.float() @ kx.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    visible, limited, d = visibility(q_pos, k_pos, k_valid, pattern)
    if isinstance(encoding, RopeEncoding):
        if pattern.limit is not None:
            q_lim = encoding.limited_query(q, q_pos, pattern).float()
            k_anc = expand_heads(encoding.anchored_key(k, k_pos, pattern), heads).float()
            scores = torch.where(limited, (q_lim @ k_anc.transpose(-1, -2)) * scale, scores)
    elif isinstance(encoding, AlibiEncoding):
        dist = d.float()
        if pattern.limit is not None:
            dist = torch.where(limited, pattern.cap(k_pos).float()[:, None, None, :], dist)
        scores = scores - encoding.slopes.float().to(q.device)[None, :, None, None] * dist
    if pattern.middle is not None:  # selected middle keys are seen, at the fixed distance
        check_sequence(k_pos, k_valid)
        middle_scores, selected = middle_selection_reference(q, k, q_pos, k_pos, pattern, encoding, scale)
        scores, visible = torch.where(selected, middle_scores, scores), visible | selected
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    return (probs @ vx.float()).to(q.dtype)
