"""Write a rope method's settings as a transformers-native `rope_parameters` dict, where transformers can express it.

    params = to_rope_parameters("yarn", YarnConfig(factor=4), model)
    config.rope_parameters = params   # a model built from this config computes what the patched model computes

What transformers cannot express raises a ValueError saying why: `n_hat > 0` (no start-token rule there), `logn`
(no query scale). `ntk` exports as the default rope with the NTK base (`rope_theta` = b s^(d/(d-2))): identical
frequencies. `dynamic-ntk` exports as transformers' "dynamic" type, which agrees on a fresh forward pass but keeps
the largest base it has seen and does not re-rotate cached keys (lengthwise's dynamic-ntk does both correctly).
`longrope` without short factors exports with short_factor = long_factor (never switching).

Each method's module (`lengthwise.rope.methods`) holds its export function, `(config, ExportTarget) -> entries to
set`; here is what they share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lengthwise.models.rotary import rotary_layout

_CARRIED = ("rope_theta", "partial_rotary_factor")  # base settings kept from the model's own rope_parameters
# methods of other roles that users may still try to export, and why they cannot be
NOT_EXPRESSIBLE = {"logn": "transformers has no log-n query scaling; logn cannot be written as rope_parameters"}


def base_rope_parameters(model_config) -> dict[str, Any]:
    """The model's own rope settings without any scaling: {"rope_type": "default", "rope_theta": b, ...}."""
    current = getattr(model_config, "rope_parameters", None) or {}
    params: dict[str, Any] = {"rope_type": "default"}
    params.update({k: current[k] for k in _CARRIED if k in current})
    params.setdefault("rope_theta", float(getattr(model_config, "rope_theta", 10000.0)))
    return params


@dataclass(frozen=True)
class ExportTarget:
    """The model an export is written for: the model (or its config), its unscaled rope settings, and L."""

    model_or_config: Any
    params: dict[str, Any]  # base_rope_parameters of the model
    length: int  # L: the config's original_max_position_embeddings, else the model's training length

    @property
    def model_config(self) -> Any:
        return getattr(self.model_or_config, "config", self.model_or_config)

    @property
    def rotary_dim(self) -> int:
        # read only by the exports that need it: a model without a rotary module can still export e.g. linear
        if hasattr(self.model_or_config, "config"):
            return rotary_layout(self.model_or_config).rotary_dim
        config = self.model_or_config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return int(head_dim * self.params.get("partial_rotary_factor", 1.0))
