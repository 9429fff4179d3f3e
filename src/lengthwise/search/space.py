"""The LongRoPE search space: candidates, bounds, grid, and the PI / NTK / YaRN seeds (pure functions).

A candidate is one rescale factor λ_i per rotary pair (θ'_i = θ_i / λ_i) plus `n_hat`, the number of start tokens
kept at the original θ. Factors live on a 0.01 grid, so they are stored as integers in hundredths: equality (and so
duplicate rejection and determinism) is exact, with no float noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from lengthwise.errors import UserError
from lengthwise.rope.scaling import RopeGeometry, base_inv_freq, ntk_inv_freq, yarn_inv_freq

# Paper's n_hat choices (LongRoPE §3.2); values past the target length are dropped by SearchSpace.
PAPER_N_HAT = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
GRID = 100  # factors are multiples of 1/GRID = 0.01


@dataclass(frozen=True, order=True)
class Candidate:
    factors: tuple[int, ...]  # λ_i * 100, one per rotary pair (d/2,), non-decreasing
    n_hat: int = 0

    @property
    def lambdas(self) -> list[float]:
        return [f / GRID for f in self.factors]

    def to_json(self) -> dict:
        return {"factors": self.lambdas, "n_hat": self.n_hat}

    @classmethod
    def from_json(cls, obj: dict) -> Candidate:
        return cls(tuple(round(float(f) * GRID) for f in obj["factors"]), int(obj.get("n_hat", 0)))


@dataclass(frozen=True)
class SearchSpace:
    """Where candidates may live: `num_factors` factors in [low, high] (hundredths), n_hat in `n_hat_choices`."""

    num_factors: int  # d/2 rotary pairs
    scale: float  # s = target length / pretraining length
    low: int = GRID  # λ >= 1
    high: int | None = None  # default: floor(1.25 * s * 100)
    n_hat_choices: tuple[int, ...] = PAPER_N_HAT

    def __post_init__(self) -> None:
        if self.num_factors < 1:
            raise UserError(f"num_factors must be >= 1, got {self.num_factors}")
        if not self.scale >= 1.0:
            raise UserError(f"scale s must be >= 1 (target length >= pretraining length), got {self.scale}")
        if self.high is None:
            object.__setattr__(self, "high", max(self.low, math.floor(1.25 * self.scale * GRID + 1e-9)))
        if self.high < self.low:
            raise UserError(f"factor ceiling {self.high / GRID} is below the floor {self.low / GRID}")
        if not self.n_hat_choices:
            raise UserError("n_hat_choices must not be empty")

    def is_valid(self, c: Candidate) -> bool:
        """Right length, inside [low, high], non-decreasing, n_hat among the choices."""
        f = c.factors
        return (
            len(f) == self.num_factors
            and all(self.low <= x <= self.high for x in f)
            and all(a <= b for a, b in zip(f, f[1:]))
            and c.n_hat in self.n_hat_choices
        )

    def snap(self, lambdas: list[float], n_hat: int = 0) -> Candidate:
        """Round floats onto the grid, clip into bounds, and make non-decreasing (running max)."""
        if len(lambdas) != self.num_factors:
            raise UserError(f"expected {self.num_factors} factors (one per rotary pair), got {len(lambdas)}")
        out, running = [], self.low
        for lam in lambdas:
            value = min(self.high, max(self.low, round(float(lam) * GRID)))
            running = max(running, value)
            out.append(running)
        n_hat = min(self.n_hat_choices, key=lambda n: (abs(n - n_hat), n))
        return Candidate(tuple(out), n_hat)


def pi_factors(num_factors: int, scale: float) -> list[float]:
    """Position interpolation: every λ_i = s."""
    return [float(scale)] * num_factors


def _ratio(inv_freq_and_factor, rotary_dim: int, base: float) -> list[float]:
    inv_freq, _ = inv_freq_and_factor
    return (base_inv_freq(rotary_dim, base).double() / inv_freq.double()).tolist()  # λ_i = θ_i / θ'_i


def ntk_factors(num_factors: int, scale: float, base: float = 10000.0, pretrain_length: int = 2) -> list[float]:
    """NTK-aware base b' = b·s^(d/(d-2)) as per-pair factors: λ_i = s^(2i/(d-2)); λ_0 = 1, λ_last = s."""

    g = RopeGeometry(2 * num_factors, base, pretrain_length)
    return _ratio(ntk_inv_freq(g, scale), g.rotary_dim, base)


def yarn_factors(num_factors: int, scale: float, pretrain_length: int, base: float) -> list[float]:
    """YaRN's ramp as per-pair factors: θ'_i = (θ_i/s)·r_i + θ_i·(1-r_i), so λ_i = 1 / (r_i/s + 1 - r_i).

    Frequencies from `lengthwise.rope.scaling.yarn_inv_freq` (β_fast 32, β_slow 1); its attention factor is not
    part of the factors.
    """

    g = RopeGeometry(2 * num_factors, base, pretrain_length)
    return _ratio(yarn_inv_freq(g, scale), g.rotary_dim, base)


def seed_candidates(space: SearchSpace, pretrain_length: int, base: float) -> list[Candidate]:
    """PI, NTK and YaRN at the space's scale, snapped onto the grid (n_hat = 0), duplicates dropped, order kept."""
    n, s = space.num_factors, space.scale
    seeds = [
        space.snap(pi_factors(n, s)),
        space.snap(ntk_factors(n, s, base, pretrain_length)),
        space.snap(yarn_factors(n, s, pretrain_length, base)),
    ]
    return list(dict.fromkeys(seeds))


def rescale_candidate(c: Candidate, old_scale: float, space: SearchSpace) -> Candidate:
    """Progressive extension: a result found at scale s0 seeds a search at s1 with λ_i·s1/s0 (snapped, clipped)."""
    if old_scale <= 0:
        raise UserError(f"the previous result's scale must be positive, got {old_scale}")
    ratio = space.scale / old_scale
    return space.snap([lam * ratio for lam in c.lambdas], c.n_hat)


