"""The fast Λ attention: O(n) time and memory, never a Tq x Tk tensor.

Queries are processed in blocks of `block` rows. For a block, the keys split into disjoint index ranges, each
attended with the fused kernel that also returns the log-sum-exp of its scores (`attend_with_lse`); the parts are
then merged exactly by their log-sum-exps (`merge_softmax_parts`):
- global candidates [0, G): every key index up to the last global key of any batch row (G = n_global without
  left padding). Scored by hand for all queries at once (Tq x G, tiny), with the distance limit.
- the band [max(G, first - n_local + 1), last]: the local window of the block (`band_pieces`). Without padding or
  per-head biases it splits into a thin masked strip, a part every query of the block sees (no mask) and the
  block's own keys (a causal square), so nearly all scores take the kernel's unmasked fast path; otherwise the band
  is one range with an explicit (Bq x band) mask.
Band index ranges assume keys sorted by position with a contiguous tail (true for full caches and for the bounded
cache, which keeps the first G keys and a contiguous tail of the last n_local).
"""

from __future__ import annotations

import torch

from lengthwise.attention.middle import check_sequence, middle_part
from lengthwise.attention.pattern import (NO_MODS, AlibiEncoding, LambdaPattern, RopeEncoding, ScoreMods, expand_heads,
                                          visibility)
from lengthwise.attention.softmax import softmax_with_lse
from lengthwise.errors import UserError


def global_candidates(k_pos: torch.Tensor, k_valid: torch.Tensor | None, n_global: int) -> int:
    """Number G of leading key indices holding every global key (position < n_global) of every row."""
    is_global = k_pos < n_global
    if k_valid is not None:
        is_global = is_global & k_valid
    hits = is_global.any(0).nonzero()
    return int(hits[-1]) + 1 if len(hits) else 0


def _global_part(qb, pb, kg, vg, kg_anchor, kpos_g, kvalid_g, pattern, encoding, scale, mods: ScoreMods):
    """Scores of a query block against the G global candidates. Returns out (B, H, Bq, Dv) and lse (B, H, Bq)."""
    scores = (qb @ kg.transpose(-1, -2)).float() * scale  # (B, H, Bq, G); float32 like the fused kernel's lse
    visible, limited, d = visibility(pb, kpos_g, kvalid_g, pattern)  # (B, 1, Bq, G)
    if pattern.limit is not None:
        cap = pattern.cap(kpos_g)[:, None, None, :]
    if isinstance(encoding, RopeEncoding) and pattern.limit is not None:
        q_lim = encoding.limited_query(qb, pb, pattern)
        scores = torch.where(limited, (q_lim @ kg_anchor.transpose(-1, -2)).float() * scale, scores)
    scores = mods.capped(scores)
    if isinstance(encoding, AlibiEncoding):
        dist = d.to(scores.dtype)
        if pattern.limit is not None:
            dist = torch.where(limited, cap.to(scores.dtype), dist)
        scores = scores - encoding.slopes.to(scores)[None, :, None, None] * dist
    scores = scores.masked_fill(~visible, float("-inf"))
    probs, lse = softmax_with_lse(scores)  # lse (B, H, Bq); -inf where nothing is visible
    return probs.to(vg.dtype) @ vg, lse


def _band_mask(pb, kpos_band, kvalid_band, n_local, slopes, dtype):
    """Additive mask (B, 1 or H, Bq, band) of a query block against its band of keys: 0 visible, -inf hidden,
    minus slope * distance for ALiBi. The band holds no global keys, so the rule reduces to its local branch."""
    local_only = LambdaPattern(n_global=0, n_local=n_local, limit=None)
    visible, _, d = visibility(pb, kpos_band, kvalid_band, local_only)  # (B, 1, Bq, band)
    mask = torch.zeros(visible.shape, dtype=dtype, device=pb.device).masked_fill_(~visible, float("-inf"))
    if slopes is not None:
        mask = mask - slopes * d.to(dtype)
    return mask


FEW_QUERIES = 16  # up to this many queries (decoding), one explicit score matrix is cheapest


def attend_with_lse(q, k, v, scale: float, mask=None, causal: bool = False, softcap: float | None = None):
    """Softmax attention of q (B, H, Tq, D) over k (B, Hk, Tk, D), v (B, Hk, Tk, Dv) that also returns the
    log-sum-exp of the scores, so that attention over disjoint key sets can be merged exactly. mask: additive
    (B or 1, H or 1, Tq, Tk) or None; causal: square top-left causal; softcap: scores soft-capped before the mask.
    Returns out (B, H, Tq, Dv) and lse (B, H, Tq) in float32, -inf where a query sees no key (its out is 0)."""
    fused = softcap is None and v.shape[-1] == q.shape[-1]  # the fused kernel neither caps nor takes Dv != D
    if fused and q.device.type == "cpu" and q.shape[-2] > FEW_QUERIES:
        # PyTorch's fused CPU flash kernel (the one F.scaled_dot_product_attention runs) returns the lse as well.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, is_causal=causal, attn_mask=mask, scale=scale)
        if mask is not None:  # the kernel reports lse 0 for a query whose row is fully masked
            lse = lse.masked_fill(~torch.isfinite(mask).any(-1), float("-inf"))
        return out, lse
    # Explicit scores for this block only, so memory stays O(block x band): decoding steps (cheaper than the fused
    # kernel's set-up) and other devices.
    # Grouped-query heads side by side against their kv head, so no key is copied per query head.
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    scores = (q.reshape(B, Hk, -1, D) @ k.transpose(-1, -2)).float().reshape(B, H, Tq, Tk) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores[0, 0], dtype=torch.bool).triu(1), float("-inf"))
    probs, lse = softmax_with_lse(scores)
    out = probs.to(v.dtype).reshape(B, Hk, -1, Tk) @ v  # (B, Hk, H/Hk * Tq, Dv)
    return out.reshape(B, H, Tq, v.shape[-1]), lse


def merge_softmax_parts(parts):
    """Exact softmax over the union of disjoint key sets from [(out (B, H, Tq, D), lse (B, H, Tq)), ...]."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse for _, lse in parts])  # (P, B, H, Tq)
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total.nan_to_num(0.0, neginf=0.0)).nan_to_num(0.0)  # a query seeing nothing -> 0
    merged = parts[0][0] * weights[0, ..., None].to(parts[0][0].dtype)
    for (out, _), weight in zip(parts[1:], weights[1:]):
        merged = torch.addcmul(merged, out, weight[..., None].to(out.dtype))
    return merged


def band_pieces(first_query: int, last_query: int, G: int, n_local: int, contiguous: bool):
    """Key index ranges [(start, end, kind)] of the local band of queries with key indices [first, last], kind
    "causal" (the block's own keys, square), "full" (seen by every query of the block) or "masked". Without the
    split (`contiguous` False: padding or per-head biases), the whole band is one masked range."""
    b0, b1 = max(G, first_query - n_local + 1), last_query + 1
    if not contiguous or first_query < G or last_query - first_query >= n_local:
        pieces = [(b0, b1, "masked")]  # empty when all the queries are global keys themselves
    else:
        full0 = max(G, last_query + 1 - n_local)
        pieces = [(b0, full0, "masked"), (full0, first_query, "full"), (first_query, b1, "causal")]
    return [piece for piece in pieces if piece[1] > piece[0]]  # the fused kernel fails on empty inputs


def _windows(x: torch.Tensor, start: int, width: int, step: int, count: int) -> torch.Tensor:
    """x (1, H, T, D) -> a view (count, H, width, D) whose window i is x[:, :, start + i*step : ... + width]."""
    stride_h, stride_t, stride_d = x.stride()[1:]
    return x.as_strided((count, x.shape[1], width, x.shape[3]), (step * stride_t, stride_h, stride_t, stride_d),
                        x.storage_offset() + start * stride_t)


def _interior_band(q, k, v, q_start, key_start, count, block, n_local, scale, strip_mask, softcap):
    """Band parts of `count` consecutive full query blocks of one batch row (q (1, H, Tq, D), k/v (1, Hk, Tk, D))
    whose bands lie past the global keys, each kind in one batched kernel call over window views (no copies):
    the masked strip, the part every query of its block sees, and the block's own causal square."""
    qw = _windows(q, q_start, block, block, count)  # (count, H, block, D)
    pieces = [(key_start - n_local + 1, block - 1, strip_mask, False),  # (first key, width, mask, causal)
              (key_start + block - n_local, n_local - block, None, False),
              (key_start, block, None, True)]
    return [attend_with_lse(qw, _windows(k, k0, width, block, count), _windows(v, k0, width, block, count), scale,
                            mask, causal, softcap) for k0, width, mask, causal in pieces if width > 0]


def lambda_attention_blocked(q, k, v, q_pos, k_pos, k_valid, pattern: LambdaPattern, encoding, scale: float,
                             block: int = 256, run: int = 4, index=None, mods: ScoreMods = NO_MODS):
    """Same contract as `lambda_attention_reference`: q (B, H, Tq, D), k (B, Hk, Tk, D), v (B, Hk, Tk, Dv), q_pos
    (B, Tq), k_pos (B, Tk), k_valid (B, Tk) or None -> (B, H, Tq, Dv). Queries are the last Tq of the Tk keys.
    Up to `run` consecutive interior blocks share each batched kernel call. With `pattern.middle`, the middle keys'
    part (`lengthwise.attention.middle.middle_part`, block boxes kept in `index`) is merged into every block."""
    B, H, Tq, D = q.shape
    Dv = v.shape[-1]
    middle = None
    if pattern.middle is not None:
        if mods:
            raise UserError("middle retrieval does not apply soft-capping or sinks")
        check_sequence(k_pos, k_valid)
        middle = middle_part(q, k, v, q_pos, k_pos, pattern, encoding, scale, index)  # (B,H,Tq,D), (B,H,Tq)
    offset = k.shape[2] - Tq  # key index of query 0
    G = global_candidates(k_pos, k_valid, pattern.n_global)
    slopes = encoding.slopes.to(q)[None, :, None, None] if isinstance(encoding, AlibiEncoding) else None
    if G:  # global candidates (B, H, G, D); G ~ n_global is small
        kg, vg = expand_heads(k[:, :, :G], H), expand_heads(v[:, :, :G], H)
        kg_anchor = None
        if isinstance(encoding, RopeEncoding) and pattern.limit is not None:
            kg_anchor = encoding.anchored_key(kg, k_pos[:, :G], pattern)
        kvalid_g = None if k_valid is None else k_valid[:, :G]
    # Without padding or biases, keys from index G on sit at consecutive positions, so most of a block's band is
    # seen by all its queries (no mask) and its own keys form a causal square: only a thin strip needs a mask.
    contiguous = k_valid is None and slopes is None and block <= pattern.n_local and Tq > FEW_QUERIES
    strip_mask = _band_mask(torch.arange(block, device=q.device)[None],
                            torch.arange(1 - pattern.n_local, block - pattern.n_local, device=q.device)[None],
                            None, pattern.n_local, None, q.dtype) if contiguous else None  # (1, 1, block, block-1)
    out = q.new_empty(B, H, Tq, Dv)
    shared_masks = {}  # masked ranges of single blocks, keyed by (rows, start - first query, end - first query)
    qs = 0
    while qs < Tq:
        # Interior blocks: full size, band entirely past the global keys.
        first_interior = max(qs, G + pattern.n_local - 1 - offset)
        count = min(run, (Tq - qs) // block) if contiguous and first_interior == qs else 0
        qe = qs + (count * block if count else min(block, Tq - qs))
        # The global part per stretch too: its elementwise work (moving queries to the limit) stays in cache.
        global_part = None if not G else _global_part(q[:, :, qs:qe], q_pos[:, qs:qe], kg, vg, kg_anchor,
                                                      k_pos[:, :G], kvalid_g, pattern, encoding, scale, mods)
        if count:
            for row in range(B):
                parts = _interior_band(q[row:row + 1], k[row:row + 1], v[row:row + 1], qs, qs + offset, count, block,
                                       pattern.n_local, scale, strip_mask, mods.softcap)
                for part in (global_part, None if middle is None else (middle[0][:, :, qs:qe], middle[1][:, :, qs:qe])):
                    if part is not None:  # (H, count*block, ...) -> (count, H, block, ...) views
                        parts.append((part[0][row].view(H, count, block, Dv).transpose(0, 1),
                                      part[1][row].view(H, count, block).transpose(0, 1)))
                if mods.sinks is not None:
                    parts.append(mods.sink_part(parts[0][0]))
                _windows(out[row:row + 1], qs, block, block, count).copy_(merge_softmax_parts(parts))
        else:
            parts = [] if global_part is None else [global_part]
            if middle is not None:
                parts.append((middle[0][:, :, qs:qe], middle[1][:, :, qs:qe]))
            for k0, k1, kind in band_pieces(qs + offset, qe - 1 + offset, G, pattern.n_local, contiguous):
                mask = None
                if kind == "masked":
                    key = (qe - qs, k0 - qs - offset, k1 - qs - offset)
                    mask = shared_masks.get(key) if k_valid is None else None
                    if mask is None:
                        mask = _band_mask(q_pos[:, qs:qe], k_pos[:, k0:k1],
                                          None if k_valid is None else k_valid[:, k0:k1], pattern.n_local, slopes,
                                          q.dtype)
                        if k_valid is None:
                            shared_masks[key] = mask
                parts.append(attend_with_lse(q[:, :, qs:qe], k[:, :, k0:k1], v[:, :, k0:k1], scale, mask,
                                             causal=kind == "causal", softcap=mods.softcap))
            if parts and mods.sinks is not None:
                parts.append(mods.sink_part(parts[0][0]))
            out[:, :, qs:qe] = merge_softmax_parts(parts) if parts else 0.0
        qs = qe
    return out
