"""The RoPE rescaling family as reversible patches: linear (PI), ntk, dynamic-ntk, yarn, llama3, longrope.

The maths lives in `lengthwise.rope.scaling` (pure functions). Here each method turns its config into a
`FrequencyPlan` (sequence length -> inverse frequencies and attention factor, plus `n_hat`), and one patch applies
any plan to the model's shared rotary module:

- static plans (fixed frequencies, n_hat = 0) swap the module's `inv_freq` buffer and `attention_scaling`
  (`Undo.setattr` restores them exactly), so the model computes exactly what transformers would for that config;
- position-dependent plans (n_hat > 0: positions < n_hat keep the original frequencies; dynamic-ntk: frequencies
  follow the current length; longrope with short factors: short/long switch) replace the module's forward.
  When the frequencies change while a KV cache holds keys rotated under the old ones, those keys are re-rotated
  by (new - old) angles before the layers run, so cached decoding equals recomputation from scratch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lengthwise.models.compat import PatchNotInForce, cache_from_kwargs, cache_kwargs
from lengthwise.models.families import model_info
from lengthwise.patching import Undo
from lengthwise.registry import register
from lengthwise.rope import scaling
from lengthwise.rope.factors import resolve_factors
from lengthwise.rope.rotation import RotaryLayout, rotary_layout, rotate

# attention implementations that leave positions to the rotary embedding (anything else, e.g. a Λ-attention
# that re-rotates keys itself, cannot follow per-position or changing frequencies)
STANDARD_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", None)
# attribute set on the rotary module while a position-dependent plan is patched in (value: the method's name)
POSITION_DEPENDENT_MARK = "_lengthwise_position_dependent"


# ----------------------------------------------------------------------------------------------------------- configs
def _check_factor(name: str, value: Any, minimum: float = 1.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ValueError(f"{name} must be a number >= {minimum:g}, got {value!r}")


def _check_common(method: str, config: Any) -> None:
    if isinstance(config.n_hat, bool) or not isinstance(config.n_hat, int) or config.n_hat < 0:
        raise ValueError(f"{method} n_hat must be an integer >= 0 (start tokens kept un-interpolated), got {config.n_hat!r}")
    length = config.original_max_position_embeddings
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 2):
        raise ValueError(
            f"{method} original_max_position_embeddings must be an integer >= 2 (default: the model's training "
            f"length), got {length!r}"
        )


def _check_on_change(method: str, value: Any) -> None:
    if value not in ("rebuild", "rerotate"):
        raise ValueError(f"{method} on_change must be 'rebuild' or 'rerotate', got {value!r}")


@dataclass(frozen=True)
class LinearConfig:
    factor: float = 4.0  # s: positions are read as p / s
    n_hat: int = 0  # positions < n_hat keep the original frequencies (LongRoPE's start tokens)
    original_max_position_embeddings: int | None = None  # L; default: the model's training length

    def __post_init__(self) -> None:
        _check_factor("linear factor", self.factor)
        _check_common("linear", self)


@dataclass(frozen=True)
class NtkConfig:
    factor: float = 4.0  # s: base b' = b * s^(d/(d-2))
    n_hat: int = 0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        _check_factor("ntk factor", self.factor)
        _check_common("ntk", self)


@dataclass(frozen=True)
class DynamicNtkConfig:
    # s in b' = b((s n/L) - (s-1))^(d/(d-2)), n the current length. s = 1 scales the base for exactly n/L.
    factor: float = 1.0
    n_hat: int = 0
    original_max_position_embeddings: int | None = None
    # when the base changes with a filled KV cache: "rebuild" it (exact) or "rerotate" the cached keys (cheap)
    on_change: str = "rebuild"

    def __post_init__(self) -> None:
        _check_factor("dynamic-ntk factor", self.factor)
        _check_on_change("dynamic-ntk", self.on_change)
        _check_common("dynamic-ntk", self)


@dataclass(frozen=True)
class YarnConfig:
    factor: float = 4.0
    beta_fast: float = 32.0  # dims rotating more than beta_fast times in L keep their frequency
    beta_slow: float = 1.0  # dims rotating fewer than beta_slow times in L are interpolated by s
    attention_factor: float | None = None  # default 0.1 ln s + 1
    truncate: bool = True  # round the ramp ends to whole dims (transformers' default)
    n_hat: int = 0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        _check_factor("yarn factor", self.factor)
        _check_factor("yarn beta_slow", self.beta_slow, 1e-9)
        if not isinstance(self.beta_fast, (int, float)) or self.beta_fast <= self.beta_slow:
            raise ValueError(f"yarn beta_fast must exceed beta_slow ({self.beta_slow}), got {self.beta_fast!r}")
        if self.attention_factor is not None:
            _check_factor("yarn attention_factor", self.attention_factor, 1e-9)
        if not isinstance(self.truncate, bool):
            raise ValueError(f"yarn truncate must be true or false, got {self.truncate!r}")
        _check_common("yarn", self)


@dataclass(frozen=True)
class Llama3Config:
    factor: float = 4.0
    low_freq_factor: float = 1.0  # wavelengths > L/low_freq_factor are interpolated by s
    high_freq_factor: float = 4.0  # wavelengths < L/high_freq_factor are kept
    n_hat: int = 0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        _check_factor("llama3 factor", self.factor)
        _check_factor("llama3 low_freq_factor", self.low_freq_factor, 1e-9)
        if not isinstance(self.high_freq_factor, (int, float)) or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"llama3 high_freq_factor must exceed low_freq_factor ({self.low_freq_factor}), got {self.high_freq_factor!r}"
            )
        _check_common("llama3", self)


@dataclass(frozen=True)
class LongRopeConfig:
    # lambda_i per rotary frequency (rotary_dim/2 numbers) or a JSON file path; default: every lambda_i = factor (PI)
    long_factors: tuple[float, ...] | str | None = None
    # used while the sequence is <= original_max_position_embeddings; default: no switch (long factors always)
    short_factors: tuple[float, ...] | str | None = None
    n_hat: int = 0
    original_max_position_embeddings: int | None = None  # L and the short/long switch length
    # s, for the attention factor sqrt(1 + ln s / ln L); default: 4 without long_factors, else max(lambda_i)
    factor: float | None = None
    attention_factor: float | None = None
    source: str | None = field(default=None)  # the factors file, when given as a path (recorded for results)
    on_change: str = "rebuild"  # at the short->long switch with a filled KV cache: "rebuild" | "rerotate"

    def __post_init__(self) -> None:
        _check_on_change("longrope", self.on_change)
        source = next((v for v in (self.long_factors, self.short_factors) if isinstance(v, str)), None)
        long = resolve_factors(self.long_factors, "long", "longrope long_factors")
        short = resolve_factors(self.short_factors, "short", "longrope short_factors")
        if self.factor is not None:
            _check_factor("longrope factor", self.factor)
        if self.attention_factor is not None:
            _check_factor("longrope attention_factor", self.attention_factor, 1e-9)
        if long is not None and short is not None and len(long) != len(short):
            raise ValueError(f"longrope long_factors ({len(long)}) and short_factors ({len(short)}) differ in length")
        object.__setattr__(self, "long_factors", long)
        object.__setattr__(self, "short_factors", short)
        if source is not None and self.source is None:
            object.__setattr__(self, "source", source)
        _check_common("longrope", self)

    @property
    def scale(self) -> float:
        if self.factor is not None:
            return float(self.factor)
        return max(self.long_factors) if self.long_factors is not None else 4.0


# ------------------------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class FrequencyPlan:
    """What a method does to the frequencies, independent of how it is patched in.

    `scaled(seq_len) -> (inv_freq (d/2,), attention factor)`; `regime(seq_len)` names the frequency set in use (it
    changes exactly when `scaled` does); positions < `n_hat` keep `original`.
    """

    original: torch.Tensor  # (d/2,) float32
    scaled: Callable[[int], tuple[torch.Tensor, float]]
    regime: Callable[[int], Any] = lambda seq_len: 0
    n_hat: int = 0
    length_dependent: bool = False

    @property
    def static(self) -> bool:
        return not self.length_dependent and self.n_hat == 0

    def angles(self, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, float]:
        """positions (B, T) -> angles (B, T, d/2) float32 (as the rotary module computes them), attention factor."""
        inv_freq, factor = self.scaled(seq_len)
        pos = positions[..., None].float()  # (B, T, 1)
        angles = pos * inv_freq.to(positions.device)
        if self.n_hat:
            original = pos * self.original.to(positions.device)
            angles = torch.where(pos < self.n_hat, original, angles)
        return angles, factor


def model_geometry(model, layout: RotaryLayout, length: int | None = None) -> scaling.RopeGeometry:
    return scaling.RopeGeometry(layout.rotary_dim, layout.base, length or model_info(model).pretrain_length)


def _static(original: torch.Tensor, result: tuple[torch.Tensor, float], n_hat: int) -> FrequencyPlan:
    inv_freq, factor = result
    return FrequencyPlan(original, lambda seq_len: (inv_freq, factor), n_hat=n_hat)


def make_plan(method: str, config: Any, g: scaling.RopeGeometry) -> FrequencyPlan:
    """The frequency plan of a rope-family method for a model of geometry `g`."""
    original = scaling.base_inv_freq(g.rotary_dim, g.base)
    if method == "linear":
        return _static(original, scaling.linear_inv_freq(g, config.factor), config.n_hat)
    if method == "ntk":
        return _static(original, scaling.ntk_inv_freq(g, config.factor), config.n_hat)
    if method == "yarn":
        result = scaling.yarn_inv_freq(g, config.factor, config.beta_fast, config.beta_slow,
                                       config.attention_factor, config.truncate)
        return _static(original, result, config.n_hat)
    if method == "llama3":
        result = scaling.llama3_inv_freq(g, config.factor, config.low_freq_factor, config.high_freq_factor)
        return _static(original, result, config.n_hat)
    if method == "dynamic-ntk":
        def scaled(seq_len: int) -> tuple[torch.Tensor, float]:
            return scaling.dynamic_ntk_inv_freq(g, config.factor, seq_len)

        return FrequencyPlan(original, scaled, lambda seq_len: max(seq_len, g.pretrain_length), config.n_hat, True)
    if method == "longrope":
        half = g.rotary_dim // 2
        long = config.long_factors if config.long_factors is not None else (config.scale,) * half
        for what, values in (("long_factors", long), ("short_factors", config.short_factors)):
            if values is not None and len(values) != half:
                raise ValueError(
                    f"longrope {what} has {len(values)} numbers; this model needs rotary_dim/2 = {half} "
                    f"(rotary_dim {g.rotary_dim})"
                )
        factor = (scaling.longrope_attention_factor(config.scale, g.pretrain_length)
                  if config.attention_factor is None else float(config.attention_factor))
        long_freq = scaling.longrope_geometry_inv_freq(g, long)
        if config.short_factors is None:
            return FrequencyPlan(original, lambda seq_len: (long_freq, factor), n_hat=config.n_hat)
        short_freq = scaling.longrope_geometry_inv_freq(g, config.short_factors)

        def switched(seq_len: int) -> tuple[torch.Tensor, float]:
            return (long_freq if seq_len > g.pretrain_length else short_freq), factor

        return FrequencyPlan(original, switched, lambda seq_len: seq_len > g.pretrain_length, config.n_hat, True)
    raise ValueError(f"unknown rope method {method!r}; accepted: {', '.join(ROPE_METHODS)}")


# ---------------------------------------------------------------------------------------------------------- patching
def _require_rotary_module(model, method: str) -> RotaryLayout:
    layout = rotary_layout(model)
    if layout.rotary_module is None:
        raise ValueError(
            f"{method!r} patches the shared rotary-embedding module, which {model.config.model_type!r} models do not "
            f"have (GPT-J keeps a fixed sin/cos table in every attention layer); supported: models with a "
            f"`rotary_emb` module (llama, mistral, qwen2, qwen3, phi3, gemma, gpt_neox, olmo, granite, ...)"
        )
    return layout


def require_standard_attention(model, method: str, why: str) -> None:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in STANDARD_ATTENTION:
        raise ValueError(
            f"{method!r} {why} cannot be combined with attention implementation {impl!r} (it needs the keys rotated "
            f"as the rotary embedding says; e.g. lm-infinite re-rotates keys with one set of frequencies). Use a static "
            f"setting (n_hat=0, no short_factors) or plain attention ({', '.join(map(str, STANDARD_ATTENTION[:-1]))})"
        )


@dataclass
class _CacheRecord:
    """Stored on a KV cache: the frequency regime its entries were computed under, and what it holds."""

    regime: Any
    seq_len: int  # the length whose frequencies the cached keys carry
    positions: torch.Tensor  # (B, n) positions of the cached tokens
    input_ids: torch.Tensor | None  # (B, n) their tokens (to rebuild the cache), None if fed as embeddings


def _full_dynamic_layers(cache) -> None:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # noqa: PLC0415

    for index, layer in enumerate(cache.layers):
        if not isinstance(layer, DynamicLayer) or isinstance(layer, DynamicSlidingWindowLayer):
            raise ValueError(
                f"frequencies changed during decoding, and cache layer {index} is a {type(layer).__name__}: the cache "
                f"can be updated only when it is a full DynamicCache (keys at positions 0..n-1)"
            )


def rerotate_cache(cache, plan: FrequencyPlan, positions: torch.Tensor, old_seq_len: int, seq_len: int) -> None:
    """Re-rotate every cached key from the frequencies of `old_seq_len` to those of `seq_len`, in place.

    positions (B, n) of the cached keys. Exact for the first layer; deeper layers' keys and values were computed
    from hidden states that attended under the old frequencies, which no rotation can undo (see `rebuild`).
    """
    _full_dynamic_layers(cache)
    old, old_factor = plan.angles(positions, old_seq_len)  # (B, n, d/2)
    new, new_factor = plan.angles(positions, seq_len)
    # difference of the float32 angles actually used, taken in float64 so the round trip adds no error of its own
    delta = (new.double() - old.double())[:, None]  # (B, 1, n, d/2)
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        rotated = rotate(keys.double(), delta, "half")  # (B, H, n, head_dim)
        if new_factor != old_factor:
            rotated[..., : 2 * delta.shape[-1]] *= new_factor / old_factor
        layer.keys = rotated.to(keys.dtype)


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
    raise ValueError("rotary module not found in the model")


def apply_plan(model, plan: FrequencyPlan, method: str, layout: RotaryLayout, on_change: str = "rebuild") -> Undo:
    """Patch `plan` into the model's rotary module; see the module docstring.

    on_change (length-dependent plans, when the frequencies change while a KV cache holds entries):
    "rebuild" recomputes the cache from its tokens under the new frequencies (decoding equals recomputation from
    scratch; costs a forward over the prefix at each change); "rerotate" only re-rotates the cached keys (cheap;
    queries and keys agree on the frequencies, but deeper layers keep states computed under the old ones).
    """
    undo = Undo()
    rotary = layout.rotary_module
    device = rotary.inv_freq.device
    undo.setattr(rotary, "rope_type", "default")  # keep transformers' own dynamic/longrope updates out of the way
    if plan.static:
        inv_freq, factor = plan.scaled(0)
        undo.setattr(rotary, "inv_freq", inv_freq.to(device, rotary.inv_freq.dtype))
        undo.setattr(rotary, "attention_scaling", factor)
        return undo

    # marks the rotary module for attention methods patched after this one (Λ attention re-rotates keys with a
    # single frequency set, so it must refuse per-position or length-dependent plans at patch time)
    undo.setattr(rotary, POSITION_DEPENDENT_MARK, method)
    state: dict[str, Any] = {"seq_len": None, "busy": False}  # seq_len: frequencies of the forward in progress
    parent = _parent_of(model, rotary)

    def before(module, args, kwargs):
        """Parent (e.g. LlamaModel) pre-hook: fix this call's length, bring the cache to its frequencies."""
        if state["busy"]:  # the rebuild's own forward
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, length = (ids.shape if ids is not None else embeds.shape[:2])
        cache = cache_from_kwargs(kwargs, method, model.config.model_type)
        positions = _call_positions(cache, kwargs, length, batch, (ids if ids is not None else embeds).device)
        seq_len = int(positions.max()) + 1
        state["seq_len"] = seq_len
        if not plan.length_dependent or cache is None or not kwargs.get("use_cache", True):
            return
        cached = cache.get_seq_length()
        record = getattr(cache, "_lengthwise_rope", None) if cached else None
        if cached and (record is None or record.positions.shape[-1] != cached):
            raise ValueError(
                f"this KV cache holds {cached} entries that were not computed under this patch (or not as a full "
                f"cache); with frequencies that change with the length, start from an empty cache after patching"
            )
        if record is not None and record.regime != plan.regime(seq_len):
            if on_change == "rerotate":
                rerotate_cache(cache, plan, record.positions, record.seq_len, seq_len)
            else:
                _rebuild(module, cache, record, kwargs, seq_len)
        if record is None:
            record = _CacheRecord(None, seq_len, positions[:, :0], None if ids is None else ids[:, :0])
        cache._lengthwise_rope = _CacheRecord(
            plan.regime(seq_len), seq_len, torch.cat([record.positions, positions], dim=-1),
            None if ids is None or record.input_ids is None else torch.cat([record.input_ids, ids], dim=-1),
        )

    def _rebuild(module, cache, record: _CacheRecord, kwargs: dict, seq_len: int) -> None:
        if record.input_ids is None:
            raise ValueError(f"{method!r} must rebuild the KV cache when its frequencies change, which needs "
                             f"input_ids (the cache was filled from inputs_embeds); use on_change='rerotate'")
        _full_dynamic_layers(cache)
        cache.crop(-record.positions.shape[-1])  # empty every layer
        mask = kwargs.get("attention_mask")
        mask = mask[:, : record.positions.shape[-1]] if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        state["busy"] = True
        try:  # recompute the prefix under this call's frequencies (state["seq_len"] is already set)
            module(input_ids=record.input_ids, attention_mask=mask, position_ids=record.positions,
                   use_cache=True, **cache_kwargs(module, cache))
        finally:
            state["busy"] = False

    def after(module, args, kwargs, output):
        if not state["busy"]:
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
        emb = torch.cat((angles, angles), dim=-1)
        return (emb.cos() * factor).to(x.dtype), (emb.sin() * factor).to(x.dtype)

    rotary.forward = forward  # an instance attribute shadows the class's forward
    undo.add(lambda: rotary.__dict__.pop("forward", None))
    return undo


def _apply(method: str):
    def apply(model, config) -> Undo:
        layout = _require_rotary_module(model, method)
        plan = make_plan(method, config, model_geometry(model, layout, config.original_max_position_embeddings))
        if not plan.static:
            require_standard_attention(model, method, "with per-position or length-dependent frequencies")
        return apply_plan(model, plan, method, layout, getattr(config, "on_change", "rebuild"))

    apply.__name__ = f"apply_{method.replace('-', '_')}"
    return apply


PAPER_PI = "Chen et al. 2023, Extending Context Window via Positional Interpolation, arXiv 2306.15595 (seed 001)"
PAPER_NTK = "bloc97 2023, NTK-aware scaled RoPE (reddit r/LocalLLaMA) (seed 001)"
PAPER_YARN = "Peng et al. 2023, YaRN, arXiv 2309.00071 (seeds 001, 002)"
PAPER_LONGROPE = "Ding et al. 2024, LongRoPE, arXiv 2402.13753 (seed 002)"

ROPE_METHODS = {
    "linear": (LinearConfig, "Position interpolation (PI): every rotary frequency divided by `factor`.", PAPER_PI, ()),
    "ntk": (NtkConfig, "NTK-aware scaling: rope base b' = b*factor^(d/(d-2)); high frequencies kept.", PAPER_NTK, ()),
    "dynamic-ntk": (
        DynamicNtkConfig,
        "Dynamic NTK: the base follows the current length n, b' = b((s n/L)-(s-1))^(d/(d-2)); cached keys are "
        "re-rotated when it changes.",
        PAPER_NTK,
        ("query-scale",),  # a bounded or re-rotating attention cache cannot follow a base that changes with length
    ),
    "yarn": (YarnConfig, "YaRN: per-dimension ramp between keeping and interpolating frequencies, attention "
             "factor 0.1 ln s + 1.", PAPER_YARN, ()),
    "llama3": (Llama3Config, "Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, smooth band "
               "between.", "Meta 2024, The Llama 3 Herd of Models, arXiv 2407.21783", ()),
    "longrope": (LongRopeConfig, "LongRoPE: per-dimension factors lambda_i (list or JSON file), start tokens "
                 "< n_hat un-interpolated, optional short/long switch.", PAPER_LONGROPE, ()),
}

for _name, (_config, _summary, _paper, _composable) in ROPE_METHODS.items():
    register(_name, _config, role="rope", summary=_summary, paper=_paper, encodings=("rope",),
             composable_with=_composable)(_apply(_name))
