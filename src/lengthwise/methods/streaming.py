"""`streaming`: attention sinks + rolling cache with positions re-indexed inside the cache (StreamingLLM).

The cache holds `n_sink` sink tokens and the last `window` tokens; positions are those inside the cache. Local
distances are unchanged by re-indexing (the window is contiguous); a sink at position n seen by a query once the
cache is full sits at distance n_sink + window - 1 - n. That is the Λ pattern with a per-key distance cap, so it
shares the kernel and the bounded cache with `lm-infinite` (key_anchor "self").
"""

from __future__ import annotations

from dataclasses import dataclass

from lengthwise.attention.install import install_lambda
from lengthwise.attention.pattern import LambdaPattern
from lengthwise.methods.lm_infinite import BLOCK_HELP, IMPL_HELP, check_kernel
from lengthwise.models.families import model_info
from lengthwise.patching import Undo
from lengthwise.registry import check_positive, option, register
from lengthwise.errors import UserError


@dataclass(frozen=True)
class StreamingConfig:
    n_sink: int = option(4, "attention-sink tokens kept at the start of the cache")
    window: int | None = option(None, "recent tokens kept (the query itself included); default: training length "
                                "- n_sink")
    impl: str = option("blocked", IMPL_HELP)
    block: int = option(256, BLOCK_HELP)

    def __post_init__(self) -> None:
        check_positive("streaming", "n_sink", self.n_sink, allow_zero=True)
        check_positive("streaming", "window", self.window)
        check_kernel("streaming", self.impl, self.block)


def resolve(config: StreamingConfig, pretrain_length: int) -> LambdaPattern:
    window = config.window or pretrain_length - config.n_sink
    if window < 1:
        raise UserError(f"streaming n_sink ({config.n_sink}) leaves no room for a window in {pretrain_length} tokens")
    return LambdaPattern(config.n_sink, window, config.n_sink + window - 1, key_anchor="self")


@register(
    "streaming",
    StreamingConfig,
    role="attention",
    summary="StreamingLLM baseline: n_sink attention sinks + a rolling window, positions re-indexed inside the "
    "cache (between steps it keeps n_sink + window tokens; its buffer holds at most n_sink + window + "
    "window//8 spare slots + the chunk being fed).",
    paper="arXiv 2309.17453",
    encodings=("rope", "alibi"),
    composable_with=("rope", "query-scale"),
)
def apply_streaming(model, config: StreamingConfig) -> Undo:
    pattern = resolve(config, model_info(model).pretrain_length)
    return install_lambda(model, pattern, "streaming", config.impl, config.block)
