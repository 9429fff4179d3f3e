"""`lm-infinite`: Λ-shaped attention with a distance limit (LM-Infinite, Han et al. 2023, arXiv 2308.16137)."""

from __future__ import annotations

from dataclasses import dataclass

from lengthwise.attention.install import install_lambda
from lengthwise.attention.middle import MiddleRetrieval
from lengthwise.attention.pattern import LambdaPattern
from lengthwise.models.families import model_info
from lengthwise.patching import Undo
from lengthwise.registry import option, register
from lengthwise.errors import UserError

KERNELS = ("blocked", "eager", "flex")
IMPL_HELP = "'blocked' (O(n) fast path), 'eager' (dense reference, for tests) or 'flex' (FlexAttention)"
BLOCK_HELP = "query rows per block of the fast path"


def check_positive(method: str, name: str, value, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
        kind = "a non-negative" if allow_zero else "a positive"
        raise UserError(f"{method} {name} must be {kind} integer, got {value!r}")


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
    # Attention to the middle (lengthwise.attention.middle); top_k = top_blocks = 0: plain Λ, bounded cache.
    top_k: int = option(0, "middle tokens each query and head adds (official code: --top_k_attention); 0: none")
    top_blocks: int = option(0, "or: middle blocks each query group and head adds (InfLLM-like block retrieval); "
                             "0: none")
    retrieval_block: int = option(128, "positions per middle block (top_blocks)")
    representatives: int = option(4, "bounding boxes scored per middle block (top_blocks)")
    query_group: int = option(64, "queries (by position // query_group) sharing one block selection (top_blocks)")
    middle_distance: int | None = option(None, "distance middle keys are scored at (official: --top_k_insert_at); "
                                         "default: n_local")
    middle_from_layer: int = option(0, "first layer that attends to the middle (official: --top_k_from_layer)")
    middle_to_layer: int | None = option(None, "one past the last layer that attends to the middle (official: "
                                         "--top_k_to_layer); default: all")
    middle_queries: str = option("all", "'all' queries, or only the 'last' of each forward call (as the official "
                                 "code) attend to the middle")
    middle_order: str = option("none", "'none': every middle key at middle_distance; 'kept' (top_blocks): the "
                               "selected blocks end to end in text order, the nearest key at middle_distance")

    def __post_init__(self) -> None:
        check_positive("lm-infinite", "n_global", self.n_global, allow_zero=True)
        check_positive("lm-infinite", "n_local", self.n_local)
        check_positive("lm-infinite", "distance_limit", self.distance_limit)
        check_kernel("lm-infinite", self.impl, self.block)
        for name in ("top_k", "top_blocks", "middle_from_layer"):
            check_positive("lm-infinite", name, getattr(self, name), allow_zero=True)
        for name in ("retrieval_block", "representatives", "query_group", "middle_distance", "middle_to_layer"):
            check_positive("lm-infinite", name, getattr(self, name))
        if self.impl == "flex" and (self.top_k or self.top_blocks):
            raise UserError("lm-infinite top_k/top_blocks run on impl 'blocked' or 'eager', not 'flex' (the "
                             "compiled CPU FlexAttention kernel returns no log-sum-exp to merge the middle with)")
        if self.top_k or self.top_blocks:
            try:
                self.middle(distance=1)
            except ValueError as error:
                raise UserError(f"lm-infinite {error}") from None
        if self.middle_to_layer is not None and self.middle_to_layer <= self.middle_from_layer:
            raise UserError(f"lm-infinite middle_to_layer ({self.middle_to_layer}) must exceed middle_from_layer "
                             f"({self.middle_from_layer})")
        if self.n_local and self.distance_limit and self.n_local > self.distance_limit:
            raise UserError(
                f"lm-infinite n_local ({self.n_local}) must not exceed distance_limit ({self.distance_limit}): "
                "local tokens keep their true distance, which must stay within the limit"
            )

    def middle(self, distance: int) -> MiddleRetrieval:
        return MiddleRetrieval(distance, self.top_k, self.top_blocks, self.retrieval_block, self.representatives,
                               self.query_group, self.middle_queries, self.middle_order)


def resolve(config: LMInfiniteConfig, pretrain_length: int) -> LambdaPattern:
    limit = config.distance_limit or pretrain_length
    n_local = config.n_local or min(pretrain_length, limit)
    if n_local > limit:
        raise UserError(
            f"lm-infinite n_local ({n_local}) must not exceed distance_limit ({limit}, the training length by "
            "default); pass distance_limit as well"
        )
    return LambdaPattern(config.n_global, n_local, limit, key_anchor="zero")


def resolve_middle(config: LMInfiniteConfig, pattern: LambdaPattern, num_layers: int):
    """(MiddleRetrieval, layers) of the config, or (None, range(0)) for plain Λ attention."""
    if not (config.top_k or config.top_blocks):
        return None, range(0)
    distance = config.middle_distance or pattern.n_local
    middle = config.middle(distance)
    if middle.farthest > pattern.limit:
        spread = f" + top_blocks x retrieval_block - 1 (middle_order 'kept') = {middle.farthest}" \
            if middle.order == "kept" else ""
        raise UserError(f"lm-infinite middle_distance ({distance}){spread} must not exceed distance_limit "
                         f"({pattern.limit}): middle keys must appear at a distance seen in training")
    if config.top_blocks and config.retrieval_block > pattern.n_local:
        raise UserError(f"lm-infinite retrieval_block ({config.retrieval_block}) must not exceed n_local "
                         f"({pattern.n_local})")
    if config.middle_from_layer >= num_layers:
        raise UserError(f"lm-infinite middle_from_layer ({config.middle_from_layer}) must be below the model's "
                         f"{num_layers} layers")
    last = min(config.middle_to_layer or num_layers, num_layers)
    return middle, range(config.middle_from_layer, last)


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
    middle, layers = resolve_middle(config, pattern, info.num_layers)
    return install_lambda(model, pattern, "lm-infinite", config.impl, config.block, middle, layers)
