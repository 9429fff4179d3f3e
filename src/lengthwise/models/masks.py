"""What mask the model builds for each layer, read from the mask function it hands transformers' mask interface.

transformers builds every attention mask through `AttentionMaskInterface`: the model's code picks, per layer type, a
mask function such as causal, causal with a sliding window, or chunked (`masking_utils`), and the registered
interface function turns it into whatever the attention implementation wants. lengthwise registers its own (the
attention then gets only the O(n) padding mask), so before dropping the mask function it reads what the function
says: `mask_window` evaluates it at a few (query, key) distances far from the start and returns the sliding window
(None: plain causal), or raises when the function is anything else (chunked, bidirectional, packed sequences, image
tokens...). The window travels with the mask tensor to the attention call (`tag` / `window_of`), so each layer is
served the window its own mask has, whatever its config or cache type says.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

FAR = 1 << 22  # query position the function is evaluated at: beyond any sliding window of a released model
SECOND = FAR + 977  # a second position, not a multiple of any chunk size, so that chunked masks show
_tagged: OrderedDict[int, tuple[torch.Tensor, int | None]] = OrderedDict()
_KEEP = 256  # masks remembered (each forward pass builds one or two; a held reference keeps its id unique)


class NotCausalWithWindow(ValueError):
    """The mask function is not causal attention with an optional sliding window."""


def _visible(mask_function, q: int, k: int) -> bool:
    zero = torch.tensor(0)
    return bool(mask_function(zero, zero, torch.tensor(q), torch.tensor(k)))


def _largest_visible_distance(mask_function, q: int) -> int:
    """The largest d with key q - d visible, by bisection (the visible distances must form [0, W))."""
    if _visible(mask_function, q, 0):
        return q
    lo, hi = 0, q  # visible at distance lo, hidden at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _visible(mask_function, q, q - mid) else (lo, mid)
    return lo


def mask_window(mask_function) -> int | None:
    """The sliding window of a causal mask function (keys at distance < window visible), None for plain causal."""
    try:
        if not _visible(mask_function, FAR, FAR) or _visible(mask_function, FAR, FAR + 1):
            raise NotCausalWithWindow("a query does not see itself, or sees a later key (not causal)")
        reach = [_largest_visible_distance(mask_function, q) for q in (FAR, SECOND)]
        window = None if reach[0] == FAR and reach[1] == SECOND else reach[0] + 1
        if window is not None and reach[1] + 1 != window:
            raise NotCausalWithWindow("the visible span depends on the query position (chunked attention?)")
        span = FAR if window is None else window
        for d in sorted({0, 1, span // 3, span // 2, span - 1}):  # inside the span: every distance visible
            if not _visible(mask_function, FAR, FAR - d):
                raise NotCausalWithWindow(f"a key at distance {d} inside the span is hidden")
    except NotCausalWithWindow:
        raise
    except Exception as err:  # noqa: BLE001 - a function over tensors of this call (padding, packed sequences...)
        raise NotCausalWithWindow(f"it depends on this call's data ({type(err).__name__})") from err
    return window


def tag(mask: torch.Tensor, window: int | str | None) -> torch.Tensor:
    """Remember the window of the mask function `mask` was built from (or why it has none); returns `mask`."""
    _tagged[id(mask)] = (mask, window)
    while len(_tagged) > _KEEP:
        _tagged.popitem(last=False)
    return mask


def window_of(mask) -> tuple[bool, int | str | None]:
    """(known, window) of a mask tensor an attention call received: known False when it did not come from
    lengthwise's mask interface function (the model built it itself)."""
    entry = _tagged.get(id(mask)) if isinstance(mask, torch.Tensor) else None
    if entry is None or entry[0] is not mask:
        return False, None
    return True, entry[1]
