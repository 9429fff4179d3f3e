"""Per-family attention forwards for models whose attention cannot be reached through `AttentionInterface`.

Bloom and MPT add their ALiBi bias inside the attention module; GPT-J (up to transformers 5.23) rotates inside it
with a fixed sin/cos table of `n_positions` rows (so it cannot even run past its training length). For these, the
module's `forward` is replaced (reversibly, on the instance) by one that computes q, k, v exactly as the original
does and calls `lengthwise.attention.hf.attend`. Outputs keep the original return shapes. From 5.24 GPT-J attends
through AttentionInterface and only its shared table is replaced (`gptj_rotary_from_formula`).
"""

from __future__ import annotations

import math
import types

import torch

from lengthwise.attention.alibi import alibi_slopes as paper_slopes
from lengthwise.attention.hf import attend
from lengthwise.models.compat import cache_from_kwargs, gptj_rotary_table
from lengthwise.models.rotary import rotary_layout
from lengthwise.rope.rotation import rotate, rotation_angles
from lengthwise.errors import UserError


def alibi_slopes(model) -> torch.Tensor:
    """Per-head ALiBi slopes (H,), as the model uses them (bias = -slope * distance), from the formulas rather than
    the families' private helpers. Bloom: the paper's geometric sequence 2^(-8k/H) (with its interleaving for head
    counts that are not powers of two). MPT: 2^(-k * alibi_bias_max / H') over the next power of two H', odd-indexed
    slopes first, as MPT's reference code orders them."""
    config = model.config
    if config.model_type == "bloom":
        return paper_slopes(config.n_head).float()
    if config.model_type == "mpt":
        heads, bias_max = config.n_heads, config.attn_config.alibi_bias_max
        padded = 2 ** math.ceil(math.log2(heads))
        slopes = 1.0 / torch.pow(2.0, torch.arange(1, padded + 1, dtype=torch.float32) * (bias_max / padded))
        if padded != heads:
            slopes = torch.cat([slopes[1::2], slopes[::2]])[:heads]
        return slopes
    raise UserError(f"no ALiBi slopes for model type {config.model_type!r}; accepted: bloom, mpt")


def _positions(mask2d, past_seen: int, length: int, device) -> torch.Tensor:
    """Positions (B or 1, T) of the new tokens: counted over real tokens when a padding mask covering every token
    seen so far is given (a bounded cache keeps fewer keys than were seen, so a shorter mask says nothing)."""
    if mask2d is not None and mask2d.ndim == 2 and mask2d.shape[1] == past_seen + length:
        return (mask2d.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    return (torch.arange(length, device=device) + past_seen)[None]


def _mask2d(mask):
    return mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None


def _layer_cache(module, kwargs: dict):
    """The KV cache this layer call received, under whichever keyword the release uses."""
    state = module.__dict__["_lengthwise_lambda"]
    return cache_from_kwargs(kwargs, state.method, state.model_type)


def _cache_and_attend(module, query, key, value, cache, attention_mask, scale) -> torch.Tensor:
    """ALiBi families: append the new keys to the cache, then Λ attention. q/k/v (B, H, T, D) -> context (B, H, T, D)."""
    T = query.shape[-2]
    past_seen = cache.get_seq_length(module.layer_idx) if cache is not None else 0
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx)
    mask2d = _mask2d(attention_mask)
    q_pos = _positions(mask2d, past_seen, T, query.device)
    state = module.__dict__["_lengthwise_lambda"]
    state.cache = cache
    return attend(state, module, query, key, value, mask2d, q_pos, scale)


def bloom_forward(self, hidden_states, residual, alibi, attention_mask, use_cache=False, output_attentions=False,
                  **kwargs):
    B, T, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # 3 x (B, H, T, D)
    context = _cache_and_attend(self, query, key, value, _layer_cache(self, kwargs), attention_mask,
                                self.inv_norm_factor)
    context = context.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
    output = residual + torch.nn.functional.dropout(self.dense(context), self.hidden_dropout, self.training)
    return output, None


def mpt_forward(self, hidden_states, position_bias=None, attention_mask=None, **kwargs):
    B, T, _ = hidden_states.shape
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (x.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=2))
    context = _cache_and_attend(self, query, key, value, _layer_cache(self, kwargs), attention_mask,
                                self.softmax_scale)
    context = context.transpose(1, 2).reshape(B, T, -1)
    return self.out_proj(context), None


def gptj_forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                 output_attentions=False, **kwargs):
    """Transformers <= 5.23 only (each GPT-J attention layer rotates with its own table)."""
    layer_past = _layer_cache(self, kwargs)
    B, T, _ = hidden_states.shape
    H, D = self.num_attention_heads, self.head_dim
    query, key, value = (proj(hidden_states).view(B, T, H, D).transpose(1, 2)
                         for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, D)
    state = self.__dict__["_lengthwise_lambda"]
    past_seen = layer_past.get_seq_length(self.layer_idx) if layer_past is not None else 0
    if position_ids is None:
        position_ids = _positions(_mask2d(attention_mask), past_seen, T, hidden_states.device)
    # Rotate from the formula (no table of n_positions rows): interleaved pairs, first rotary_dim dims.
    encoding = state.encoding_fn()
    angles = rotation_angles(position_ids, encoding.inv_freq)[:, None]  # (B, 1, T, rotary_dim/2)
    query, key = rotate(query, angles, "interleaved"), rotate(key, angles, "interleaved")
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    state.cache = layer_past
    context = attend(state, self, query.float(), key.float(), value.float(), _mask2d(attention_mask), position_ids,
                     D**-0.5).to(value.dtype)
    context = context.transpose(1, 2).reshape(B, T, H * D)
    return self.resid_dropout(self.out_proj(context)), None


def gptj_rotary_from_formula(model, undo) -> None:
    """Transformers >= 5.24: GPT-J's shared rotary module looks sin/cos up in a table of n_positions rows (an
    IndexError past the training length); compute them from the formula for any position instead, reversibly."""
    layout = rotary_layout(model)

    def forward(x: torch.Tensor, position_ids: torch.Tensor):
        angles = rotation_angles(position_ids, layout.inv_freq)  # (B, T, rotary_dim/2)
        return angles.sin().to(x.dtype), angles.cos().to(x.dtype)

    undo.shadow(gptj_rotary_table(model), "forward", forward)


FORWARDS = {"bloom": bloom_forward, "mpt": mpt_forward, "gptj": gptj_forward}
ATTENTION_CLASSES = {"bloom": "BloomAttention", "mpt": "MptAttention", "gptj": "GPTJAttention"}


def adapter_attention_modules(model) -> list:
    """The attention modules of an adapter family (one per layer, each with its `layer_idx`)."""
    name = ATTENTION_CLASSES[model.config.model_type]
    found = [m for m in model.modules() if type(m).__name__ == name and hasattr(m, "layer_idx")]
    if not found:
        raise UserError(f"found no {name} modules with a layer_idx in {type(model).__name__}")
    return found


def replace_attention_forward(model, undo) -> None:
    """Swap in the family's Λ forward on every attention module (modules must already carry their state)."""
    forward = FORWARDS[model.config.model_type]
    for module in adapter_attention_modules(model):
        undo.shadow(module, "forward", types.MethodType(forward, module))

