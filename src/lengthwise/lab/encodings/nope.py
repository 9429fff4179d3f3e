"""NoPE: no position encoding at all; a causal decoder can still infer order from the mask
(Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length Generalization in Transformers")."""

from __future__ import annotations

from dataclasses import dataclass

from lengthwise.lab.encodings.base import PositionEncoding


@dataclass(frozen=True)
class NoPEConfig:
    pass


class NoPE(PositionEncoding):
    name = "nope"

    def __init__(self, heads, head_dim, d_model, train_length, config: NoPEConfig = NoPEConfig()):
        super().__init__(heads, head_dim, d_model, train_length)
        self.config = config
