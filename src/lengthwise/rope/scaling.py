"""RoPE rescaling as pure functions: (geometry, options) -> (inverse frequencies, attention factor).

Notation (DESIGN.md): d = rotary dim, b = rope base, theta_i = b^(-2i/d), L = pretraining length, s = scale factor.
Every function returns `(inv_freq (d/2,) float32, attention_factor float)`; the attention factor multiplies cos and sin
(so the q.k logits of rotary dims scale by its square), as transformers does.

The arithmetic follows transformers' `ROPE_INIT_FUNCTIONS` operation for operation (float32 powers of a Python-float
base), so where both implement a method the values are equal, not merely close; tests/test_rope_scaling.py checks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from lengthwise.errors import UserError


@dataclass(frozen=True)
class RopeGeometry:
    """What the formulas need to know about a model."""

    rotary_dim: int  # d: rotated dimensions per head (head_dim * partial_rotary_factor)
    base: float  # b: rope theta
    pretrain_length: int  # L: training context length

    def __post_init__(self) -> None:
        if self.rotary_dim < 4 or self.rotary_dim % 2:
            raise UserError(f"rotary_dim must be an even number >= 4, got {self.rotary_dim}")
        if self.base <= 1:
            raise UserError(f"rope base must be > 1, got {self.base}")
        if self.pretrain_length < 1:
            raise UserError(f"pretrain_length must be positive, got {self.pretrain_length}")


def _exponents(rotary_dim: int) -> torch.Tensor:
    """2i/d for i = 0..d/2-1, float32 (the same tensor transformers builds); shape (d/2,)."""
    return torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim


def frequency_gap(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Largest relative difference of `other` inverse frequencies from `reference` (inf when the shapes differ): the
    one measure every check that two rotations agree uses."""
    reference, other = reference.double().cpu(), other.double().cpu()
    if reference.shape != other.shape:
        return math.inf
    return float(((other - reference).abs() / reference.abs()).max())


def base_powers(rotary_dim: int, base: float) -> torch.Tensor:
    """1 / theta_i = b^(2i/d); shape (d/2,), float32. YaRN and LongRoPE divide by it (not multiply by theta_i),
    as transformers does, so their values round the same way."""
    return base ** _exponents(rotary_dim)


def base_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """theta_i = b^(-2i/d); shape (d/2,), float32. The one definition of the unscaled frequencies."""
    return 1.0 / base_powers(rotary_dim, base)


def linear_inv_freq(g: RopeGeometry, factor: float) -> tuple[torch.Tensor, float]:
    """Position interpolation (PI): theta_i / s, i.e. position p is read as p / s."""
    inv_freq = base_inv_freq(g.rotary_dim, g.base)
    inv_freq /= factor
    return inv_freq, 1.0


def ntk_base(g: RopeGeometry, factor: float) -> float:
    """NTK-aware base b' = b * s^(d/(d-2)): the lowest frequency is interpolated by s, the highest kept."""
    return g.base * factor ** (g.rotary_dim / (g.rotary_dim - 2))


def ntk_inv_freq(g: RopeGeometry, factor: float) -> tuple[torch.Tensor, float]:
    return base_inv_freq(g.rotary_dim, ntk_base(g, factor)), 1.0


def dynamic_ntk_base(g: RopeGeometry, factor: float, seq_len: int) -> float:
    """b' = b * ((s*n/L) - (s-1))^(d/(d-2)) with n = max(current length, L): no change inside the training length."""
    n = max(int(seq_len), g.pretrain_length)
    return g.base * ((factor * n / g.pretrain_length) - (factor - 1)) ** (g.rotary_dim / (g.rotary_dim - 2))


def dynamic_ntk_inv_freq(g: RopeGeometry, factor: float, seq_len: int) -> tuple[torch.Tensor, float]:
    return base_inv_freq(g.rotary_dim, dynamic_ntk_base(g, factor, seq_len)), 1.0


def yarn_correction_dim(num_rotations: float, rotary_dim: int, base: float, length: int) -> float:
    """d(r) = d * ln(L / (2 pi r)) / (2 ln b): the (fractional) dim index whose wavelength fits r times in L."""
    return rotary_dim * math.log(length / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(g: RopeGeometry, beta_fast: float, beta_slow: float,
                          truncate: bool = True) -> tuple[float, float]:
    """(low, high) dim indices: below `low` dims extrapolate (keep theta), above `high` they interpolate (theta/s)."""
    low = yarn_correction_dim(beta_fast, g.rotary_dim, g.base, g.pretrain_length)
    high = yarn_correction_dim(beta_slow, g.rotary_dim, g.base, g.pretrain_length)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, g.rotary_dim - 1)


def yarn_ramp(low: float, high: float, n: int) -> torch.Tensor:
    """ramp_i = clamp((i - low) / (high - low), 0, 1) for i = 0..n-1; shape (n,). 0: extrapolate, 1: interpolate."""
    if low == high:
        high += 0.001  # a single-dim ramp would divide by zero
    return torch.clamp((torch.arange(n, dtype=torch.float32) - low) / (high - low), 0, 1)


def yarn_attention_factor(factor: float) -> float:
    """0.1 ln s + 1 (the YaRN paper's fit of the temperature sqrt(1/t)); 1 for s <= 1."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_inv_freq(g: RopeGeometry, factor: float, beta_fast: float = 32.0, beta_slow: float = 1.0,
                  attention_factor: float | None = None, truncate: bool = True) -> tuple[torch.Tensor, float]:
    """theta'_i = (theta_i / s) * ramp_i + theta_i * (1 - ramp_i); attention factor 0.1 ln s + 1 unless given."""
    pos_freqs = base_powers(g.rotary_dim, g.base)  # 1/theta_i, (d/2,)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    low, high = yarn_correction_range(g, beta_fast, beta_slow, truncate)
    keep = 1 - yarn_ramp(low, high, g.rotary_dim // 2)  # weight of the original frequency
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq, yarn_attention_factor(factor) if attention_factor is None else float(attention_factor)


def llama3_inv_freq(g: RopeGeometry, factor: float, low_freq_factor: float = 1.0,
                    high_freq_factor: float = 4.0) -> tuple[torch.Tensor, float]:
    """Llama 3.1: wavelengths longer than L/low_freq_factor are divided by s, shorter than L/high_freq_factor kept,
    and the band between is interpolated smoothly in 1/wavelength."""
    inv_freq = base_inv_freq(g.rotary_dim, g.base)
    length = g.pretrain_length
    low_freq_wavelen, high_freq_wavelen = length / low_freq_factor, length / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (length / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def longrope_attention_factor(factor: float, pretrain_length: int) -> float:
    """sqrt(1 + ln s / ln L); 1 for s <= 1."""
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(pretrain_length))


def longrope_inv_freq(base_inv_freq: torch.Tensor, factors) -> torch.Tensor:
    """theta'_i = theta_i / lambda_i. base_inv_freq (d/2,), factors: d/2 positive numbers -> (d/2,) float32.

    Equal to transformers' longrope values up to float32 rounding (1e-7 relative); `longrope_geometry_inv_freq`
    reproduces them bit for bit from (d, b).
    """
    lam = torch.as_tensor(factors, dtype=torch.float32)
    if lam.shape != base_inv_freq.shape:
        raise UserError(
            f"LongRoPE needs one factor per rotary frequency: expected {base_inv_freq.shape[0]} (rotary_dim/2), "
            f"got {lam.numel()}"
        )
    if not bool((lam > 0).all()):
        raise UserError(f"LongRoPE factors must be positive, got min {lam.min().item()}")
    return 1.0 / (lam * (1.0 / base_inv_freq.float()))


def longrope_geometry_inv_freq(g: RopeGeometry, factors) -> torch.Tensor:
    """LongRoPE frequencies from the geometry, computed exactly as transformers: 1 / (lambda_i * b^(2i/d))."""
    lam = torch.as_tensor(factors, dtype=torch.float32)
    if lam.shape != (g.rotary_dim // 2,):
        raise UserError(f"LongRoPE needs one factor per rotary frequency: expected {g.rotary_dim // 2} "
                         f"(rotary_dim/2), got {lam.numel()}")
    return 1.0 / (lam * base_powers(g.rotary_dim, g.base))


def logn_scale(positions: torch.Tensor, pretrain_length: int) -> torch.Tensor:
    """max(1, log(p+1)/log(L)) for 0-based positions p (any shape) -> same shape, float32."""
    if pretrain_length < 2:
        raise UserError(f"log-n scaling needs a training length >= 2, got {pretrain_length}")
    p = positions.to(torch.float32)
    return torch.clamp(torch.log(p + 1) / math.log(pretrain_length), min=1.0)
