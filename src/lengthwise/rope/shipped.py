"""How a RoPE method meets the scaling a model ships with (Llama 3.1-3.3 `llama3`, Qwen2.5 with `yarn`, gpt-oss `yarn`,
Phi-3-128k `longrope`, Gemma 3 `linear`, `dynamic`): composed by a stated rule, or refused by name. Never replaced
without a word.

- `shipped="compose"` (the default): a method of the shipped type composes with it. Its `factor` is relative to the
  shipped context: the shipped rope parameters are kept and their factor multiplied by the method's, so
  `yarn:factor=2` on a model shipping yarn factor 4 from 32768 runs yarn factor 8 from 32768 (twice the shipped
  context). Composable: a method whose row names the shipped type (`RopeMethod.shipped_type`: linear, yarn, llama3
  and dynamic-ntk, transformers' "dynamic"); the row also names the options taken from the shipped parameters. Any
  other option the user
  changed from its default is refused (the shipped value holds); a method of another type is refused, naming the
  shipped rope_type and the override.
- `shipped="replace"`: the method rescales the unscaled frequencies (rope_theta) instead, from the length the shipped
  scaling started from (its original_max_position_embeddings, else the context divided by its factor), unless
  original_max_position_embeddings is given. The shipped scaling is then not in force.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from lengthwise.errors import UserError

if TYPE_CHECKING:  # the method's row; its modules import this one
    from lengthwise.rope.method import RopeMethod

SHIPPED_HELP = ("on a model that ships scaled RoPE: 'compose' (the factor multiplies the shipped one: same rope type "
                "only) or 'replace' (rescale the unscaled frequencies from the shipped original length)")
SHIPPED_CHOICES = ("compose", "replace")
_FREE = ("factor", "shipped", "n_hat", "on_change")  # options the user may still set when composing


def check_shipped_option(method: str, value: Any) -> None:
    if value not in SHIPPED_CHOICES:
        raise UserError(f"{method} shipped must be one of {', '.join(SHIPPED_CHOICES)}, got {value!r}")


def _describe(params: dict) -> str:
    details = [f"factor {params['factor']:g}" if isinstance(params.get("factor"), (int, float)) else None,
               f"from {params['original_max_position_embeddings']}"
               if params.get("original_max_position_embeddings") else None]
    return f"rope_type {params.get('rope_type')!r} ({', '.join(d for d in details if d)})"


def original_length(params: dict, context: int) -> int:
    """The length a shipped scaling started from."""
    original = params.get("original_max_position_embeddings")
    if isinstance(original, int) and original > 1:
        return original
    factor = params.get("factor")
    return max(2, int(round(context / factor))) if isinstance(factor, (int, float)) and factor > 0 else context


def resolve_shipped(row: RopeMethod, config: Any, shipped: dict | None, context: int) -> Any:
    """The config the method of `row` really runs with on a model shipping `shipped` rope parameters (None:
    unscaled)."""
    method = row.name
    if shipped is None:
        return config
    if config.shipped == "replace":
        if config.original_max_position_embeddings is None:
            return dataclasses.replace(config, original_max_position_embeddings=original_length(shipped, context))
        return config
    shipped_type = shipped.get("rope_type")
    override = (f"pass shipped=replace to rescale the unscaled frequencies from "
                f"{original_length(shipped, context)} tokens instead (the shipped scaling is then not in force)")
    if row.shipped_type is None or row.shipped_type != shipped_type:
        raise UserError(f"{method!r} cannot compose with the model's own RoPE scaling, {_describe(shipped)}; "
                        f"{override}")
    unsupported = sorted(k for k in ("mscale", "mscale_all_dim", "attention_factor") if shipped.get(k) is not None)
    if unsupported:
        raise UserError(f"{method!r} cannot compose with the model's {_describe(shipped)}: it sets "
                        f"{', '.join(unsupported)}, whose value for another factor is not defined; {override}")
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    changed = sorted(name for name in defaults if name not in _FREE and getattr(config, name) != defaults[name])
    if changed:
        raise UserError(f"{method!r} composing with the model's {_describe(shipped)} takes "
                        f"{', '.join(changed)} from it; drop {'them' if len(changed) > 1 else 'it'}, or {override}")
    kept = {name: shipped[name] for name in row.shipped_kept if shipped.get(name) is not None}
    if row.shipped_needs_length and "original_max_position_embeddings" not in kept:
        kept["original_max_position_embeddings"] = original_length(shipped, context)
    return dataclasses.replace(config, factor=float(shipped.get("factor", 1.0)) * config.factor, **kept)
