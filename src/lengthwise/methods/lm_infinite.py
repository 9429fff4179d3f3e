"""`lm-infinite`: Λ-shaped attention with a distance limit (LM-Infinite, Han et al. 2023, arXiv 2308.16137)."""

from __future__ import annotations

from dataclasses import dataclass

from lengthwise.attention.install import install_lambda
from lengthwise.attention.pattern import LambdaPattern
from lengthwise.errors import UserError
from lengthwise.methods.middle import MiddleConfig
from lengthwise.models.families import model_info
from lengthwise.patching import Undo
from lengthwise.registry import check_positive, option, option_group, register

KERNELS = ("blocked", "eager", "flex")
IMPL_HELP = "'blocked' (O(n) fast path), 'eager' (dense reference, for tests) or 'flex' (FlexAttention)"
BLOCK_HELP = "query rows per block of the fast path"


def check_kernel(method: str, impl: str, block) -> None:
    if impl not in KERNELS:
        raise UserError(f"{method} impl must be one of {', '.join(KERNELS)}, got {impl!r}")
    check_positive(method, "block", block)


@dataclass(frozen=True)
class LMInfiniteConfig:
    n_global: int = option(10, "first tokens every query sees")
    n_local: int | None = option(None, "last tokens every query sees (itself included); default: the training "
                                 "length")
    distance_limit: int | None = option(None, "largest distance a global token appears at; default: the training "
                                        "length")
    impl: str = option("blocked", IMPL_HELP)
    block: int = option(256, BLOCK_HELP)
    middle: MiddleConfig = option_group(MiddleConfig, "attention to the middle (lengthwise.methods.middle)")

    def __post_init__(self) -> None:
        check_positive("lm-infinite", "n_global", self.n_global, allow_zero=True)
        check_positive("lm-infinite", "n_local", self.n_local)
        check_positive("lm-infinite", "distance_limit", self.distance_limit)
        check_kernel("lm-infinite", self.impl, self.block)
        if self.impl == "flex" and self.middle.enabled:
            raise UserError("lm-infinite top_k/top_blocks run on impl 'blocked' or 'eager', not 'flex' (the "
                            "compiled CPU FlexAttention kernel returns no log-sum-exp to merge the middle with)")
        if self.n_local and self.distance_limit and self.n_local > self.distance_limit:
            raise UserError(
                f"lm-infinite n_local ({self.n_local}) must not exceed distance_limit ({self.distance_limit}): "
                "local tokens keep their true distance, which must stay within the limit"
            )


def resolve(config: LMInfiniteConfig, pretrain_length: int) -> LambdaPattern:
    limit = config.distance_limit or pretrain_length
    n_local = config.n_local or min(pretrain_length, limit)
    if n_local > limit:
        raise UserError(
            f"lm-infinite n_local ({n_local}) must not exceed distance_limit ({limit}, the training length by "
            "default); pass distance_limit as well"
        )
    return LambdaPattern(config.n_global, n_local, limit, key_anchor="zero")


@register(
    "lm-infinite",
    LMInfiniteConfig,
    role="attention",
    summary="Λ-shaped attention: each query sees the first n_global and the last n_local tokens; global tokens "
    "appear at distance min(d, distance_limit). O(n) prefill, bounded KV cache in generate(). Optionally the top_k "
    "middle tokens or top_blocks middle blocks at a fixed distance (the middle is then kept in the cache).",
    paper="arXiv 2308.16137",
    encodings=("rope", "alibi"),
    composable_with=("rope", "query-scale"),
)
def apply_lm_infinite(model, config: LMInfiniteConfig) -> Undo:
    info = model_info(model)
    pattern = resolve(config, info.pretrain_length)
    middle, layers = config.middle.resolve(pattern, info.num_layers)
    return install_lambda(model, pattern, "lm-infinite", config.impl, config.block, middle, layers)
