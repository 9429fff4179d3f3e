"""The options of the RoPE rescaling methods (linear, ntk, dynamic-ntk, yarn, llama3, longrope) as frozen dataclasses.

Each field carries its help text (`lengthwise methods NAME` and docs/methods.md show it); `__post_init__` refuses
bad values with a message naming the method and the option, before any model is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lengthwise.registry import option
from lengthwise.rope.factors import resolve_factors
from lengthwise.rope.scaling import longrope_attention_factor
from lengthwise.rope.shipped import SHIPPED_HELP, check_shipped_option
from lengthwise.errors import UserError

# help shared by every method of the family
N_HAT_HELP = "positions < n_hat keep the original frequencies (LongRoPE's un-interpolated start tokens)"
LENGTH_HELP = "L, the training length the formulas scale from; default: the model's (max_position_embeddings)"
ON_CHANGE_HELP = ("when the frequencies change while a KV cache holds entries: 'rebuild' recomputes the cache "
                  "(exact), 'rerotate' only re-rotates the cached keys (cheap, approximate past the first layer)")


def _check_factor(name: str, value: Any, minimum: float = 1.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise UserError(f"{name} must be a number >= {minimum:g}, got {value!r}")


def _check_common(method: str, config: Any) -> None:
    if isinstance(config.n_hat, bool) or not isinstance(config.n_hat, int) or config.n_hat < 0:
        raise UserError(f"{method} n_hat must be an integer >= 0 (start tokens kept un-interpolated), "
                         f"got {config.n_hat!r}")
    check_shipped_option(method, config.shipped)
    length = config.original_max_position_embeddings
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 2):
        raise UserError(
            f"{method} original_max_position_embeddings must be an integer >= 2 (default: the model's training "
            f"length), got {length!r}"
        )


def _check_on_change(method: str, value: Any) -> None:
    if value not in ("rebuild", "rerotate"):
        raise UserError(f"{method} on_change must be 'rebuild' or 'rerotate', got {value!r}")


@dataclass(frozen=True)
class LinearConfig:
    factor: float = option(4.0, "s: every frequency divided by s, i.e. position p is read as p / s")
    n_hat: int = option(0, N_HAT_HELP)
    original_max_position_embeddings: int | None = option(None, LENGTH_HELP)
    shipped: str = option("compose", SHIPPED_HELP)

    def __post_init__(self) -> None:
        _check_factor("linear factor", self.factor)
        _check_common("linear", self)


@dataclass(frozen=True)
class NtkConfig:
    factor: float = option(4.0, "s: rope base b' = b * s^(d/(d-2)); the lowest frequency is divided by s")
    n_hat: int = option(0, N_HAT_HELP)
    original_max_position_embeddings: int | None = option(None, LENGTH_HELP)
    shipped: str = option("compose", SHIPPED_HELP)

    def __post_init__(self) -> None:
        _check_factor("ntk factor", self.factor)
        _check_common("ntk", self)


@dataclass(frozen=True)
class DynamicNtkConfig:
    factor: float = option(1.0, "s in b' = b((s n/L) - (s-1))^(d/(d-2)), n the current length; s = 1 scales the "
                           "base for exactly n/L")
    n_hat: int = option(0, N_HAT_HELP)
    original_max_position_embeddings: int | None = option(None, LENGTH_HELP)
    shipped: str = option("compose", SHIPPED_HELP)
    on_change: str = option("rebuild", ON_CHANGE_HELP)

    def __post_init__(self) -> None:
        _check_factor("dynamic-ntk factor", self.factor)
        _check_on_change("dynamic-ntk", self.on_change)
        _check_common("dynamic-ntk", self)


@dataclass(frozen=True)
class YarnConfig:
    factor: float = option(4.0, "s: the slowest dims are divided by s, the fastest kept, a ramp between")
    beta_fast: float = option(32.0, "dims rotating more than beta_fast times in L keep their frequency")
    beta_slow: float = option(1.0, "dims rotating fewer than beta_slow times in L are divided by s")
    attention_factor: float | None = option(None, "multiplies cos and sin; default 0.1 ln s + 1")
    truncate: bool = option(True, "round the ramp ends to whole dims (transformers' default)")
    n_hat: int = option(0, N_HAT_HELP)
    original_max_position_embeddings: int | None = option(None, LENGTH_HELP)
    shipped: str = option("compose", SHIPPED_HELP)

    def __post_init__(self) -> None:
        _check_factor("yarn factor", self.factor)
        _check_factor("yarn beta_slow", self.beta_slow, 1e-9)
        if not isinstance(self.beta_fast, (int, float)) or self.beta_fast <= self.beta_slow:
            raise UserError(f"yarn beta_fast must exceed beta_slow ({self.beta_slow}), got {self.beta_fast!r}")
        if self.attention_factor is not None:
            _check_factor("yarn attention_factor", self.attention_factor, 1e-9)
        if not isinstance(self.truncate, bool):
            raise UserError(f"yarn truncate must be true or false, got {self.truncate!r}")
        _check_common("yarn", self)


@dataclass(frozen=True)
class Llama3Config:
    factor: float = option(4.0, "s: long wavelengths are divided by s")
    low_freq_factor: float = option(1.0, "wavelengths longer than L / low_freq_factor are divided by s")
    high_freq_factor: float = option(4.0, "wavelengths shorter than L / high_freq_factor are kept")
    n_hat: int = option(0, N_HAT_HELP)
    original_max_position_embeddings: int | None = option(None, LENGTH_HELP)
    shipped: str = option("compose", SHIPPED_HELP)

    def __post_init__(self) -> None:
        _check_factor("llama3 factor", self.factor)
        _check_factor("llama3 low_freq_factor", self.low_freq_factor, 1e-9)
        if not isinstance(self.high_freq_factor, (int, float)) or self.high_freq_factor <= self.low_freq_factor:
            raise UserError(f"llama3 high_freq_factor must exceed low_freq_factor ({self.low_freq_factor}), "
                             f"got {self.high_freq_factor!r}")
        _check_common("llama3", self)


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
        _check_on_change("longrope", self.on_change)
        if self.short_attention_factor is not None:
            _check_factor("longrope short_attention_factor", self.short_attention_factor, 1e-9)
            if self.short_factors is None:
                raise UserError("longrope short_attention_factor applies with short_factors (the regime <= L); "
                                 "give short_factors too")
        source = next((v for v in (self.long_factors, self.short_factors) if isinstance(v, str)), None)
        long = resolve_factors(self.long_factors, "long", "longrope long_factors")
        short = resolve_factors(self.short_factors, "short", "longrope short_factors")
        if self.factor is not None:
            _check_factor("longrope factor", self.factor)
        if self.attention_factor is not None:
            _check_factor("longrope attention_factor", self.attention_factor, 1e-9)
        if long is not None and short is not None and len(long) != len(short):
            raise UserError(f"longrope long_factors ({len(long)}) and short_factors ({len(short)}) differ in length")
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
        return longrope_attention_factor(self.scale, pretrain_length)

    def short_attention(self, pretrain_length: int) -> float:
        """The factor on cos and sin while the short factors are in use: `short_attention_factor`, else `attention`."""
        if self.short_attention_factor is not None:
            return float(self.short_attention_factor)
        return self.attention(pretrain_length)
