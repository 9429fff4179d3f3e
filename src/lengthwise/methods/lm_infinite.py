"""`lm-infinite`: Λ-shaped attention with a distance limit (LM-Infinite, seed 000)."""

from __future__ import annotations

from dataclasses import dataclass

from lengthwise.attention.install import install_lambda
from lengthwise.attention.pattern import LambdaPattern
from lengthwise.models.families import model_info
from lengthwise.patching import Undo
from lengthwise.registry import register

KERNELS = ("blocked", "eager")


def check_positive(method: str, name: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{method} {name} must be {kind} integer, got {value!r}")


def check_kernel(method: str, impl: str, block) -> None:
    if impl not in KERNELS:
        raise ValueError(f"{method} impl must be one of {', '.join(KERNELS)}, got {impl!r}")
    check_positive(method, "block", block)


@dataclass(frozen=True)
class LMInfiniteConfig:
    n_global: int = 10  # first tokens every query sees
    n_local: int | None = None  # last tokens every query sees (itself included); default: the training length
    distance_limit: int | None = None  # largest distance a global token appears at; default: the training length
    impl: str = "blocked"  # "blocked" (O(n) fast path) | "eager" (dense reference, tests only)
    block: int = 256  # query rows per block of the fast path

    def __post_init__(self) -> None:
        check_positive("lm-infinite", "n_global", self.n_global, allow_zero=True)
        check_positive("lm-infinite", "n_local", self.n_local)
        check_positive("lm-infinite", "distance_limit", self.distance_limit)
        check_kernel("lm-infinite", self.impl, self.block)
        if self.n_local and self.distance_limit and self.n_local > self.distance_limit:
            raise ValueError(
                f"lm-infinite n_local ({self.n_local}) must not exceed distance_limit ({self.distance_limit}): "
                "local tokens keep their true distance, which must stay within the limit"
            )


def resolve(config: LMInfiniteConfig, pretrain_length: int) -> LambdaPattern:
    limit = config.distance_limit or pretrain_length
    n_local = config.n_local or min(pretrain_length, limit)
    if n_local > limit:
        raise ValueError(
            f"lm-infinite n_local ({n_local}) must not exceed distance_limit ({limit}, the training length by "
            "default); pass distance_limit as well"
        )
    return LambdaPattern(config.n_global, n_local, limit, key_anchor="zero")


@register(
    "lm-infinite",
    LMInfiniteConfig,
    role="attention",
    summary="Λ-shaped attention: each query sees the first n_global and the last n_local tokens; global tokens "
    "appear at distance min(d, distance_limit). O(n) prefill, bounded KV cache in generate().",
    paper="arXiv 2308.16137",
    encodings=("rope", "alibi"),
    composable_with=("rope", "query-scale"),
)
def apply_lm_infinite(model, config: LMInfiniteConfig) -> Undo:
    pattern = resolve(config, model_info(model).pretrain_length)
    return install_lambda(model, pattern, "lm-infinite", config.impl, config.block)
