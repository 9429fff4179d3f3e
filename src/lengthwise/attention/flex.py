"""Λ attention through PyTorch's FlexAttention (`torch.nn.attention.flex_attention`, torch >= 2.5).

One flex_attention call over all the keys; nothing is merged afterwards:
- mask_mod: the Λ rule itself (`pattern.lambda_rule`) on the position tensors q_pos[b, q_idx], k_pos[b, kv_idx],
  and'ed with k_valid[b, kv_idx]. The BlockMask built from it lets the kernel skip every key block no query of a
  query block sees, so the kernel's work is O(n * (n_local + n_global)), like the blocked kernel's.
- score_mod: ALiBi's bias -slope[h] * distance, with the capped distance where the rule says "limited"; for RoPE the
  distance limit needs a differently rotated query, which a score_mod cannot apply, so the limited scores
  (queries x the G leading key indices that hold all global keys; G ~ n_global, tiny) are computed beforehand
  exactly as the reference does and the score_mod looks them up where the rule says "limited".
  (Splitting the limited part off and merging by log-sum-exp would need flex_attention's lse, which the compiled
  CPU kernel does not return: "torch.compile on CPU only supports inference and `return_lse` is not supported yet";
  eager flex does return it, in natural-log units, torch 2.13.)

Compiled or eager. Uncompiled flex_attention materializes the full Tq x Tk score matrix (PyTorch warns so); the fused
kernel comes from torch.compile (Triton on GPUs, a C++ template on CPUs, which needs a C++ compiler). `COMPILE`
chooses: None (default) compiles on a GPU, and on a CPU when a C++ compiler is on PATH, and falls back to eager flex
for the rest of the process, with one warning, if compiling fails; False: eager flex; True: compiled, errors raised.
The compiled function is built once (module level) with static shapes: torch 2.13's CPU template emits C++ that
does not build under dynamic shapes (`'cur_kvSplitSize7' was not declared in this scope`). To keep recompiles
few, the query and key lengths are padded to powers of two (`_bucket`): padded keys are invalid, padded queries see
nothing, so their blocks are skipped and only copies of q/k/v grow. Each new (pattern, B, H, Hk, D, buckets,
dtype) compiles once (5-20 s on 2 CPU cores; inductor keeps it on disk for later processes).
Gradients: FlexAttention has no backward on CPU ("FlexAttention does not support backward on CPU", eager and
compiled), so there a call that needs gradients runs `lambda_attention_reference` instead.

BlockMasks are built here in query chunks straight from the mask function (O(chunk x Tk) memory, never
B x Tq x Tk at once like `create_block_mask`) and cached for the last few (pattern, shapes, positions): the layers of
one forward pass share one. Building one evaluates the rule Tq x Tk times (one CPU thread: ~45 ms at 2048 x 2048,
~0.5-0.9 s at 8192 x 8192); a decoding step's is one row.

On a CPU (torch 2.13, one thread, 8 query / 2 kv heads, D 64, n_local 512) the compiled path (BlockMask cached) took
1.2-2.2x the blocked kernel's time at 2048 tokens and 1.3-2.6x at 8192 in one pass, 0.5-0.8x in a decoding step;
eager flex took 12-24x, slower than the dense reference. Flex is here for GPUs and as a second, independent kernel.
"""

from __future__ import annotations

import shutil
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F

from lengthwise.attention.blocked import global_candidates
from lengthwise.attention.pattern import (NO_MODS, AlibiEncoding, LambdaPattern, RopeEncoding, ScoreMods, expand_heads,
                                         lambda_rule)
from lengthwise.attention.reference import lambda_attention_reference

COMPILE: bool | None = None  # None: compile where it can (see the module docstring); False: eager flex; True: force
BUCKET_SHAPES: bool | None = None  # pad Tq/Tk to powers of two; None: only when compiled (static shapes)
DEFAULT_BLOCK = 128  # flex_attention's sparse block size
MASK_CHUNK_ELEMENTS = 1 << 22  # rule evaluations per chunk while building a BlockMask
_MASK_CACHE_SIZE = 4
RECOMPILE_LIMIT = 64  # compiled graphs of flex_attention kept (one per pattern and shape bucket)

_compiled = None  # torch.compile(flex_attention), built on first use
_compile_failed = False
_mask_cache: OrderedDict = OrderedDict()


def _flex_api():
    try:
        from torch.nn.attention import flex_attention as api
    except ImportError as error:  # torch < 2.5
        raise RuntimeError(f"FlexAttention needs torch >= 2.5 (torch.nn.attention.flex_attention); "
                           f"this torch is {torch.__version__}") from error
    return api


def _bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()  # 1, 2, 4, 8, ...


def _can_compile(q, k, v) -> bool:
    if COMPILE is not None:
        return COMPILE
    if _compile_failed:
        return False
    if q.device.type == "cpu":  # the C++ template needs a compiler (inductor's default: g++, else clang++)
        return any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))
    return q.device.type == "cuda"


def _compiled_flex():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_flex_api().flex_attention, dynamic=False)
    return _compiled


def _run_compiled(q, k, v, kwargs):
    """Compiled flex_attention, or None after it failed (a missing or broken tool chain) unless COMPILE is True:
    eager flex from then on, for the rest of the process."""
    global _compile_failed
    try:
        with _recompile_room():
            return _compiled_flex()(q, k, v, **kwargs)
    except Exception as error:
        if COMPILE:
            raise
        _compile_failed = True
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(f"compiled flex_attention failed, using eager flex from now on: {type(error).__name__}: "
                      f"{first_line}", RuntimeWarning)
        return None


def _recompile_room():
    """Room for one compiled graph per shape bucket and pattern: dynamo's default (8 per function) would fall back
    to eager flex after a few cache lengths of one generation."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(RECOMPILE_LIMIT, getattr(config, name))})


def _mask_function(pattern: LambdaPattern, q_pos, k_pos, k_valid, q_valid):
    """The mask_mod: the Λ rule on the positions of (batch row b, query q_idx, key kv_idx). Works on scalars (inside
    flex_attention) and on broadcastable index tensors (`_block_mask`)."""
    def visible(b, h, q_idx, kv_idx):
        seen, _, _ = lambda_rule(pattern, q_pos[b, q_idx], k_pos[b, kv_idx])
        return seen & k_valid[b, kv_idx] & q_valid[b, q_idx]

    return visible


def _block_mask(mask_fn, B, Tq, Tk, Tq_pad, Tk_pad, block, device):
    """BlockMask of the (B, 1, Tq_pad, Tk_pad) mask `mask_fn`, evaluated over the real [0, Tq) x [0, Tk) in chunks
    of batch rows and query blocks, about MASK_CHUNK_ELEMENTS at a time (everything padded is invisible)."""
    api = _flex_api()
    nq, nk = -(-Tq_pad // block), -(-Tk_pad // block)
    partial = torch.zeros(B, 1, nq, nk, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    kv = torch.arange(Tk, device=device)[None, None, :]
    batch_rows = max(1, MASK_CHUNK_ELEMENTS // (Tk * block))
    for b0 in range(0, B, batch_rows):
        b1 = min(B, b0 + batch_rows)
        b = torch.arange(b0, b1, device=device)[:, None, None]
        rows = max(1, MASK_CHUNK_ELEMENTS // ((b1 - b0) * Tk * block)) * block
        for q0 in range(0, Tq, rows):
            q1 = min(Tq, q0 + rows)
            seen = mask_fn(b, 0, torch.arange(q0, q1, device=device)[None, :, None], kv)  # (b1 - b0, q1 - q0, Tk)
            blocks_q = -(-(q1 - q0) // block)
            seen = F.pad(seen, (0, nk * block - Tk, 0, blocks_q * block - (q1 - q0)))
            seen = seen.view(b1 - b0, blocks_q, block, nk, block)
            i0 = q0 // block
            partial[b0:b1, 0, i0:i0 + blocks_q] = seen.any(4).any(2)
            full[b0:b1, 0, i0:i0 + blocks_q] = seen.all(4).all(2)
    partial &= ~full

    def ordered(dense):  # -> number of blocks per query block, their indices first (BlockMask's layout)
        dense = dense.to(torch.int32)
        indices = torch.argsort(dense, dim=-1, descending=True, stable=True)
        return dense.sum(-1).to(torch.int32).contiguous(), indices.to(torch.int32).contiguous()

    return api.BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block, mask_mod=mask_fn,
                                        seq_lengths=(Tq_pad, Tk_pad))


def _padded_positions(q_pos, k_pos, k_valid, Tq_pad, Tk_pad):
    B, Tq = q_pos.shape
    Tk = k_pos.shape[1]
    valid = torch.ones_like(k_pos, dtype=torch.bool) if k_valid is None else k_valid.to(torch.bool)
    q_valid = torch.ones(B, Tq_pad, dtype=torch.bool, device=q_pos.device)
    q_valid[:, Tq:] = False
    return (F.pad(q_pos, (0, Tq_pad - Tq)), F.pad(k_pos, (0, Tk_pad - Tk)), F.pad(valid, (0, Tk_pad - Tk)), q_valid)


def _positions_and_mask(q_pos, k_pos, k_valid, pattern, Tq_pad, Tk_pad, block):
    """Padded position tensors and the BlockMask, cached for the last few calls with equal positions."""
    key = (pattern, tuple(q_pos.shape), tuple(k_pos.shape), Tq_pad, Tk_pad, block, q_pos.device,
           k_valid is None)
    entry = _mask_cache.get(key)
    if entry is not None:
        q_pos0, k_pos0, k_valid0, tensors, block_mask = entry
        if torch.equal(q_pos0, q_pos) and torch.equal(k_pos0, k_pos) and (
                k_valid is None or torch.equal(k_valid0, k_valid)):
            _mask_cache.move_to_end(key)
            return tensors, block_mask
    tensors = _padded_positions(q_pos, k_pos, k_valid, Tq_pad, Tk_pad)
    mask_fn = _mask_function(pattern, *tensors)
    block_mask = _block_mask(mask_fn, q_pos.shape[0], q_pos.shape[1], k_pos.shape[1], Tq_pad, Tk_pad, block,
                             q_pos.device)
    _mask_cache[key] = (q_pos.clone(), k_pos.clone(), None if k_valid is None else k_valid.clone(), tensors,
                        block_mask)
    _mask_cache.move_to_end(key)
    while len(_mask_cache) > _MASK_CACHE_SIZE:
        _mask_cache.popitem(last=False)
    return tensors, block_mask


def _limited_scores(q, k, q_pos, k_pos, k_valid, pattern, encoding, scale, Tq_pad):
    """RoPE with a distance limit: scores (B, H, Tq_pad, G_pad) in float32 of every query against the G leading key
    indices that hold all global keys, at the capped distance (query moved to the limit, key anchored), as the
    reference computes them. None when nothing can be limited."""
    G = global_candidates(k_pos, k_valid, pattern.n_global)
    if not G:
        return None
    H = q.shape[1]
    q_lim = encoding.limited_query(q, q_pos, pattern).float()
    k_anc = expand_heads(encoding.anchored_key(k[:, :, :G], k_pos[:, :G], pattern), H).float()
    scores = (q_lim @ k_anc.transpose(-1, -2)) * scale  # (B, H, Tq, G)
    return F.pad(scores, (0, _bucket(G) - G, 0, Tq_pad - q.shape[2]))


def _score_function(pattern, encoding, q_pos, k_pos, limited_scores, softcap: float | None):
    """The score_mod: RoPE's precomputed capped scores where limited, then the model's soft-capping, then ALiBi's
    bias at the (capped) distance. None when scores stay as they are."""
    alibi = isinstance(encoding, AlibiEncoding)
    if not alibi and limited_scores is None and softcap is None:
        return None
    slopes = encoding.slopes.to(q_pos.device, torch.float32) if alibi else None
    last_global = None if limited_scores is None else limited_scores.shape[-1] - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        key_pos = k_pos[b, kv_idx]
        _, limited, d = lambda_rule(pattern, q_pos[b, q_idx], key_pos)
        if limited_scores is not None:
            capped = limited_scores[b, h, q_idx, torch.clamp(kv_idx, max=last_global)]  # limited keys lie below G
            score = torch.where(limited, capped.to(score.dtype), score)
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        if alibi:
            if pattern.limit is not None:
                d = torch.where(limited, pattern.cap(key_pos), d)
            score = score - (slopes[h] * d.to(torch.float32)).to(score.dtype)
        return score

    return score_mod


def lambda_attention_flex(q, k, v, q_pos, k_pos, k_valid, pattern: LambdaPattern, encoding, scale: float,
                          block: int | None = None, mods: ScoreMods = NO_MODS):
    """Same contract as `lambda_attention_reference`: q (B, H, Tq, D), k/v (B, Hk, Tk, D) (Hk divides H),
    q_pos (B, Tq), k_pos (B, Tk) (long), k_valid (B, Tk) bool or None -> (B, H, Tq, D); a query that sees no key
    gets 0. `block`: the BlockMask's block size (default 128). Compiled where possible, else eager flex
    (O(Tq x Tk) memory); with gradients on CPU, the reference: see the module docstring. Soft-capping is a score_mod;
    patterns with attention to the middle (`pattern.middle`) and attention sinks are refused."""
    if encoding is not None and not isinstance(encoding, (RopeEncoding, AlibiEncoding)):
        raise TypeError(f"encoding must be RopeEncoding, AlibiEncoding or None, got {type(encoding).__name__}")
    if mods.sinks is not None:
        raise NotImplementedError("attention sinks (a logit per head in every softmax) have no flex path here; use "
                                  "impl 'blocked' or 'eager'")
    if getattr(pattern, "middle", None) is not None:
        raise NotImplementedError("attention to the middle (pattern.middle) has no flex path: its keys are chosen "
                                  "per query from the scores; use the blocked kernel or the reference")
    api = _flex_api()
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # "FlexAttention does not support backward on CPU" (torch 2.13, eager and compiled alike)
        return lambda_attention_reference(q, k, v, q_pos, k_pos, k_valid, pattern, encoding, scale, mods)
    block = block or DEFAULT_BLOCK
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    compiled = _can_compile(q, k, v)
    bucket = compiled if BUCKET_SHAPES is None else BUCKET_SHAPES
    Tq_pad, Tk_pad = (_bucket(Tq), _bucket(Tk)) if bucket else (Tq, Tk)
    (qp, kp, _, _), block_mask = _positions_and_mask(q_pos, k_pos, k_valid, pattern, Tq_pad, Tk_pad, block)
    limited_scores = None
    if isinstance(encoding, RopeEncoding) and pattern.limit is not None:
        limited_scores = _limited_scores(q, k, q_pos, k_pos, k_valid, pattern, encoding, scale, Tq_pad)
    score_mod = _score_function(pattern, encoding, qp, kp, limited_scores, mods.softcap)
    qx, kx, vx = (F.pad(x, (0, 0, 0, n - x.shape[2])) if n != x.shape[2] else x
                  for x, n in ((q, Tq_pad), (k, Tk_pad), (v, Tk_pad)))
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=H != Hk)
    out = _run_compiled(qx, kx, vx, kwargs) if compiled else None
    if out is None:
        with warnings.catch_warnings():  # eager flex warns that it is unfused; that is known here
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = api.flex_attention(qx, kx, vx, **kwargs)
    return out[:, :, :Tq] if Tq_pad != Tq else out
