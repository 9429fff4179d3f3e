"""Decoding with a static Λ cache: fixed shapes, written in place, positions as tensors, compilable with torch.compile.

The bounded cache of `lengthwise.attention.cache` serves every model and every call shape; its buffers change
length while it fills and compacts, and each step checks positions on the host. Decoding one token at a time needs
less: each layer holds exactly `n_global + n_local` slots. The key at position p goes to slot p while p < n_global
(a global key, kept for good), else to slot n_global + (p - n_global) mod n_local, where it replaces the key at
position p - n_local, the one that has just left the local window. One positions tensor (S,) says which position
each slot holds (-1: empty); visibility and the distance limit follow from it by the same rule as
`lengthwise.attention.pattern.lambda_rule`. Until the ring wraps, the keys fill slots 0, 1, 2, ... in order, so a
step attends to the first `span` slots only, `span` the smallest of a few fixed sizes that holds every filled slot
(`span_sizes`: S and the powers of two from S/2 down to 256, five at most; one compiled graph each): a short context
does not pay for the empty slots of a long window. Once the window is full (the context past S tokens), every step
has one shape, and its work and its host-side bookkeeping are constant in the context length.

`StaticDecoder(model, cache)` takes a model patched with `lm-infinite` and the `LambdaCache` of its prefill, copies
the keys a next query can see into the static buffers, and then decodes with a forward written out for the Llama
architecture (the decoder layers' own modules: norms, projections, rotary embedding, MLP). Other architectures, a
batch of more than one row, the middle-retrieval options, a layer's own sliding window and StreamingLLM's
re-indexed positions are refused by name. Never silently wrong: before the first token is returned, the step's
logits are compared with the eager transformers step on the same cache (`check=True`), and a disagreement raises.

The step reads its projection weights as stored by `weights` (WEIGHT_FORMATS): the model's own, or bfloat16,
float16 or int8 (one scale per output row) copies of a float32 model's, which a compiled step converts as it reads
them (half or a quarter of the bytes per token; the arithmetic stays float32). With copies the step computes a
different model from the one that prefilled the prompt; its check compares it with the model computing with the same
copies (`projections_as_stored`), and benchmarks/decode_weights.py measures what each format costs in PPL.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref

import torch

from lengthwise.attention.cache import LambdaCache
from lengthwise.attention.pattern import LambdaPattern, RopeEncoding
from lengthwise.errors import UserError
from lengthwise.models.compat import cache_kwargs

# The classes whose forward `StaticDecoder._step` writes out; any other is refused (its forward may differ).
LLAMA_CLASSES = {"model": "LlamaModel", "layer": "LlamaDecoderLayer", "attention": "LlamaAttention",
                 "mlp": "LlamaMLP", "norm": "LlamaRMSNorm"}


class StaticDecodeUnsupported(UserError):
    """The model, the patch or the cache is outside what the static decoding step computes exactly."""


class StaticDecodeMismatch(RuntimeError):
    """The static step's logits differ from the eager step's: a defect, or a model feature it does not see."""


def _check_model(model) -> None:
    inner = getattr(model, "model", None)
    found = type(inner).__name__
    if found != LLAMA_CLASSES["model"] or not hasattr(model, "lm_head"):
        raise StaticDecodeUnsupported(f"static decoding is written for the Llama architecture (LlamaForCausalLM: "
                                      f"SmolLM2, Llama 2/3, the bundled llama-rope-256); this model is "
                                      f"{type(model).__name__} ({found}): decode on the eager path")
    for layer in inner.layers:
        for part, module in (("layer", layer), ("attention", layer.self_attn), ("mlp", layer.mlp),
                             ("norm", layer.input_layernorm), ("norm", layer.post_attention_layernorm)):
            if type(module).__name__ != LLAMA_CLASSES[part]:
                raise StaticDecodeUnsupported(f"layer {layer.self_attn.layer_idx}: {type(module).__name__} where "
                                              f"static decoding expects {LLAMA_CLASSES[part]}")


def _layer_state(attention):
    state = attention.__dict__.get("_lengthwise_lambda")
    if state is None:
        raise StaticDecodeUnsupported("the model is not patched with lm-infinite (no Λ state on its attention "
                                      "layers): patch it first")
    pattern: LambdaPattern = state.pattern
    refusals = [(state.method != "lm-infinite", f"method {state.method!r} (only lm-infinite)"),
                (pattern.key_anchor != "zero", "re-indexed positions (key_anchor 'self')"),
                (pattern.middle is not None, "attention to middle keys (top_k / top_blocks)"),
                (pattern.window is not None, f"the layer's own sliding window ({pattern.window})")]
    reasons = [why for refused, why in refusals if refused]
    if reasons:
        raise StaticDecodeUnsupported(f"static decoding does not compute {', '.join(reasons)}: decode on the eager "
                                      f"path")
    encoding = state.encoding_fn()
    if encoding is not None and not isinstance(encoding, RopeEncoding):
        raise StaticDecodeUnsupported(f"static decoding applies RoPE or no position encoding, not "
                                      f"{type(encoding).__name__}")
    return pattern, encoding


def slot_of(position: torch.Tensor, n_global: int, n_local: int) -> torch.Tensor:
    """Slot of the key at `position` (any shape, long): itself below n_global, else a ring of n_local slots."""
    ring = n_global + torch.remainder(position - n_global, n_local)
    return torch.where(position < n_global, position, ring)


MIN_SPAN, MAX_SPANS = 256, 5  # the smallest span a step attends to, and how many span sizes (compiled graphs) at most


def span_sizes(slots: int) -> list[int]:
    """The spans a step may attend to over `slots` slots, ascending: slots itself and the powers of two up to half of
    it, down to MIN_SPAN, at most MAX_SPANS of them."""
    spans = [slots]
    power = 1 << (max(slots // 2, 1).bit_length() - 1)  # the largest power of two <= slots / 2
    while power >= MIN_SPAN and len(spans) < MAX_SPANS:
        spans.append(power)
        power //= 2
    return sorted(spans)


def span_for(position: int, slots: int, spans: list[int]) -> int:
    """The smallest span holding every slot filled once the key at `position` is written (slots fill in order until
    the ring wraps: positions 0..position sit at slots 0..position)."""
    filled = min(position + 1, slots)
    return next(span for span in spans if span >= filled)


def static_lambda_attention(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, slot_pos: torch.Tensor,
                            position: torch.Tensor, pattern: LambdaPattern, encoding: RopeEncoding | None,
                            scale: float) -> torch.Tensor:
    """Λ attention of one query: q (1, H, 1, D), keys_t (1, Hk, D, S) (the keys transposed: the query heads' product
    with them is a plain matrix product, faster on the CPU than one through a transposed view), values
    (1, Hk, S, D), S = n_global + n_local slots,
    slot_pos (S,) long (-1: empty), position () long -> (1, H, 1, D). The same rule and the same distance limit as
    `lambda_attention_blocked` (global keys beyond the limit scored at distance `limit`, by moving the query to
    `limit` and the key to 0); slots in any order (a softmax does not care)."""
    _, heads, _, dim = q.shape
    kv_heads, n_global = keys_t.shape[1], pattern.n_global
    grouped = q.reshape(1, kv_heads, heads // kv_heads, dim)  # query heads beside their kv head: no key copied
    scores = (grouped.to(keys_t.dtype) @ keys_t).float() * scale  # (1, Hk, H/Hk, S)
    d = position - slot_pos
    filled = slot_pos >= 0
    is_global = filled & (slot_pos < n_global)
    local = filled & (d >= 0) & (d < pattern.n_local)
    visible = local | (is_global & (d >= 0))
    if pattern.limit is not None and encoding is not None and n_global:
        limited = (is_global & ~local & (d > pattern.limit))[:n_global]
        q_lim = encoding.move(q, (pattern.limit - position).reshape(1, 1))
        k_anchor = encoding.move(keys_t[..., :n_global].transpose(-1, -2).to(q.dtype),
                                 -slot_pos[:n_global].clamp(min=0)[None])
        capped = (q_lim.reshape(grouped.shape) @ k_anchor.transpose(-1, -2)).float() * scale  # (1, Hk, H/Hk, G)
        scores = torch.cat([torch.where(limited, capped, scores[..., :n_global]), scores[..., n_global:]], dim=-1)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # the query always sees its own key: no empty row
    return (probs.to(values.dtype) @ values).to(q.dtype).reshape(1, heads, 1, values.shape[-1])


# The projections of a decoder layer, in the order `_layer_step` unpacks their stored weights.
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
# How the step stores the weights it reads (`stored_weight`); "model": the model's own.
WEIGHT_FORMATS = ("model", "bfloat16", "float16", "int8")
# How the static buffers hold the keys and values ("model": the model's type). float16 is not offered: the 2-core
# CPU of docs/speed.md has no float16 arithmetic, and torch's float16 product there is slower than float32.
KV_FORMATS = ("model", "bfloat16")


def check_weights(model, weights: str, kv: str = "model") -> None:
    """Refuse a weight or key/value format the step does not store for this model (one line)."""
    if weights not in WEIGHT_FORMATS:
        raise StaticDecodeUnsupported(f"decode weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if kv not in KV_FORMATS:
        raise StaticDecodeUnsupported(f"decode kv must be one of {', '.join(KV_FORMATS)}, got {kv!r}")
    dtype = next(model.parameters()).dtype
    if (weights != "model" or kv != "model") and dtype != torch.float32:
        raise StaticDecodeUnsupported(f"decode weights {weights!r} / kv {kv!r} store a float32 model's tensors; this "
                                      f"model is {dtype}: load it in float32, or decode with 'model'")


def stored_weight(linear: torch.nn.Linear, weights: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (N, K) a projection of the step reads, and its scale per output row (N,) or None.
    "model": the layer's own weight; "bfloat16" / "float16": a copy in that type, multiplied in the model's type
    (half the bytes to read); "int8": symmetric round-to-nearest, one scale per output row (max |w| / 127)."""
    if weights == "model":
        return linear.weight, None  # itself: the eager step then calls the module
    weight = linear.weight.detach()
    if weights in ("bfloat16", "float16"):
        return weight.to(getattr(torch, weights)), None
    scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(weight.dtype).tiny) / 127  # (N,)
    return torch.round(weight / scale[:, None]).to(torch.int8), scale


def dequantized(stored: tuple[torch.Tensor, torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in `dtype` that a stored weight stands for."""
    weight, scale = stored
    weight = weight.to(dtype)
    return weight if scale is None else weight * scale.to(dtype)[:, None]


def stored_projections(model, weights: str) -> dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor | None]]:
    """Every plain nn.Linear projection the step reads (the layers' PROJECTIONS and the vocabulary) -> its stored
    weight; a projection of another type (an adapter, a quantized layer) is absent: it runs its own forward."""
    modules = [layer.get_submodule(name) for layer in model.model.layers for name in PROJECTIONS]
    return {module: stored_weight(module, weights) for module in [*modules, model.lm_head]
            if type(module) is torch.nn.Linear}


@contextlib.contextmanager
def projections_as_stored(model, weights: str):
    """The model, inside the block, computes with the weights a static step stored as `weights` reads: each plain
    projection's output comes from its stored weight (forward hooks, removed on exit), for the eager check of a
    step and for the PPL of a weight format. The stored copies live for the block."""
    stored = stored_projections(model, weights) if weights != "model" else {}
    with _reading(stored):
        yield model


@contextlib.contextmanager
def _reading(stored: dict):
    """Forward hooks that replace each module's output by the product with its stored weight."""
    def hook(module, inputs, _output):
        return torch.nn.functional.linear(inputs[0], dequantized(stored[module], inputs[0].dtype), module.bias)

    handles = [module.register_forward_hook(hook) for module in stored]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def project(linear: torch.nn.Module, x: torch.Tensor, stored) -> torch.Tensor:
    """linear(x) of one token, x (1, 1, K) -> (1, 1, N), from the stored weight (`stored_weight`), as a product and
    a sum over K. Compiled, this is one fused pass over the weight at the memory's rate (on the 2-core CPU of
    docs/speed.md, faster than the library's matrix-vector product that F.linear reaches), converting a half or
    int8 weight as it reads it; eager, it would build the (N, K) product, so the eager step calls `_call`.
    stored None: a projection other than a plain nn.Linear (an adapter, a quantized layer) runs its own forward."""
    if stored is None:
        return linear(x)
    weight, scale = stored
    out = (x.unsqueeze(-2) * weight.to(x.dtype)).sum(-1)  # (1, 1, N, K) summed in one pass, never stored
    out = out if scale is None else out * scale
    return out if linear.bias is None else out + linear.bias


def _call(linear: torch.nn.Module, x: torch.Tensor, stored) -> torch.Tensor:
    """linear(x) of the eager static step: the module itself, or the product with the weight its stored copy
    stands for."""
    if stored is None or stored[0] is linear.weight:
        return linear(x)
    return torch.nn.functional.linear(x, dequantized(stored, x.dtype), linear.bias)


# One compiled region stamped out for every layer: compiled once, not once per layer (a first compiled step several
# times shorter on SmolLM2's 30 layers); torch before 2.8 lacks it and compiles every layer.
_once_per_layer = getattr(torch.compiler, "nested_compile_region", lambda fn: fn)


@_once_per_layer
def _layer_step(layer, hidden, keys_t, values, slot_pos, slot, position, cos, sin, span: int, pattern: LambdaPattern,
                encoding, apply_rotary, proj, stored):
    """One decoder layer of the step: hidden (1, 1, hidden) -> (1, 1, hidden); writes its key and value at `slot`
    (keys_t (1, Hk, D, S), values (1, Hk, S, D)); `stored`: the weights of its PROJECTIONS (`stored_weight`)."""
    q_w, k_w, v_w, o_w, gate_w, up_w, down_w = stored
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    shape = (1, 1, -1, attention.head_dim)
    q = proj(attention.q_proj, normed, q_w).view(shape).transpose(1, 2)  # (1, H, 1, D)
    k = proj(attention.k_proj, normed, k_w).view(shape).transpose(1, 2)  # (1, Hk, 1, D)
    v = proj(attention.v_proj, normed, v_w).view(shape).transpose(1, 2)
    q, k = apply_rotary(q, k, cos, sin)
    keys_t.index_copy_(3, slot, k.transpose(-1, -2).to(keys_t.dtype))
    values.index_copy_(2, slot, v.to(values.dtype))
    out = static_lambda_attention(q, keys_t[..., :span], values[:, :, :span], slot_pos[:span], position, pattern,
                                  encoding, attention.scaling)
    hidden = hidden + proj(attention.o_proj, out.transpose(1, 2).reshape(1, 1, -1), o_w)
    mlp, normed = layer.mlp, layer.post_attention_layernorm(hidden)
    gated = mlp.act_fn(proj(mlp.gate_proj, normed, gate_w)) * proj(mlp.up_proj, normed, up_w)
    return hidden + proj(mlp.down_proj, gated, down_w)


class StaticDecoder:
    """Greedy-ready decoding steps of a Llama model patched with lm-infinite, on a static Λ cache.

    decoder = StaticDecoder(model, cache)   # cache: the LambdaCache of the prefill (handle.new_cache())
    logits = decoder.step(token)            # token (1, 1) long at the next position -> logits (1, V)

    compile: run the step through torch.compile (fullgraph); where compilation fails, the same step runs eagerly, with
    a warning, and `mode` says which ran ("compiled" or "static-eager"). weights: how the step stores the projection
    weights it reads (WEIGHT_FORMATS, `stored_weight`): "model" reads the model's own; "bfloat16", "float16" and
    "int8" (a float32 model only) read a copy in that format, made when a cache is loaded, beside the model's
    weights, which stay as they are (the prefill uses them); a different model from its own, so its logits are
    compared with the model computing with those copies (`projections_as_stored`). kv: how the static buffers hold
    the keys and values (KV_FORMATS): "model", or "bfloat16" (half the bytes; the products with queries and
    probabilities run in bfloat16 with float32 scores and softmax, so the check's default tolerance is the one of a
    half-precision model). check: the first step also runs on the eager transformers path over `cache` (which that
    spends) and must give the same next token and logits within `tolerance` (relative to the largest logit), else
    StaticDecodeMismatch.
    """

    def __init__(self, model, cache: LambdaCache | None = None, *, compile: bool = False, check: bool = True,
                 tolerance: float | None = None, weights: str = "model", kv: str = "model") -> None:
        _check_model(model)
        check_weights(model, weights, kv)
        dtype = next(model.parameters()).dtype
        self.model, self.weights, self.kv = model, weights, kv
        self.stored: dict | None = None  # module -> stored weight, made by `load`
        self.layers = list(model.model.layers)
        self.states = [_layer_state(layer.self_attn) for layer in self.layers]
        patterns = {(p.n_global, p.n_local, p.limit) for p, _ in self.states}
        if len(patterns) != 1:
            raise StaticDecodeUnsupported(f"static decoding needs one Λ pattern for every layer, got "
                                          f"{sorted(patterns)}")
        self.pattern = self.states[0][0]
        self.apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.keys: list[torch.Tensor] = []  # per layer (1, Hk, D, S): transposed for the step's product
        self.values: list[torch.Tensor] = []
        self.mode = "compiled" if compile else "static-eager"
        self.spans: list[int] = []  # span_sizes of the slots, set by `load`
        self._run = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        exact = dtype == torch.float32 and kv == "model"
        self.tolerance = tolerance if tolerance is not None else (1e-3 if exact else 5e-2)
        self.check = check
        self.check_gap: float | None = None
        if cache is not None:
            self.load(cache)

    def key(self) -> tuple:
        """What a later patch must match for this decoder (and its compiled step) to serve it."""
        freqs = tuple(None if e is None else (e.style, e.offset, tuple(e.inv_freq.tolist())) for _, e in self.states)
        return self.pattern, freqs, next(self.model.parameters()).dtype, self.mode, self.weights, self.kv

    def load(self, cache: LambdaCache) -> StaticDecoder:
        """Copy the keys the next query can see (global ones and the last n_local) of a prefill's cache into the
        static buffers, in place (a compiled step stays valid); `cache` is kept for the check of the next step."""
        if not isinstance(cache, LambdaCache):
            raise StaticDecodeUnsupported(f"static decoding starts from the method's LambdaCache, got "
                                          f"{type(cache).__name__}")
        layers = cache.layers
        if len(layers) != len(self.layers) or any(not layer.is_initialized for layer in layers):
            raise StaticDecodeUnsupported("the cache has no prefill in it: feed the prompt through it first")
        first = layers[0]
        if first.keys.shape[0] != 1:
            raise StaticDecodeUnsupported(f"static decoding runs one sequence, got a batch of {first.keys.shape[0]}")
        n_global, n_local = self.pattern.n_global, self.pattern.n_local
        slots, seen = n_global + n_local, first.seen
        fresh = not self.keys
        if fresh:
            self.spans = span_sizes(slots)
            self.slot_pos = torch.full((slots,), -1, dtype=torch.long, device=first.keys.device)
            self.position = torch.tensor(seen, dtype=torch.long, device=first.keys.device)
        self.slot_pos.fill_(-1)
        self.position.fill_(seen)
        for index, layer in enumerate(layers):
            if layer.seen != seen or layer.positions is None or layer.positions.shape[1] != layer.keys.shape[-2]:
                raise StaticDecodeUnsupported(f"cache layer {index} was not filled by the patched model's prefill")
            if not torch.equal(layer.positions, first.positions):
                raise StaticDecodeUnsupported(f"cache layer {index} holds other positions than layer 0")
            if layer.valid is not None and not bool(layer.valid.all()):
                raise StaticDecodeUnsupported("static decoding runs an unpadded prompt (the cache holds padding)")
            pos = layer.positions[0]  # (held,)
            keep = (pos < n_global) | (pos >= seen - n_local)  # what the next query can see, or replaces
            pos = pos[keep]
            slot = slot_of(pos, n_global, n_local)
            if index == 0:
                self.slot_pos.index_copy_(0, slot, pos)
            k, v = layer.keys[:, :, keep], layer.values[:, :, keep]  # (1, Hk, kept, D)
            if fresh:
                held = k.dtype if self.kv == "model" else getattr(torch, self.kv)
                self.keys.append(k.new_zeros(1, k.shape[1], k.shape[-1], slots, dtype=held))  # (1, Hk, D, S)
                self.values.append(v.new_zeros(1, v.shape[1], slots, v.shape[-1], dtype=held))
            self.keys[index].zero_().index_copy_(3, slot, k.transpose(-1, -2).to(self.keys[index].dtype))
            self.values[index].zero_().index_copy_(2, slot, v.to(self.values[index].dtype))
        self._store()
        self.seen, self.cache, self._check = seen, cache, self.check
        return self

    def _store(self) -> None:
        """The stored weights from the model's weights as they are now; copies are rewritten in place (the tensors a
        compiled step reads stay the same), so a model changed between two decodings is decoded as it is now."""
        fresh = stored_projections(self.model, self.weights)
        if self.stored is None or self.weights == "model" or fresh.keys() != self.stored.keys():
            self.stored = fresh
            return
        for module, (weight, scale) in fresh.items():
            kept_weight, kept_scale = self.stored[module]
            kept_weight.copy_(weight)
            if scale is not None:
                kept_scale.copy_(scale)

    def weight_bytes(self) -> int:
        """Bytes of the projection weights one step reads (the stored copies, or the model's own)."""
        return sum(t.numel() * t.element_size() for stored in self.stored.values() for t in stored if t is not None)

    def stored_bytes(self) -> int:
        """Bytes of the static buffers (keys, values, slot positions)."""
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values, self.slot_pos])

    def _step(self, token: torch.Tensor, position: torch.Tensor, span: int) -> torch.Tensor:
        """token (1, 1) long, position () long -> logits (1, V); writes the step's keys and values in place and
        attends to the first `span` slots (every filled one: `span_for`)."""
        inner, pattern = self.model.model, self.pattern
        proj = project if self.mode == "compiled" else _call  # fused reductions only where the step is compiled
        stored = self.stored
        hidden = inner.embed_tokens(token)  # (1, 1, hidden)
        cos, sin = inner.rotary_emb(hidden, position.reshape(1, 1))
        slot = slot_of(position, pattern.n_global, pattern.n_local).reshape(1)
        self.slot_pos.index_copy_(0, slot, position.reshape(1))
        for layer, keys, values, (_, encoding) in zip(self.layers, self.keys, self.values, self.states):
            weights = tuple(stored.get(layer.get_submodule(name)) for name in PROJECTIONS)
            hidden = _layer_step(layer, hidden, keys, values, self.slot_pos, slot, position, cos, sin, span, pattern,
                                 encoding, self.apply_rotary, proj, weights)
        head = self.model.lm_head
        return proj(head, inner.norm(hidden), stored.get(head))[:, -1]

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Decode `token` (1, 1) at the next position; returns its logits (1, V) (float of the model's dtype)."""
        token = token.reshape(1, 1).to(self.position.device)
        span = span_for(self.seen, self.slot_pos.shape[0], self.spans)
        if self.mode == "compiled":
            try:
                with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # never eager under the label
                    logits = self._run(token, self.position, span)
            except Exception as error:  # noqa: BLE001 - no compiler, or an op inductor cannot lower
                warnings.warn(f"torch.compile of the static decoding step failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); it runs eagerly", stacklevel=2)
                self.mode, self._run = "static-eager", self._step  # the failed call wrote nothing
                logits = self._run(token, self.position, span)
        else:
            logits = self._run(token, self.position, span)
        if self._check:
            self._check = False
            self._compare(token, logits)
        self.position += 1
        self.seen += 1
        return logits

    def _compare(self, token: torch.Tensor, logits: torch.Tensor) -> None:
        """The eager transformers step on the prefill cache: the same next-token logits, or raise."""
        model = self.model
        copies = {} if self.weights == "model" else self.stored
        with _reading(copies):  # the model computing with the weights the step reads
            eager = model(input_ids=token, **cache_kwargs(model, self.cache), use_cache=True,
                          position_ids=self.position.reshape(1, 1), logits_to_keep=1).logits[:, -1]
        self.cache = None  # spent: it has taken this token
        scale = float(eager.float().abs().max().clamp(min=1.0))
        gap = float((logits.float() - eager.float()).abs().max())
        if gap > self.tolerance * scale or int(logits.argmax()) != int(eager.argmax()):
            raise StaticDecodeMismatch(f"static decoding ({self.mode}) disagrees with the eager path: max |logit gap| "
                                       f"{gap:.3g} (tolerance {self.tolerance:g} x {scale:.3g}), next token "
                                       f"{int(logits.argmax())} vs {int(eager.argmax())}; decode on the eager path")
        self.check_gap = gap


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {decoder key: StaticDecoder}


def decoder_for(model, cache: LambdaCache, compile: bool = False, weights: str = "model",
                kv: str = "model") -> StaticDecoder:
    """A StaticDecoder loaded with `cache`: the one made before for this model and an equal patch (same pattern,
    frequencies, dtype, mode, weight and kv formats) when there is one, so that its compiled step is compiled once."""
    made = StaticDecoder(model, compile=compile, weights=weights, kv=kv)
    kept = _DECODERS.setdefault(model, {})
    return kept.setdefault(made.key(), made).load(cache)  # an equal key: the states now in force equal its own


@torch.no_grad()
def greedy_static(model, cache: LambdaCache, first_logits: torch.Tensor, max_new_tokens: int,
                  eos_token_id: int | None = None, compile: bool = False,
                  weights: str = "model", kv: str = "model") -> tuple[torch.Tensor, str]:
    """Greedy tokens (T,) after a prefill whose last logits are `first_logits` (1, V), decoded on a static cache
    whose step reads the projection weights stored as `weights` and the keys and values held as `kv`
    (`StaticDecoder`); and the mode that ran ("compiled" or "static-eager")."""
    check_weights(model, weights, kv)
    if max_new_tokens < 1:
        return first_logits.new_zeros(0, dtype=torch.long), "static-eager"
    token = first_logits.argmax(-1, keepdim=True)  # (1, 1)
    tokens = [token]
    decoder = None
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and int(token) == eos_token_id:
            break
        decoder = decoder or decoder_for(model, cache, compile=compile, weights=weights, kv=kv)
        token = decoder.step(token).argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)[0], (decoder.mode if decoder else "static-eager")
