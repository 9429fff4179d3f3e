"""Read each attention layer's features from the model's own calls, not from a list of model names.

`probe_attention(model)` switches the model, for one forward pass, to a recording attention function registered with
transformers' `AttentionInterface`, and feeds three one-token rows of the same token at positions 0, 1 and
`PROBE_POSITION` (or the
last position of the model's context, if shorter). A query that attends to its own key alone gets that key's value whatever the positions, so the
rows' hidden states are equal at every layer, and the queries and keys a layer receives differ between the rows
only by the rotation it applies. From the calls it reads, per attention layer:

- which modules attend through the interface (on hybrid models the linear-attention or Mamba layers never do);
- the mask the model builds for the layer (`lengthwise.models.masks`): causal, with the layer's own sliding window or
  none; anything else (chunked, bidirectional...) is refused;
- the keywords the layer passes: its `sliding_window` (which must agree with its mask's; a model may leave the window
  to the mask and pass none), `softcap` (attention-logit soft-capping), `s_aux`
  (attention sinks), and any keyword lengthwise does not know (then the model is refused, naming it);
- its rotation: which inverse-frequency buffer of the model (`inv_freq`, or per layer type `{type}_inv_freq`), which
  layout (half / interleaved) and which dims (the first ones, or the last ones as in multi-head latent attention),
  checked on queries and keys at two positions; or none (a NoPE layer).

The layer types come from transformers' own `get_layer_types_and_kwargs` (full, sliding, chunked, linear attention,
Mamba...), the same function its `DynamicCache(config=...)` builds cache layers from; a layer type Λ attention cannot
serve (chunked, KV-sharing, sparse) is refused by name.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lengthwise.errors import UnsupportedModelError
from lengthwise.models.compat import layer_types_of, switch_attn_implementation
from lengthwise.models.families import context_length
from lengthwise.models.masks import NotCausalWithWindow, mask_window, tag, window_of
from lengthwise.patching import Undo
from lengthwise.rope.rotation import rotate, rotation_angles

PROBE_NAME = "lengthwise_probe"
PROBE_POSITION = 37  # the second position the rotation is checked at (the first is 1); far enough to separate buffers
# keywords an attention call may carry that do not change what it computes (given a causal call)
HARMLESS_KEYWORDS = frozenset({"position_ids", "cache_position", "dropout", "output_attentions", "use_cache",
                               "is_causal", "layer_idx", "layer_type", "cu_seq_lens_q", "cu_seq_lens_k",
                               "max_length_q", "max_length_k", "output_router_logits"})
SERVED_KEYWORDS = frozenset({"sliding_window", "softcap", "s_aux"})  # applied by every Λ kernel
# cache layer types whose attention Λ serves; "hybrid" layers also run a linear-attention / Mamba branch beside it
SERVED_LAYER_TYPES = ("full_attention", "sliding_attention", "hybrid", "hybrid_sliding")


@dataclass(frozen=True)
class Rotation:
    """How one layer rotates its queries and keys: with the buffer `attribute` of submodule `path`."""

    path: str
    attribute: str
    style: str  # "half" | "interleaved"
    offset: int  # first rotated dim of a head
    sign: int = 1  # -1: the layer rotates the other way (NanoChat's rotate_half flips the signs)

    def inv_freq(self, model: nn.Module) -> torch.Tensor:
        """The buffer as the model holds it now (a RoPE method patched later may have swapped its module), signed."""
        return getattr(model.get_submodule(self.path), self.attribute).float() * self.sign


@dataclass(eq=False)
class AttentionLayer:
    """One attention layer as its call showed it."""

    module: nn.Module
    layer_idx: int
    layer_type: str
    rotation: Rotation | None  # None: no position encoding (NoPE)
    sliding_window: int | None  # the layer's own window (None: full attention)
    call_window: int | None  # the sliding_window its calls carry (some models leave it to the mask: None)
    softcap: float | None
    sinks: bool
    head_dim: int
    value_dim: int


@dataclass
class ProbeResult:
    layers: list[AttentionLayer]
    layer_types: list[tuple[str, int | None]]  # (type, window) per model layer, as transformers' cache builds them
    calls: dict[str, Any] = field(default_factory=dict)  # keyword -> example value, for messages


@dataclass
class _Call:
    module: nn.Module
    query: torch.Tensor  # (3, H, 1, D)
    key: torch.Tensor  # (3, Hk, 1, D)
    value_dim: int
    kwargs: dict
    mask: tuple[bool, int | str | None]  # (built through the mask interface, its window or why it has none)


_calls: list[_Call] | None = None


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Records the call; returns each row's own value (one token attends to itself alone)."""
    if _calls is not None:
        _calls.append(_Call(module, query.detach().float().clone(), key.detach().float().clone(), value.shape[-1],
                            dict(kwargs), window_of(attention_mask)))
    heads = query.shape[1]
    out = value.repeat_interleave(heads // value.shape[1], dim=1) if heads != value.shape[1] else value
    return out.transpose(1, 2).contiguous(), None


def _probe_mask(batch_size=None, q_length=None, kv_length=None, attention_mask=None, device="cpu",
                mask_function=None, **kwargs):
    """Each mask the model builds: a fresh tensor tagged with its function's window (or with the reason it has none)."""
    try:
        window = None if mask_function is None else mask_window(mask_function)
    except NotCausalWithWindow as err:
        window = f"its attention mask is not causal with a sliding window: {err}"
    return tag(torch.ones(batch_size, kv_length, dtype=torch.bool, device=device), window)


def _register() -> None:
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface  # noqa: PLC0415

    AttentionInterface.register(PROBE_NAME, _probe_attention)
    AttentionMaskInterface.register(PROBE_NAME, _probe_mask)


def _frequency_buffers(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(module path, attribute, inverse frequencies) of every rotary buffer: `inv_freq` or `{layer type}_inv_freq`,
    not the `original_*` copies dynamic rotary modules keep."""
    found = []
    for name, buffer in model.named_buffers():
        path, _, attribute = name.rpartition(".")
        if attribute.endswith("inv_freq") and "original" not in attribute and buffer.dim() == 1:
            found.append((path, attribute, buffer.detach().float()))
    return found


def _keep_rotary_state(model: nn.Module, undo: Undo) -> None:
    """Restore every rotary module's buffers and plain attributes after the probe: a dynamic module (longrope,
    dynamic NTK) switches its frequencies when it sees the far position, and the probe must leave the model as it
    found it."""
    for module in model.modules():
        if not any(name.endswith("inv_freq") for name in module._buffers):
            continue
        buffers = {name: (b.clone() if b is not None else None) for name, b in module._buffers.items()}
        plain = {k: v for k, v in vars(module).items() if isinstance(v, (int, float, str, bool, type(None)))}

        def restore(module=module, buffers=buffers, plain=plain):
            for name, value in buffers.items():
                current = module._buffers.get(name)
                if current is not None and value is not None and current.shape == value.shape:
                    current.copy_(value)  # in place: other modules may hold the same tensor
                else:
                    module._buffers[name] = value
            for k, v in plain.items():
                setattr(module, k, v)

        undo.add(restore)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    rtol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return bool(torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max().clamp(min=1e-6))))


def _rotation(call: _Call, buffers, dtype, far: int) -> Rotation | None | str:
    """The layer's rotation, None for no rotation, or a reason it cannot be identified."""
    q, k = call.query, call.key  # (3, H, 1, D): rows at positions 0, 1, PROBE_POSITION
    if _close(k[1], k[0], dtype) and _close(k[2], k[0], dtype):
        return None
    head_dim = k.shape[-1]
    for path, attribute, inv_freq in buffers:
        rotary_dim = 2 * inv_freq.numel()
        if rotary_dim > head_dim:
            continue
        for offset, style, sign in itertools.product(sorted({0, head_dim - rotary_dim}), ("half", "interleaved"),
                                                     (1, -1)):
            def matches(x: torch.Tensor) -> bool:
                return all(_close(rotate(x[0], rotation_angles(torch.tensor([p]), sign * inv_freq), style, offset),
                                  x[row], dtype) for row, p in ((1, 1), (2, far)))

            if matches(k) and matches(q):
                return Rotation(path, attribute, style, offset, sign)
    names = ", ".join(f"{path}.{attribute}" for path, attribute, _ in buffers) or "none"
    return (f"layer {call.module.layer_idx} changes its queries and keys with the position in a way that no rotation "
            f"by the model's inverse-frequency buffers ({names}) explains")


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def probe_attention(model: nn.Module, method: str, rotations: bool = True) -> ProbeResult:
    """See the module docstring. Raises UnsupportedModelError (one line, naming the feature) when a layer cannot be
    served. `rotations=False`: leave the rotation unread (GPT-J: a sin/cos table without inverse frequencies, which
    lengthwise replaces by the formula)."""
    global _calls
    _register()
    model_type = model.config.model_type
    buffers = _frequency_buffers(model)
    device, dtype = next(model.parameters()).device, _dtype(model)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.full((3, 1), min(1, vocab - 1), dtype=torch.long, device=device)
    far = min(PROBE_POSITION, context_length(model.config) - 1)  # a position table (GPT-J) ends at the context
    positions = torch.tensor([[0], [1], [far]], device=device)
    undo = Undo()
    _calls = []
    try:
        _keep_rotary_state(model, undo)
        switch_attn_implementation(model, PROBE_NAME, undo)
        with torch.no_grad():
            model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids), use_cache=False)
        calls = _calls
    except Exception as err:  # noqa: BLE001 - any failure of the model's own code is a reason to refuse
        raise UnsupportedModelError(f"{method} cannot read the attention layers of this {model_type!r} model (its "
                                    f"forward failed under a recording attention function: "
                                    f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    finally:
        _calls = None
        undo.remove()
    if not calls:
        raise UnsupportedModelError(f"{method}: no layer of this {model_type!r} model attends through transformers' "
                                    f"AttentionInterface, where Λ attention is installed")
    layer_types = layer_types_of(model.config)
    layers, seen = [], {}
    for call in calls:
        module = call.module
        where = f"{method} on model type {model_type!r}: layer {getattr(module, 'layer_idx', '?')}"
        if id(module) in seen:  # a second call of one layer: over the same keys (differential attention), or refused
            first = seen[id(module)]
            if torch.equal(first.key, call.key) and torch.equal(first.query, call.query) and first.mask == call.mask \
                    and first.kwargs.keys() == call.kwargs.keys():
                continue
            raise UnsupportedModelError(f"{where} attends more than once per forward pass over other keys (a looped "
                                        f"or weight-shared layer); one bounded cache layer cannot serve it")
        seen[id(module)] = call
        index = getattr(module, "layer_idx", None)
        if not isinstance(index, int) or not 0 <= index < len(layer_types):
            raise UnsupportedModelError(f"{where}: its attention module {type(module).__name__} has no layer_idx "
                                        f"within the model's {len(layer_types)} cache layers")
        layer_type, _ = layer_types[index]
        unknown = sorted(name for name, value in call.kwargs.items()
                         if value is not None and name not in HARMLESS_KEYWORDS | SERVED_KEYWORDS)
        if unknown:
            raise UnsupportedModelError(f"{where} passes {', '.join(unknown)} to its attention function, which "
                                        f"lengthwise's Λ kernels do not apply (e.g. sparse or indexed attention)")
        if call.kwargs.get("is_causal") is False:
            raise UnsupportedModelError(f"{where} attends bidirectionally (is_causal=False)")
        if layer_type not in SERVED_LAYER_TYPES:
            what = {"chunked_attention": "chunked attention (each query sees only its own chunk)",
                    "dummy": "a layer that reuses another layer's keys (KV sharing)"}.get(layer_type, layer_type)
            raise UnsupportedModelError(f"{where} is a {layer_type!r} layer: {what}, which Λ attention does not "
                                        f"compose with; served layer types: {', '.join(SERVED_LAYER_TYPES)}")
        built, mask_window_ = call.mask
        if not built:
            raise UnsupportedModelError(f"{where} gets an attention mask the model built itself, not through "
                                        f"transformers' mask interface, so lengthwise cannot read its pattern")
        if isinstance(mask_window_, str):
            raise UnsupportedModelError(f"{where}: {mask_window_}")
        window = call.kwargs.get("sliding_window")
        if window is not None and window != mask_window_:
            raise UnsupportedModelError(f"{where}: its attention call says sliding_window={window!r} but its mask "
                                        f"has window {mask_window_!r}; lengthwise cannot tell which holds")
        softcap = call.kwargs.get("softcap")
        sinks = call.kwargs.get("s_aux")
        if sinks is not None and (not isinstance(sinks, torch.Tensor) or sinks.numel() != call.query.shape[1]):
            raise UnsupportedModelError(f"{where} passes attention sinks (s_aux) of shape "
                                        f"{tuple(getattr(sinks, 'shape', ()))}; lengthwise reads one logit per head")
        rotation = _rotation(call, buffers, dtype, far) if rotations else None
        if isinstance(rotation, str):
            raise UnsupportedModelError(f"{method} on model type {model_type!r}: {rotation}")
        layers.append(AttentionLayer(module, index, layer_type, rotation, mask_window_, window,
                                     None if softcap is None else float(softcap), sinks is not None,
                                     call.key.shape[-1], call.value_dim))
    return ProbeResult(layers, layer_types)
