"""`longrope`: LongRoPE, per-dimension factors, un-interpolated start tokens, an optional short/long switch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lengthwise.registry import option
from lengthwise.rope import scaling
from lengthwise.rope.factors import resolve_factors
from lengthwise.rope.export import ExportTarget
from lengthwise.rope.method import RopeMethod
from lengthwise.rope.options import N_HAT_HELP, check_common, check_factor, check_on_change
from lengthwise.rope.plan import FrequencyPlan, original_inv_freq
from lengthwise.rope.scaling import RopeGeometry
from lengthwise.rope.shipped import SHIPPED_HELP
from lengthwise.errors import UserError


@dataclass(frozen=True)
class LongRopeConfig:
    long_factors: tuple[float, ...] | str | None = option(
        None, "lambda_i per rotary frequency (rotary_dim/2 numbers) or a JSON file path; default: every lambda_i = "
        "factor (PI)")
    short_factors: tuple[float, ...] | str | None = option(
        None, "lambda_i used while the sequence is <= L (list or JSON file path); default: no switch, the long "
        "factors at every length")
    n_hat: int = option(0, N_HAT_HELP)
    original_max_position_embeddings: int | None = option(
        None, "L, the attention factor's training length and the short/long switch length; default: the model's")
    shipped: str = option("compose", SHIPPED_HELP)
    factor: float | None = option(
        None, "s, for the attention factor sqrt(1 + ln s / ln L); default: 4 without long_factors, else max(lambda_i)")
    attention_factor: float | None = option(None, "multiplies cos and sin; default sqrt(1 + ln s / ln L)")
    source: str | None = option(None, "the factors file, when the factors were given as a path (kept for results)")
    on_change: str = option("rebuild", "at the short->long switch with a filled KV cache: 'rebuild' recomputes the "
                            "cache (exact), 'rerotate' only re-rotates the cached keys (cheap, approximate)")
    short_attention_factor: float | None = option(
        None, "multiplies cos and sin while the short factors are in use (sequence <= L; Phi-3.5's short_mscale); "
        "default: attention_factor, one factor in both regimes as transformers' longrope")

    def __post_init__(self) -> None:
        check_on_change("longrope", self.on_change)
        if self.short_attention_factor is not None:
            check_factor("longrope short_attention_factor", self.short_attention_factor, 1e-9)
            if self.short_factors is None:
                raise UserError("longrope short_attention_factor applies with short_factors (the regime <= L); "
                                 "give short_factors too")
        source = next((v for v in (self.long_factors, self.short_factors) if isinstance(v, str)), None)
        long = resolve_factors(self.long_factors, "long", "longrope long_factors")
        short = resolve_factors(self.short_factors, "short", "longrope short_factors")
        if self.factor is not None:
            check_factor("longrope factor", self.factor)
        if self.attention_factor is not None:
            check_factor("longrope attention_factor", self.attention_factor, 1e-9)
        if long is not None and short is not None and len(long) != len(short):
            raise UserError(f"longrope long_factors ({len(long)}) and short_factors ({len(short)}) differ in length")
        object.__setattr__(self, "long_factors", long)
        object.__setattr__(self, "short_factors", short)
        if source is not None and self.source is None:
            object.__setattr__(self, "source", source)
        check_common("longrope", self)

    @property
    def scale(self) -> float:
        if self.factor is not None:
            return float(self.factor)
        return max(self.long_factors) if self.long_factors is not None else 4.0

    def factor_sets(self, rotary_dim: int) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
        """(long, short) lambda_i for a model of `rotary_dim`; short None: no switch. The patch and the export both
        read them here, so a rope_parameters export (short = long when None) computes what the patch computes."""
        half = rotary_dim // 2
        long = self.long_factors if self.long_factors is not None else (self.scale,) * half
        for what, values in (("long_factors", long), ("short_factors", self.short_factors)):
            if values is not None and len(values) != half:
                raise UserError(f"longrope {what} has {len(values)} numbers; this model needs rotary_dim/2 = {half} "
                                 f"(rotary_dim {rotary_dim})")
        return long, self.short_factors

    def attention(self, pretrain_length: int) -> float:
        """The factor on cos and sin: `attention_factor`, else sqrt(1 + ln s / ln L)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return scaling.longrope_attention_factor(self.scale, pretrain_length)

    def short_attention(self, pretrain_length: int) -> float:
        """The factor on cos and sin while the short factors are in use: `short_attention_factor`, else `attention`."""
        if self.short_attention_factor is not None:
            return float(self.short_attention_factor)
        return self.attention(pretrain_length)


def longrope_plan(config: LongRopeConfig, g: RopeGeometry) -> FrequencyPlan:
    long, short = config.factor_sets(g.rotary_dim)
    factor = config.attention(g.pretrain_length)
    long_freq = scaling.longrope_geometry_inv_freq(g, long)
    if short is None:
        return FrequencyPlan(original_inv_freq(g), lambda seq_len: (long_freq, factor), n_hat=config.n_hat)
    short_freq = scaling.longrope_geometry_inv_freq(g, short)
    short_factor = config.short_attention(g.pretrain_length)

    def switched(seq_len: int) -> tuple[torch.Tensor, float]:
        return (long_freq, factor) if seq_len > g.pretrain_length else (short_freq, short_factor)

    return FrequencyPlan(original_inv_freq(g), switched, lambda seq_len: seq_len > g.pretrain_length, config.n_hat,
                         True)


def longrope_parameters(config: LongRopeConfig, target: ExportTarget) -> dict[str, Any]:
    """Without short factors, short_factor = long_factor (never switching)."""
    long, short = config.factor_sets(target.rotary_dim)
    long = list(long)
    if config.short_attention(target.length) != config.attention(target.length):
        raise UserError("transformers' longrope has one attention_factor for both regimes; longrope with a "
                        "short_attention_factor other than attention_factor cannot be written as rope_parameters "
                        "(keep the lengthwise patch)")
    return {"rope_type": "longrope", "long_factor": long, "short_factor": list(short) if short is not None else long,
            "factor": float(config.scale), "original_max_position_embeddings": target.length,
            "attention_factor": config.attention(target.length)}


METHOD = RopeMethod("longrope", LongRopeConfig, longrope_plan, longrope_parameters,
                    "LongRoPE: per-dimension factors lambda_i (list or JSON file), start tokens < n_hat "
                    "un-interpolated, optional short/long switch.",
                    "Ding et al. 2024, LongRoPE, arXiv 2402.13753")
