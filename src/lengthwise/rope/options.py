"""What the RoPE rescaling methods' configs share: help texts and checks of their common options.

Each method's config (`lengthwise.rope.methods`) is a frozen dataclass whose fields carry their help text
(`lengthwise methods NAME` and docs/methods.md show it); `__post_init__` refuses bad values with a message naming the
method and the option, before any model is touched.
"""

from __future__ import annotations

from typing import Any

from lengthwise.errors import UserError
from lengthwise.rope.shipped import check_shipped_option

# help shared by every method of the family
N_HAT_HELP = "positions < n_hat keep the original frequencies (LongRoPE's un-interpolated start tokens)"
LENGTH_HELP = "L, the training length the formulas scale from; default: the model's (max_position_embeddings)"
ON_CHANGE_HELP = ("when the frequencies change while a KV cache holds entries: 'rebuild' recomputes the cache "
                  "(exact), 'rerotate' only re-rotates the cached keys (cheap, approximate past the first layer)")


def check_factor(name: str, value: Any, minimum: float = 1.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise UserError(f"{name} must be a number >= {minimum:g}, got {value!r}")


def check_common(method: str, config: Any) -> None:
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


def check_on_change(method: str, value: Any) -> None:
    if value not in ("rebuild", "rerotate"):
        raise UserError(f"{method} on_change must be 'rebuild' or 'rerotate', got {value!r}")
