"""Attention to the middle of the Λ: keys a query sees neither as a global nor as a local key.

Plain Λ attention drops the middle, so it cannot retrieve anything said there. Two ways to let a query take a few
middle keys back, both scoring them at one fixed `distance` (inside the training length) whatever their true
distance, like the distance limit does for global keys:

- top-k tokens (the official LM-Infinite code's `--top_k_attention`, Glaciohound/LM-Infinite `models/llama.py`,
  policy "top_agnostic" + "select_top_k"): each query and head adds the `top_k` middle keys with the highest score
  at that distance. The official code gives them to the last query of a forward call only, from layer
  `top_k_from_layer` on; here every query may (`queries="all"`), or only the last (`queries="last"`).
  Selecting needs every middle score: O(n) per query, O(n^2) per prefill, done in query groups (no n x n tensor).
- top blocks (after InfLLM, arXiv 2402.04617, which keeps the middle in blocks with a few representative keys):
  middle keys form fixed blocks of `block_size` positions after the global keys; each block keeps `representatives`
  bounding boxes (elementwise min and max of the anchored keys of `block_size / representatives` consecutive keys,
  the page summary of Quest, arXiv 2406.10774). A box scores q+ . max + q- . min, an upper bound of every key in it,
  so the block holding a query's best key ranks at least as high as that key. The queries of one group (positions
  sharing `position // query_group`) pick the `top_blocks` blocks whose best box any of them scores highest, and
  attend to those blocks' middle keys. Per query the cost is O(blocks x representatives) for scoring, plus
  top_blocks x block_size keys. With `order="kept"` (not in the paper) the selected blocks are not all read at one
  distance: laid end to end in text order, the last key of the nearest one at `distance`, every earlier key one
  further back, so the retrieved text keeps its word order (a passkey's digits with it).

Every middle key must stay in the KV cache of the layers that use this (their cache is no longer constant in the
context: O(n) keys per such layer, `lengthwise.attention.cache`); the other layers keep their bounded cache.
Keys must hold positions 0..n-1 in order (one sequence, no left padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lengthwise.attention.pattern import expand_heads, lambda_rule
from lengthwise.attention.softmax import softmax_with_lse
from lengthwise.rope.rotation import rotation_angles
from lengthwise.errors import UserError

QUERY_MODES = ("all", "last")
ORDER_MODES = ("none", "kept")  # blocks all at one distance, or laid end to end in text order (blocks only)
SCORE_BUDGET = 1 << 23  # scores held at once by a query group (32 MiB of float32)


@dataclass(frozen=True)
class MiddleRetrieval:
    distance: int  # every middle key is scored as if it sat at this distance
    top_k: int = 0  # middle tokens per query and head
    top_blocks: int = 0  # middle blocks per query group and head (instead of tokens)
    block_size: int = 128
    representatives: int = 4  # bounding boxes per block
    query_group: int = 64  # queries sharing one block selection
    queries: str = "all"  # "all" | "last" (the official code: the last query of each forward call)
    order: str = "none"  # "none" | "kept": the selected blocks end to end in text order, from `distance` back

    def __post_init__(self) -> None:  # messages name lm-infinite's options, which build this
        if (self.top_k > 0) == (self.top_blocks > 0):
            raise UserError(f"takes top_k (tokens) or top_blocks (blocks), exactly one of them above 0; got top_k="
                             f"{self.top_k}, top_blocks={self.top_blocks}")
        if self.block_size % self.representatives:
            raise UserError(f"retrieval_block ({self.block_size}) must be a multiple of representatives "
                             f"({self.representatives})")
        if self.queries not in QUERY_MODES:
            raise UserError(f"middle_queries must be one of {', '.join(QUERY_MODES)}, got {self.queries!r}")
        if self.order not in ORDER_MODES:
            raise UserError(f"middle_order must be one of {', '.join(ORDER_MODES)}, got {self.order!r}")
        if self.order == "kept" and not self.top_blocks:
            raise UserError("middle_order 'kept' lays whole blocks end to end: it needs top_blocks, not top_k")

    @property
    def farthest(self) -> int:
        """Largest distance a middle key is scored at."""
        return self.distance + (self.top_blocks * self.block_size - 1 if self.order == "kept" else 0)


def head_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Queries (B, H, T, D) -> (B, Hk, H/Hk * T, D): the query heads served by each kv head, side by side."""
    B, H, T, D = x.shape
    return x.reshape(B, kv_heads, H // kv_heads * T, D)


def fixed_distance_query(q: torch.Tensor, q_pos: torch.Tensor, distance: int, encoding) -> torch.Tensor:
    """q (B, H, T, D) rotated at q_pos (B, T) -> rotated at `distance`: its score with an anchored key (rotated at 0)
    is the score at that distance. ALiBi queries do not move (the bias is added by `fixed_distance_bias`)."""
    if not hasattr(encoding, "inv_freq"):
        return q
    return encoding.move(q, distance - q_pos)


def anchored(k: torch.Tensor, k_pos: torch.Tensor, encoding) -> torch.Tensor:
    """Keys (B, Hk, T, D) rotated at k_pos (B, T) or (B, Hk, T) -> rotated at 0."""
    if not hasattr(encoding, "inv_freq"):
        return k
    angles = rotation_angles(-k_pos, encoding.inv_freq.to(k.device))  # (B, [Hk,] T, d/2)
    return encoding.rotate(k, angles if k_pos.dim() == 3 else angles[:, None])


def fixed_distance_bias(encoding, distance: int, heads: int, device) -> torch.Tensor:
    """(1, H, 1, 1) ALiBi bias at the fixed distance, zeros for RoPE."""
    slopes = getattr(encoding, "slopes", None)
    if slopes is None:
        return torch.zeros(1, heads, 1, 1, device=device)
    return -slopes.float().to(device)[None, :, None, None] * distance


def kept_order_behind(valid_keys: torch.Tensor, size: int) -> torch.Tensor:
    """Extra distance of each key of the selected blocks laid end to end (order "kept"): valid_keys (B, H), the keys
    of the eligible blocks, which come first in text order -> (B, H, size) = valid_keys - 1 - j for the j-th key
    (negative for keys of blocks no query of the group may see, which are masked)."""
    return valid_keys[..., None] - 1 - torch.arange(size, device=valid_keys.device)


def alibi_key_bias(encoding, distance: torch.Tensor) -> torch.Tensor | float:
    """Bias of keys at per-key distances (B, H, N) -> (B, H, 1, N) for ALiBi, 0 for RoPE."""
    slopes = getattr(encoding, "slopes", None)
    if slopes is None:
        return 0.0
    return (-slopes.float().to(distance.device)[None, :, None] * distance)[:, :, None, :]


def check_sequence(k_pos: torch.Tensor, k_valid, method: str = "middle retrieval") -> None:
    """Middle retrieval indexes keys by position: they must be positions 0..n-1 of one unpadded sequence."""
    n = k_pos.shape[1]
    if k_valid is not None or int(k_pos[:, 0].max()) != 0 or int(k_pos[:, -1].min()) != n - 1:
        raise UserError(f"{method} needs the keys of positions 0..n-1 of unpadded sequences (batch rows without "
                         f"left padding, a cache that keeps every key); got key positions "
                         f"{k_pos[0, 0].item()}..{k_pos[0, -1].item()} for {n} keys"
                         f"{' with padding' if k_valid is not None else ''}")


def block_boxes(k_anchor: torch.Tensor, middle: MiddleRetrieval) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchored keys of whole blocks (B, Hk, nb * block_size, D) -> (lo, hi) (B, Hk, nb * representatives, D)."""
    B, Hk, T, D = k_anchor.shape
    boxes = k_anchor.reshape(B, Hk, T // middle.block_size * middle.representatives, -1, D)
    return boxes.amin(-2), boxes.amax(-2)


def box_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, representatives: int) -> torch.Tensor:
    """Upper bound of q . k over each block: q (B, Hk, N, D), boxes (B, Hk, nb * R, D) -> (B, Hk, N, nb)."""
    bound = q.clamp(min=0) @ hi.transpose(-1, -2) + q.clamp(max=0) @ lo.transpose(-1, -2)  # (B, Hk, N, nb * R)
    return bound.unflatten(-1, (-1, representatives)).amax(-1)


class BlockIndex:
    """Bounding boxes of the complete middle blocks of one layer's cache, extended as blocks fill (each block's
    keys are anchored and reduced once)."""

    def __init__(self) -> None:
        self.lo = self.hi = None  # (B, Hk, nb * R, D)
        self.blocks = 0

    def boxes(self, k, k_pos, n_global: int, middle: MiddleRetrieval, encoding, blocks: int):
        if blocks > self.blocks:
            start, end = n_global + self.blocks * middle.block_size, n_global + blocks * middle.block_size
            lo, hi = block_boxes(anchored(k[:, :, start:end], k_pos[:, start:end], encoding), middle)
            self.lo = lo if self.lo is None else torch.cat([self.lo, lo], dim=2)
            self.hi = hi if self.hi is None else torch.cat([self.hi, hi], dim=2)
            self.blocks = blocks
        R = middle.representatives
        return self.lo[:, :, :blocks * R], self.hi[:, :, :blocks * R]


def _attend_selected(qf, keys, values, key_pos, q_pos, n_local, scale, key_bias):
    """Softmax over the middle keys a query group selected. qf (B, H, g, D) at the fixed distance; keys/values
    (B, H, S, D), keys anchored (or moved back by their extra distance); key_pos (B, H, S); q_pos (B, g); key_bias
    broadcasts to (B, H, g, S). Keys inside a query's window or after it are masked. Returns out (B, H, g, D),
    lse (B, H, g)."""
    scores = (qf @ keys.transpose(-1, -2)).float() * scale + key_bias  # (B, H, g, S)
    scores = scores.masked_fill(q_pos[:, None, :, None] - key_pos[:, :, None] < n_local, float("-inf"))
    probs, lse = softmax_with_lse(scores)
    return probs.to(values.dtype) @ values, lse


def _gather_keys(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, Hk, T, D), index (B, H, N) of key indices per query head -> (B, H, N, D)."""
    B, Hk, T, D = x.shape
    H = index.shape[1]
    kv_head = torch.arange(H, device=x.device).div(H // Hk, rounding_mode="floor")[None, :, None]  # (1, H, 1)
    flat = (kv_head * T + index).reshape(B, -1, 1).expand(-1, -1, D)
    return x.reshape(B, Hk * T, D).gather(1, flat).reshape(B, H, -1, D)


def _top_k_group(qf, k_anchor, v, q_pos, n_global, n_local, middle, scale, bias):
    """Top-k tokens for a group of queries over the middle keys [n_global, n_global + Tm): the k best scores of
    each query and head enter the softmax as they are (masked ones are -inf), only their values are gathered."""
    B, H, g, D = qf.shape
    Hk, Tm = k_anchor.shape[1], k_anchor.shape[2]
    scores = (head_groups(qf, Hk) @ k_anchor.transpose(-1, -2)).float().reshape(B, H, g, Tm) * scale  # (B,H,g,Tm)
    key_pos = torch.arange(n_global, n_global + Tm, device=qf.device)
    scores = scores.masked_fill(q_pos[:, None, :, None] - key_pos < n_local, float("-inf"))
    top, index = scores.topk(min(middle.top_k, Tm), dim=-1)  # (B, H, g, k)
    probs, lse = softmax_with_lse(top + bias[..., None])
    values = _gather_keys(v[:, :, n_global:n_global + Tm], index.reshape(B, H, -1)).reshape(B, H, g, -1, D)
    return (probs.to(values.dtype)[..., None, :] @ values).squeeze(-2), lse


def _top_blocks_group(qf, k, v, q_pos, lo, hi, n_global, n_local, middle, encoding, scale, bias):
    """Top blocks for a group of queries that share a selection; lo/hi: boxes of the eligible blocks."""
    B, H, g, D = qf.shape
    Hk, S = k.shape[1], middle.block_size
    bound = box_scores(head_groups(qf, Hk), lo, hi, middle.representatives).reshape(B, H, g, -1)  # (B, H, g, nb)
    blocks = bound.shape[-1]
    # a block is eligible for a query when it holds one of its middle keys: its start is at least n_local back
    starts = n_global + S * torch.arange(blocks, device=qf.device)
    bound = bound.masked_fill(q_pos[:, None, :, None] - starts < n_local, float("-inf"))
    best = bound.amax(2)  # (B, H, nb)
    chosen = best.topk(min(middle.top_blocks, blocks), dim=-1).indices  # (B, H, nsel)
    if middle.order == "kept":  # text order; blocks no query of the group may see (-inf) are the latest, so last
        chosen = chosen.sort(-1).values
    index = (starts[chosen][..., None] + torch.arange(S, device=qf.device)).flatten(-2)  # (B, H, nsel * S)
    anchor_at, key_bias = index, bias[..., None]  # rotations undone to position 0; (1, H, 1, 1)
    if middle.order == "kept":
        n_valid = (best > float("-inf")).sum(-1).clamp(max=middle.top_blocks)  # (B, H)
        behind = kept_order_behind(n_valid * S, index.shape[-1])  # (B, H, nsel * S)
        anchor_at, key_bias = index + behind, alibi_key_bias(encoding, middle.distance + behind.float())
    keys = anchored(_gather_keys(k, index), anchor_at, encoding)  # (B, H, nsel * S, D)
    return _attend_selected(qf, keys, _gather_keys(v, index), index, q_pos, n_local, scale, key_bias)


def middle_part(q, k, v, q_pos, k_pos, pattern, encoding, scale: float, index: BlockIndex | None = None):
    """The middle keys' share of Λ attention, to merge with the Λ parts by log-sum-exp: q (B, H, Tq, D),
    k/v (B, Hk, Tk, D) with positions 0..Tk-1 -> out (B, H, Tq, D), lse (B, H, Tq) (-inf: no middle key)."""
    middle: MiddleRetrieval = pattern.middle
    B, H, Tq, D = q.shape
    out = q.new_zeros(B, H, Tq, D)
    lse = torch.full((B, H, Tq), float("-inf"), device=q.device)
    G, n_local = pattern.n_global, pattern.n_local
    first = Tq - 1 if middle.queries == "last" else 0
    q_last = int(q_pos[:, -1].max())
    middle_end = q_last - n_local + 1  # one past the last middle key of any query
    if middle_end <= G:
        return out, lse
    qf = fixed_distance_query(q[:, :, first:], q_pos[:, first:], middle.distance, encoding)  # (B, H, Tq', D)
    bias = fixed_distance_bias(encoding, middle.distance, H, q.device)[..., 0]  # (1, H, 1)
    if middle.top_k:
        k_anchor = anchored(k[:, :, G:middle_end], k_pos[:, G:middle_end], encoding)
        step = max(1, SCORE_BUDGET // (H * (middle_end - G)))
        bounds = range(0, Tq - first, step)
        groups = [(s, min(s + step, Tq - first)) for s in bounds]
    else:
        blocks = (middle_end - G + middle.block_size - 1) // middle.block_size  # the last may reach into windows
        blocks = min(blocks, (k.shape[2] - G) // middle.block_size)  # whole blocks only (always, when S <= n_local)
        if blocks <= 0:
            return out, lse
        lo, hi = (index or BlockIndex()).boxes(k, k_pos, G, middle, encoding, blocks)
        group_id = q_pos[0, first:].div(middle.query_group, rounding_mode="floor")
        cuts = [0] + (torch.nonzero(group_id[1:] != group_id[:-1]).flatten() + 1).tolist() + [Tq - first]
        groups = list(zip(cuts[:-1], cuts[1:]))
    for s, e in groups:
        qg, pg = qf[:, :, s:e], q_pos[:, first + s:first + e]
        if int(pg.max()) < G + n_local:  # no query of the group has a middle yet
            continue
        if middle.top_k:
            part = _top_k_group(qg, k_anchor, v, pg, G, n_local, middle, scale, bias)
        else:
            part = _top_blocks_group(qg, k, v, pg, lo, hi, G, n_local, middle, encoding, scale, bias)
        out[:, :, first + s:first + e], lse[:, :, first + s:first + e] = part
    return out, lse


def middle_selection_reference(q, k, q_pos, k_pos, pattern, encoding, scale: float):
    """Dense reference (tests only): the scores of every key at the fixed distance (B, H, Tq, Tk) and the boolean
    selection (B, H, Tq, Tk) of middle keys each query attends to."""
    middle: MiddleRetrieval = pattern.middle
    H, G, S = q.shape[1], pattern.n_global, middle.block_size
    qf = fixed_distance_query(q, q_pos, middle.distance, encoding).float()
    ka = expand_heads(anchored(k, k_pos, encoding), H).float()
    scores = (qf @ ka.transpose(-1, -2)) * scale + fixed_distance_bias(encoding, middle.distance, H, q.device)
    visible, _, d = lambda_rule(pattern, q_pos[:, None, :, None], k_pos[:, None, None, :])
    candidate = ((d >= 0) & ~visible).expand_as(scores).clone()  # (B, H, Tq, Tk)
    if middle.queries == "last":
        candidate[:, :, :-1] = False
    if middle.top_k:
        top = scores.masked_fill(~candidate, float("-inf")).topk(min(middle.top_k, k.shape[2]), dim=-1).indices
        return scores, torch.zeros_like(candidate).scatter_(-1, top, True) & candidate
    blocks = (k.shape[2] - G) // S
    key_block = (k_pos[:, None, None, :] - G).div(S, rounding_mode="floor")  # (B, 1, 1, Tk)
    in_blocks = (k_pos[:, None, None, :] >= G) & (key_block < blocks)
    candidate &= in_blocks
    lo, hi = block_boxes(ka[:, :, G:G + blocks * S], middle)  # (B, H, nb * R, D)
    bound = box_scores(qf, lo, hi, middle.representatives)  # (B, H, Tq, nb)
    eligible = torch.zeros_like(bound, dtype=torch.bool)
    for b in range(blocks):
        eligible[..., b] = candidate[..., G + b * S:G + (b + 1) * S].any(-1)
    bound = bound.masked_fill(~eligible, float("-inf"))
    selected = torch.zeros_like(candidate)
    group_id = q_pos.div(middle.query_group, rounding_mode="floor")  # (B, Tq)
    for gid in group_id[0].unique():
        rows = group_id[0] == gid
        if not eligible[:, :, rows].any():
            continue
        best = bound[:, :, rows].amax(2)  # (B, H, nb)
        chosen = best.topk(min(middle.top_blocks, blocks), dim=-1).indices  # (B, H, nsel)
        picked = torch.zeros(best.shape, dtype=torch.bool, device=q.device).scatter_(-1, chosen, True)
        key_block_h = key_block.clamp(0, blocks - 1)[:, 0, 0][:, None].expand(-1, H, -1)  # (B, H, Tk)
        key_picked = picked.gather(-1, key_block_h)
        selected[:, :, rows] = candidate[:, :, rows] & key_picked[:, :, None] & in_blocks
        if middle.order == "kept":  # each key further back by the selected keys after it (eligible blocks only)
            valid = (picked & (best > float("-inf"))).long()  # (B, H, nb)
            after = valid.flip(-1).cumsum(-1).flip(-1) - valid  # valid picked blocks later in the text
            offset = (k_pos[:, None, :] - G).remainder(S)  # (B, 1, Tk)
            behind = after.gather(-1, key_block_h) * S + S - 1 - offset  # (B, H, Tk)
            moved = anchored(ka, behind, encoding)  # (B, H, Tk, D)
            scores[:, :, rows] = (qf[:, :, rows] @ moved.transpose(-1, -2)) * scale \
                + alibi_key_bias(encoding, middle.distance + behind.float())
    return scores, selected
