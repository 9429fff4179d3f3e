"""The RoPE rescaling family as reversible patches: linear (PI), ntk, dynamic-ntk, yarn, llama3, longrope.

Each method is a row of `lengthwise.rope.table`, defined in its module of `lengthwise.rope.methods` (config, plan
function, rope_parameters export); its plan
(`lengthwise.rope.plan`: sequence length -> inverse frequencies and attention factor, plus `n_hat`) is pure. Here one
patch applies any plan to the model's shared rotary module:

- static plans (fixed frequencies, n_hat = 0) replace the rotary module by one transformers builds from the
  method's `rope_parameters` export (checked to compute the plan's frequencies; `Undo.setattr` puts the original
  module back), so the model computes exactly what transformers computes for that config;
- position-dependent plans (n_hat > 0: positions < n_hat keep the original frequencies; dynamic-ntk: frequencies
  follow the current length; longrope with short factors: short/long switch) replace the module's forward.
  When the frequencies change while a KV cache holds keys rotated under the old ones, `CacheSync`
  (`lengthwise.methods.rope_cache`) brings the cache to the new ones before the layers run, so cached decoding
  equals recomputation from scratch.
"""

from __future__ import annotations

from typing import Any

import torch

from lengthwise.errors import UnsupportedModelError, UserError
from lengthwise.methods.rope_cache import CacheSync
from lengthwise.models.compat import (PatchNotInForce, cache_from_kwargs, rotary_from_rope_parameters,
                                      standard_rope_frequencies)
from lengthwise.models.families import model_info, shipped_rope_parameters
from lengthwise.models.probe import probe_attention
from lengthwise.models.rotary import RotaryLayout, rotary_layout
from lengthwise.patching import Undo
from lengthwise.registry import register
from lengthwise.rope import scaling
from lengthwise.rope.method import RopeMethod
from lengthwise.rope.plan import FrequencyPlan, POSITION_DEPENDENT_MARK
from lengthwise.rope.shipped import resolve_shipped
from lengthwise.rope.table import ROPE_METHODS, to_rope_parameters

# attention implementations that leave positions to the rotary embedding (anything else, e.g. a Λ-attention
# that re-rotates keys itself, cannot follow per-position or changing frequencies)
STANDARD_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", None)


def model_geometry(model, layout: RotaryLayout, length: int | None = None) -> scaling.RopeGeometry:
    return scaling.RopeGeometry(layout.rotary_dim, layout.base, length or model_info(model).pretrain_length)


def _require_rotary_module(model, method: str) -> RotaryLayout:
    layout = rotary_layout(model)
    if layout.rotary_module is None:
        raise UnsupportedModelError(f"{method!r} rescales the model's rotary-embedding module, which "
                                    f"{model.config.model_type!r} models do not have (GPT-J keeps a fixed sin/cos "
                                    f"table)")
    return layout


def _rotated_layers(model, method: str, layout: RotaryLayout) -> int | None:
    """How many attention layers rotate by the rotary module's frequencies, read from their calls
    (`lengthwise.models.probe`); None where the calls cannot be read (attention outside AttentionInterface)."""
    try:
        layers = probe_attention(model, method).layers
    except UnsupportedModelError:
        return None
    path = next(name for name, module in model.named_modules() if module is layout.rotary_module)
    return sum(layer.rotation is not None and (layer.rotation.path, layer.rotation.attribute) == (path, "inv_freq")
               for layer in layers)


def require_standard_attention(model, method: str, why: str) -> None:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in STANDARD_ATTENTION:
        raise UserError(
            f"{method!r} {why} cannot be combined with attention implementation {impl!r} (it needs the keys rotated "
            f"as the rotary embedding says; e.g. lm-infinite re-rotates keys with one set of frequencies). Use a "
            f"static setting (n_hat=0, no short_factors) or plain attention "
            f"({', '.join(map(str, STANDARD_ATTENTION[:-1]))})"
        )


def _call_positions(cache, kwargs: dict, length: int, batch: int, device) -> torch.Tensor:
    positions = kwargs.get("position_ids")
    if positions is None:
        start = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(start, start + length, device=device)[None]
    return positions.expand(batch, -1) if positions.shape[0] != batch else positions


def _parent_of(model, child) -> torch.nn.Module:
    for module in model.modules():
        if any(c is child for c in module.children()):
            return module
    raise UserError("rotary module not found in the model")


def _gaps(plan: FrequencyPlan, inv_freq: torch.Tensor, factor: float) -> tuple[float, float]:
    """Largest relative differences of frequencies and attention factor from the plan's."""
    planned, plan_factor = plan.scaled(0)
    return scaling.frequency_gap(planned, inv_freq), abs(float(factor) - plan_factor) / abs(plan_factor)


def check_same_frequencies(model, built, plan: FrequencyPlan, method: str, rope_parameters: dict) -> None:
    """Raise unless the rotary module built from `rope_parameters` computes the plan's frequencies and attention
    factor (to float32 rounding). Where transformers' standard function for those parameters disagrees with the plan
    too, the export and the maths do not describe one thing (PatchNotInForce: a defect of lengthwise); where only the
    model's own rotary class does (it implements some rope types its own way), the method is refused."""
    gap, factor_gap = _gaps(plan, built.inv_freq, built.attention_scaling)
    if gap <= 1e-6 and factor_gap <= 1e-6:
        return
    standard = standard_rope_frequencies(model.config, rope_parameters)
    if standard is None or max(_gaps(plan, *standard)) > 1e-6:
        raise PatchNotInForce(method, model.config.model_type, f"transformers' rotary module built from "
                              f"rope_parameters {rope_parameters} computes other frequencies than lengthwise's plan "
                              f"(largest relative difference {gap:.2e}, attention factor {factor_gap:.2e})")
    raise UnsupportedModelError(f"{method!r} on model type {model.config.model_type!r}: its rotary module "
                                f"({type(built).__name__}) implements rope_type {rope_parameters.get('rope_type')!r} "
                                f"its own way (frequencies {gap:.2e} away from transformers' standard function)")


def _output_layout(model, rotary, method: str, inv_freq: torch.Tensor | None = None, scale: float | None = None) -> str:
    """How the rotary module lays out its (cos, sin) of shape (B, T, rotary_dim): "cat" (angles twice, end to end:
    Llama and most) or "interleave" (each angle twice in a row: Cohere), checked against `inv_freq` and `scale`
    (default: the module's own). A per-position plan replaces the module's forward and must write the same layout;
    a rebuilt module must give the plan's cos/sin; any other output (complex frequencies...) is refused."""
    device = rotary.inv_freq.device
    inv_freq = (rotary.inv_freq if inv_freq is None else inv_freq).float().to(device)
    positions = torch.tensor([[1, 5]], device=device)
    try:
        out = rotary(torch.zeros(1, 2, 2 * inv_freq.numel(), device=device), positions)
        cos = out[0].float()
    except Exception as err:  # noqa: BLE001 - any other contract is a reason to refuse
        raise UnsupportedModelError(f"{method!r}: the rotary module of {model.config.model_type!r} does not take "
                                    f"(x, position_ids (B, T)) -> (cos, sin) as lengthwise calls it "
                                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    angles = positions[..., None].float() * inv_freq  # (1, 2, d/2)
    scale = float(getattr(rotary, "attention_scaling", 1.0)) if scale is None else scale
    for kind, emb in (("cat", torch.cat((angles, angles), -1)), ("interleave", angles.repeat_interleave(2, -1))):
        if cos.shape == emb.shape and torch.allclose(cos, emb.cos() * scale, atol=1e-5):
            return kind
    raise UnsupportedModelError(f"{method!r}: the rotary module of {model.config.model_type!r} gives other cos/sin than "
                                f"its frequencies say, or lays them out in a way lengthwise does not write")


def apply_plan(model, plan: FrequencyPlan, method: str, layout: RotaryLayout, on_change: str = "rebuild",
               rope_parameters: dict | None = None) -> Undo:
    """Patch `plan` into the model's rotary module; see the module docstring.

    Static plans need `rope_parameters` (the method's export): the live rotary module is replaced by one built
    from them, checked to compute the plan's frequencies.

    on_change (length-dependent plans, when the frequencies change while a KV cache holds entries): "rebuild" or
    "rerotate", see `CacheSync`.
    """
    undo = Undo()
    rotary = layout.rotary_module
    if plan.static:
        if rope_parameters is None:
            raise UserError(f"{method!r}: a static plan is patched in as rope_parameters; none given")
        built = rotary_from_rope_parameters(rotary, rope_parameters)
        check_same_frequencies(model, built, plan, method, rope_parameters)
        inv_freq, factor = plan.scaled(0)
        _output_layout(model, built, method, inv_freq, factor)  # and the built module runs, giving those cos/sin
        undo.setattr(layout.owner, layout.slot, built)
        return undo
    rope_parameters = getattr(model.config.get_text_config(decoder=True), "rope_parameters", None) or {}
    if getattr(rotary, "mrope_section", None) is not None or "mrope_section" in rope_parameters:
        raise UnsupportedModelError(f"{method!r} with per-position or length-dependent frequencies: "
                                    f"{model.config.model_type!r} rotates by multimodal positions (mrope_section), "
                                    f"which the replaced rotary forward does not take")
    layout_kind = _output_layout(model, rotary, method)
    undo.setattr(rotary, "rope_type", "default")  # keep transformers' own dynamic/longrope updates out of the way

    # marks the rotary module for attention methods patched after this one (Λ attention re-rotates keys with a
    # single frequency set, so it must refuse per-position or length-dependent plans at patch time)
    undo.setattr(rotary, POSITION_DEPENDENT_MARK, method)
    state: dict[str, Any] = {"seq_len": None}  # the length whose frequencies the forward in progress uses
    sync = CacheSync(plan, method, on_change)
    parent = _parent_of(model, rotary)

    def before(module, args, kwargs):
        """Parent (e.g. LlamaModel) pre-hook: fix this call's length, bring the cache to its frequencies."""
        if sync.rebuilding:  # the rebuild's own forward runs under the length already fixed
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, length = (ids.shape if ids is not None else embeds.shape[:2])
        cache = cache_from_kwargs(kwargs, method, model.config.model_type)
        positions = _call_positions(cache, kwargs, length, batch, (ids if ids is not None else embeds).device)
        seq_len = int(positions.max()) + 1
        state["seq_len"] = seq_len
        if plan.length_dependent and cache is not None and kwargs.get("use_cache", True):
            sync.sync(module, cache, kwargs, ids, positions, seq_len)

    def after(module, args, kwargs, output):
        if not sync.rebuilding:
            state["seq_len"] = None

    for handle in (parent.register_forward_pre_hook(before, with_kwargs=True),
                   parent.register_forward_hook(after, with_kwargs=True)):
        undo.add(handle.remove)

    def forward(x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any):
        # x: (B, T, hidden) only for dtype/device; position_ids (B, T) -> cos, sin (B, T, rotary_dim)
        require_standard_attention(model, method, "with per-position or length-dependent frequencies")
        seq_len = state["seq_len"]
        if seq_len is None:  # the parent's pre-hook fixes the length and syncs the cache; without it both go wrong
            raise PatchNotInForce(method, model.config.model_type, f"the rotary module ran outside a call of its "
                                  f"parent {type(parent).__name__} (the pre-hook that follows the length and the KV "
                                  f"cache was not reached)")
        angles, factor = plan.angles(position_ids, seq_len)
        emb = torch.cat((angles, angles), dim=-1) if layout_kind == "cat" else angles.repeat_interleave(2, dim=-1)
        return (emb.cos() * factor).to(x.dtype), (emb.sin() * factor).to(x.dtype)

    undo.shadow(rotary, "forward", forward)
    return undo


def _apply(row: RopeMethod):
    def apply(model, config) -> Undo:
        layout = _require_rotary_module(model, row.name)
        if _rotated_layers(model, row.name, layout) == 0:
            raise UnsupportedModelError(f"{row.name!r}: no attention layer of this {model.config.model_type!r} model "
                                        f"rotates by its rotary module (NoPE attention), so rescaling it changes "
                                        f"nothing")
        config = resolve_shipped(row, config, shipped_rope_parameters(model.config), model_info(model).pretrain_length)
        plan = row.plan(config, model_geometry(model, layout, config.original_max_position_embeddings))
        if not plan.static:
            require_standard_attention(model, row.name, "with per-position or length-dependent frequencies")
        rope_parameters = to_rope_parameters(row.name, config, model) if plan.static else None
        undo = apply_plan(model, plan, row.name, layout, getattr(config, "on_change", "rebuild"), rope_parameters)
        undo.resolved = config  # what runs: a factor composed with the shipped scaling, the length filled in
        return undo

    apply.__name__ = f"apply_{row.name.replace('-', '_')}"
    return apply


for _row in ROPE_METHODS.values():
    register(_row.name, _row.config, role="rope", summary=_row.summary, paper=_row.paper, encodings=("rope",),
             composable_with=_row.composable_with)(_apply(_row))
