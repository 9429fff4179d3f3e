"""The fast Λ attention: O(n) time and memory, never a Tq x Tk tensor.

Queries are processed in blocks of `block` rows. For a block, the keys split in two disjoint index ranges:
- global candidates [0, G): every key index up to the last global key of any batch row (G = n_global without
  left padding). Scored by hand (Bq x G, tiny), with the distance limit; gives a per-query log-sum-exp and output.
- the band [max(G, first - n_local + 1), last]: the local window of the block, scored by one fused
  `scaled_dot_product_attention` call with a (Bq x band) mask.
The two softmax pieces are merged exactly through one extra "sentinel" key in the SDPA call: head dim D+1, the
query's extra coordinate is lse_global / scale and the sentinel key is (0, ..., 0, 1), so its score is lse_global;
its value is (0, ..., 0, 1), so the extra output coordinate is the weight the global part gets. The result is
  out = sdpa[..., :D] + sdpa[..., D:] * out_global.
Band index ranges assume keys sorted by position with a contiguous tail (true for full caches and for the bounded
cache, which keeps the first G keys and a contiguous tail of the last n_local).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lengthwise.attention.pattern import AlibiEncoding, LambdaPattern, RopeEncoding, expand_heads


def global_candidates(k_pos: torch.Tensor, k_valid: torch.Tensor | None, n_global: int) -> int:
    """Number G of leading key indices holding every global key (position < n_global) of every row."""
    is_global = k_pos < n_global
    if k_valid is not None:
        is_global = is_global & k_valid
    hits = is_global.any(0).nonzero()
    return int(hits[-1]) + 1 if len(hits) else 0


def _global_part(qb, pb, kg, vg, kg_anchor, kpos_g, kvalid_g, pattern, encoding, scale):
    """Scores of a query block against the G global candidates. Returns lse (B, H, Bq) and out (B, H, Bq, D)."""
    scores = (qb @ kg.transpose(-1, -2)) * scale  # (B, H, Bq, G)
    d = pb[:, None, :, None] - kpos_g[:, None, None, :]  # (B, 1, Bq, G)
    is_global = (kpos_g < pattern.n_global)[:, None, None, :]
    local = (d >= 0) & (d < pattern.n_local)
    visible = (d >= 0) & (local | is_global)
    if kvalid_g is not None:
        visible = visible & kvalid_g[:, None, None, :]
    if pattern.limit is not None:
        cap = pattern.cap(kpos_g)[:, None, None, :]
        limited = visible & is_global & ~local & (d > cap)
    if isinstance(encoding, RopeEncoding) and pattern.limit is not None:
        q_lim = encoding.limited_query(qb, pb, pattern)
        scores = torch.where(limited, (q_lim @ kg_anchor.transpose(-1, -2)) * scale, scores)
    elif isinstance(encoding, AlibiEncoding):
        dist = d.to(scores.dtype)
        if pattern.limit is not None:
            dist = torch.where(limited, cap.to(scores.dtype), dist)
        scores = scores - encoding.slopes.to(scores)[None, :, None, None] * dist
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Bq); -inf where nothing is visible
    probs = torch.exp(scores - lse.nan_to_num(0.0, neginf=0.0)[..., None]).nan_to_num(0.0)
    return lse, probs @ vg


def _band_mask(pb, kpos_band, kvalid_band, n_local, slopes, dtype):
    """Additive mask (B, 1 or H, Bq, band) of a query block against its band of keys: 0 visible, -inf hidden,
    minus slope * distance for ALiBi."""
    d = pb[:, None, :, None] - kpos_band[:, None, None, :]  # (B, 1, Bq, band)
    visible = (d >= 0) & (d < n_local)
    if kvalid_band is not None:
        visible = visible & kvalid_band[:, None, None, :]
    mask = torch.zeros(visible.shape, dtype=dtype, device=pb.device).masked_fill_(~visible, float("-inf"))
    if slopes is not None:
        mask = mask - slopes * d.to(dtype)
    return mask


NO_GLOBAL = -1e9  # score of the sentinel when a query sees no global key: exp() of it is exactly 0


def lambda_attention_blocked(q, k, v, q_pos, k_pos, k_valid, pattern: LambdaPattern, encoding, scale: float,
                             block: int = 256):
    """Same contract as `lambda_attention_reference`: q (B, H, Tq, D), k/v (B, Hk, Tk, D), q_pos (B, Tq),
    k_pos (B, Tk), k_valid (B, Tk) or None -> (B, H, Tq, D). Queries are the last Tq of the Tk keys."""
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    offset = Tk - Tq  # key index of query 0
    G = global_candidates(k_pos, k_valid, pattern.n_global)
    kg = expand_heads(k[:, :, :G], H)
    vg = expand_heads(v[:, :, :G], H)
    kg_anchor = None
    if G and isinstance(encoding, RopeEncoding) and pattern.limit is not None:
        kg_anchor = encoding.anchored_key(kg, k_pos[:, :G], pattern)
    slopes = encoding.slopes.to(q)[None, :, None, None] if isinstance(encoding, AlibiEncoding) else None
    # The global part for every query at once (B, H, Tq, G; G ~ n_global is small).
    if G:
        lse_g, out_g = _global_part(q, q_pos, kg, vg, kg_anchor, k_pos[:, :G],
                                    None if k_valid is None else k_valid[:, :G], pattern, encoding, scale)
    else:
        lse_g, out_g = torch.full((B, H, Tq), float("-inf"), dtype=q.dtype, device=q.device), None
    if Tq <= 16:  # decoding: a few queries, no point in building augmented copies of the cache
        return _small_query_path(q, k, v, q_pos, k_pos, k_valid, G, lse_g, out_g, pattern, slopes, scale, offset)
    # Query with its extra coordinate lse_global / scale (the sentinel key's score; NO_GLOBAL if it sees none).
    lse_safe = torch.where(torch.isfinite(lse_g), lse_g, torch.full_like(lse_g, NO_GLOBAL))
    q_aug = torch.cat([q, (lse_safe / scale)[..., None]], dim=-1)  # (B, H, Tq, D+1)
    # Keys/values with one extra coordinate (0) and one spare slot at the end. The sentinel (0, ..., 0, 1) is
    # written into the slot just after each block's band (and the real key put back afterwards), so every SDPA call
    # reads a view of this one tensor instead of a fresh concatenation.
    k_aug = F.pad(k, (0, 1, 0, 1))  # (B, Hk, Tk+1, D+1)
    v_aug = F.pad(v, (0, 1, 0, 1))
    sentinel = torch.zeros(D + 1, dtype=q.dtype, device=q.device)
    sentinel[D] = 1.0
    out = torch.empty_like(q)
    shared_mask = None  # the band mask of an interior block depends only on the block shape when no padding
    for qs in range(0, Tq, block):
        qe = min(qs + block, Tq)
        b0, b1 = max(G, qs + offset - pattern.n_local + 1), qe + offset
        interior = k_valid is None and b0 == qs + offset - pattern.n_local + 1 and qe - qs == block
        if interior and shared_mask is not None:
            mask = shared_mask
        else:
            mask = _band_mask(q_pos[:, qs:qe], k_pos[:, b0:b1], None if k_valid is None else k_valid[:, b0:b1],
                              pattern.n_local, slopes, q.dtype)
            mask = F.pad(mask, (0, 1))  # sentinel column: always visible (its score is NO_GLOBAL when unused)
            if k_valid is not None:  # a query with no visible key (a pad) attends the sentinel alone -> output 0
                empty = ~torch.isfinite(mask[..., :-1]).any(-1) & ~torch.isfinite(lse_g[:, :1, qs:qe])
                mask[..., -1] = mask[..., -1].masked_fill(empty, 0.0)
            if interior:
                shared_mask = mask
        saved_k, saved_v = k_aug[:, :, b1].clone(), v_aug[:, :, b1].clone()
        k_aug[:, :, b1], v_aug[:, :, b1] = sentinel, sentinel
        o = F.scaled_dot_product_attention(q_aug[:, :, qs:qe], k_aug[:, :, b0 : b1 + 1], v_aug[:, :, b0 : b1 + 1],
                                           attn_mask=mask, scale=scale, enable_gqa=Hk != H)
        k_aug[:, :, b1], v_aug[:, :, b1] = saved_k, saved_v
        if out_g is None:
            out[:, :, qs:qe] = o[..., :D]
        else:
            out[:, :, qs:qe] = torch.addcmul(o[..., :D], o[..., D:], out_g[:, :, qs:qe])
    return out


def _small_query_path(q, k, v, q_pos, k_pos, k_valid, G, lse_g, out_g, pattern, slopes, scale, offset):
    """Few queries (decoding): plain scores against the band [b0, Tk), merged with the global part by lse."""
    H, Tq = q.shape[1], q.shape[2]
    b0 = max(G, offset - pattern.n_local + 1)
    kb, vb = expand_heads(k[:, :, b0:], H), expand_heads(v[:, :, b0:], H)
    scores = (q @ kb.transpose(-1, -2)) * scale  # (B, H, Tq, band)
    scores = scores + _band_mask(q_pos, k_pos[:, b0:], None if k_valid is None else k_valid[:, b0:],
                                 pattern.n_local, slopes, q.dtype)
    lse_b = torch.logsumexp(scores, dim=-1)  # (B, H, Tq)
    lse = torch.logaddexp(lse_b, lse_g)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None]
    out = torch.exp(scores - lse_safe).nan_to_num(0.0) @ vb
    if out_g is not None:
        out = out + torch.exp(lse_g - lse_safe[..., 0]).nan_to_num(0.0)[..., None] * out_g
    return out
