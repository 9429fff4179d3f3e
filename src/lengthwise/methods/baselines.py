"""Reference entries: the unpatched model and the sliding-window scoring baseline."""

from __future__ import annotations

from dataclasses import dataclass

from lengthwise.patching import Undo
from lengthwise.registry import get_method, option, parse_method_spec, register
from lengthwise.errors import UserError


@dataclass(frozen=True)
class VanillaConfig:
    pass


@register(
    "vanilla",
    VanillaConfig,
    role="none",
    summary="The unpatched model: full causal attention at every length (fails past the training length).",
    encodings=("rope", "alibi", "other"),  # changes nothing, so any model (e.g. the PE lab's) may use it
)
def apply_vanilla(model, config: VanillaConfig) -> Undo:
    return Undo()


@dataclass(frozen=True)
class SlidingWindowConfig:
    window: int | None = option(None, "tokens of context per scored token; default: the training length")
    stride: int | None = option(None, "tokens scored per window; default: window // 8")

    def __post_init__(self) -> None:
        for name in ("window", "stride"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"sliding-window {name} must be a positive integer, got {value!r}")
        if self.window and self.stride and self.stride > self.window:
            raise UserError(f"sliding-window stride ({self.stride}) must not exceed window ({self.window})")


@register(
    "sliding-window",
    SlidingWindowConfig,
    role="scoring",
    summary="Baseline: every token is scored (or generated) by recomputing the model over the previous "
    "`window` tokens, so the model never leaves its training length. The fluency reference.",
    encodings=("rope", "alibi", "other"),  # a scoring strategy: works on any causal LM
)
def apply_sliding_window(model, config: SlidingWindowConfig) -> Undo:
    return Undo()  # a scoring strategy: evaluation code reads the config, the model stays as it is


@dataclass(frozen=True)
class WindowSetting:
    """What a sliding-window spec means on one model: its defaults resolved (here only)."""

    window: int
    stride: int

    def describe(self) -> list[dict]:
        return [{"method": "sliding-window", "window": self.window, "stride": self.stride}]


def resolve_sliding_window(spec: str, pretrain_length: int) -> WindowSetting:
    """`window` defaults to the training length, `stride` to window // 8."""
    name, options = parse_method_spec(spec)[0]
    config = get_method(name).make_config(**options)
    window = config.window or pretrain_length
    return WindowSetting(window, config.stride or max(1, window // 8))
