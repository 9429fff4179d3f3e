"""The Λ pattern as pure functions, and the dense eager reference (tests only: it builds Tq x Tk tensors).

A query at position m sees key n when 0 <= m - n and (n < n_global or m - n < n_local): the first `n_global` tokens
(the "global" or "sink" tokens) and the last `n_local` tokens (itself included). A layer with a sliding window of its
own (`window`) keeps it: it sees the keys of that rule that are also within m - n < window (Λ ∩ window).

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

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from lengthwise.rope.rotation import rotate, rotation_angles
from lengthwise.errors import UserError

if TYPE_CHECKING:  # the middle-retrieval config; its kernels import this module
    from lengthwise.attention.middle import MiddleRetrieval


@dataclass(frozen=True)
class LambdaPattern:
    n_global: int
    n_local: int
    limit: int | None  # None: no distance limit (global keys keep their true distance)
    key_anchor: str = "zero"  # "zero" (LM-Infinite) | "self" (StreamingLLM re-indexing)
    middle: MiddleRetrieval | None = None  # attention to some middle keys (`lengthwise.attention.middle`)
    window: int | None = None  # the layer's own sliding window (keys at distance >= window are never seen)

    def __post_init__(self) -> None:
        if self.key_anchor not in ("zero", "self"):
            raise UserError(f"key_anchor must be 'zero' or 'self', got {self.key_anchor!r}")
        if self.n_global < 0 or self.n_local < 1:
            raise UserError(f"need n_global >= 0 and n_local >= 1, got {self.n_global}, {self.n_local}")
        if self.window is not None and self.window < self.n_local:
            raise UserError(f"n_local ({self.n_local}) must not exceed the layer's window ({self.window}): build the "
                             f"pattern with `within_window`")
        middle = self.middle
        blocks_too_long = middle is not None and middle.top_blocks and middle.block_size > self.n_local
        if middle is not None and (self.key_anchor != "zero" or blocks_too_long):
            raise UserError("middle retrieval needs key_anchor 'zero' and block_size <= n_local (blocks that hold a "
                             f"middle key are then complete), got {self.key_anchor!r}, {middle.block_size}")

    def within_window(self, window: int | None) -> LambdaPattern:
        """This pattern on a layer whose own sliding window is `window` (None: a full-attention layer)."""
        if window is None:
            return self
        return replace(self, n_local=min(self.n_local, window), window=window)

    def cap(self, k_pos: torch.Tensor) -> torch.Tensor:
        """Largest distance a global key at `k_pos` may appear at (same shape as k_pos)."""
        assert self.limit is not None
        return self.limit - k_pos if self.key_anchor == "self" else torch.full_like(k_pos, self.limit)


@dataclass(frozen=True)
class RopeEncoding:
    """Keys and queries arrive rotated at their positions; moving them needs the current inverse frequencies."""

    inv_freq: torch.Tensor  # (rotary_dim/2,)
    style: str  # "half" | "interleaved"
    offset: int = 0  # first rotated dim of a head (0, or the unrotated part's width in multi-head latent attention)

    def rotate(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """x (..., T, D) rotated by `angles` (broadcastable to (..., T, rotary_dim/2))."""
        return rotate(x, angles, self.style, self.offset)

    def move(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, D) rotated at p -> rotated at p + shift; shift (B, T)."""
        angles = rotation_angles(shift, self.inv_freq.to(x.device))[:, None]  # (B, 1, T, d/2)
        return self.rotate(x, angles)

    def limited_query(self, q: torch.Tensor, q_pos: torch.Tensor, pattern: LambdaPattern) -> torch.Tensor:
        return self.move(q, pattern.limit - q_pos)

    def anchored_key(self, k: torch.Tensor, k_pos: torch.Tensor, pattern: LambdaPattern) -> torch.Tensor:
        return self.move(k, -k_pos) if pattern.key_anchor == "zero" else k


@dataclass(frozen=True)
class AlibiEncoding:
    slopes: torch.Tensor  # (H,) bias = -slope * distance


# A layer without position encoding (NoPE layers of SmolLM3, Llama 4, Cohere 2): encoding None; the rule still
# applies, the distance limit changes no score there.


@dataclass(frozen=True)
class ScoreMods:
    """What a model does to attention scores besides positions, applied by every kernel as the model applies it:
    logit soft-capping `softcap * tanh(score / softcap)` on the scaled scores (Gemma 2), and one sink logit per head
    that joins every softmax's denominator and carries no value (gpt-oss's `s_aux`)."""

    softcap: float | None = None
    sinks: torch.Tensor | None = None  # (H,)

    def __bool__(self) -> bool:
        return self.softcap is not None or self.sinks is not None

    def capped(self, scores: torch.Tensor) -> torch.Tensor:
        return scores if self.softcap is None else torch.tanh(scores / self.softcap) * self.softcap

    def sink_part(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sinks as one more part to merge with an output (..., H, Tq, D): zero output, log-sum-exp = sink."""
        lse = self.sinks.float().to(out.device)[:, None].expand(out.shape[:-1])  # (..., H, Tq)
        return torch.zeros_like(out), lse


NO_MODS = ScoreMods()


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
    if pattern.window is not None:
        visible = visible & (d < pattern.window)
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
