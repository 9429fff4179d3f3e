"""Cost accounting: tokens processed, attention pairs, analytic FLOPs and wall time of a session.

Analytic FLOPs (multiply-add = 2 FLOPs):
- forward, per token: 2 * P_linear (every linear weight, output head included; embedding lookups are free)
  + 2 * P_lora (the adapter's two small matmuls, when attached)
  + attention: 4 * d_attn * n_layers per attended key (QK^T and AV).
- training, per token (forward + backward through the frozen model): the forward above, then
  2 * P_linear for the input gradients (the frozen weights get no weight gradient), 4 * P_lora (both
  gradients of the adapter), 8 * d_attn * n_layers per attended key (attention backward: two matmuls per
  forward matmul). So about 2x the forward, not the 3x of full fine-tuning.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from torch import nn


@dataclass
class ModelCost:
    linear_params: int  # weights of every linear layer (output head included), LoRA excluded
    lora_params: int
    attn_dim: int  # query/key width per layer (heads * head_dim)
    num_layers: int

    def forward_flops(self, tokens: int, key_pairs: int) -> float:
        return 2.0 * (self.linear_params + self.lora_params) * tokens + 4.0 * self.attn_dim * self.num_layers * key_pairs

    def train_flops(self, tokens: int, key_pairs: int) -> float:
        backward = (2.0 * self.linear_params + 4.0 * self.lora_params) * tokens
        backward += 8.0 * self.attn_dim * self.num_layers * key_pairs
        return self.forward_flops(tokens, key_pairs) + backward


def model_cost(model: nn.Module, lora_params: int = 0) -> ModelCost:
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415
    from transformers.pytorch_utils import Conv1D  # noqa: PLC0415

    linear = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            continue  # its base_layer is counted as a plain linear; its lora_A/B are the adapter
        if isinstance(module, (nn.Linear, Conv1D)):
            linear += module.weight.numel()
    lora = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            lora += sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
            linear -= sum(p.numel() for n, p in module.named_parameters() if "lora_" in n and p.dim() == 2)
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return ModelCost(linear, lora_params or lora, heads * head_dim, layers)


def causal_pairs(new: int, past: int) -> int:
    """Query-key pairs when `new` tokens attend causally after `past` cached ones."""
    return new * past + new * (new + 1) // 2


@dataclass
class CostMeter:
    """Counters a session fills as it runs; `summary(scored)` turns them into per-token numbers."""

    score_tokens: int = 0  # tokens fed to score (or generate) them
    score_pairs: int = 0
    reencode_tokens: int = 0  # context tokens re-encoded after an overflow or a LoRA update
    reencode_pairs: int = 0
    reencodes: int = 0
    train_tokens: int = 0  # tokens through forward + backward (context + chunk), summed over steps
    train_pairs: int = 0
    train_steps: int = 0
    seconds: dict = field(default_factory=lambda: {"score": 0.0, "reencode": 0.0, "train": 0.0})

    @contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def flops(self, cost: ModelCost) -> dict:
        return {
            "score": cost.forward_flops(self.score_tokens, self.score_pairs),
            "reencode": cost.forward_flops(self.reencode_tokens, self.reencode_pairs),
            "train": cost.train_flops(self.train_tokens, self.train_pairs) if self.train_steps else 0.0,
        }

    def summary(self, cost: ModelCost, scored: int) -> dict:
        """Totals and per-scored-token FLOPs and seconds."""
        flops = self.flops(cost)
        total_flops = sum(flops.values())
        total_s = sum(self.seconds.values())
        return {
            **{k: v for k, v in asdict(self).items() if k != "seconds"},
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "flops": flops,
            "scored_tokens": scored,
            "flops_per_token": total_flops / max(scored, 1),
            "ms_per_token": 1000.0 * total_s / max(scored, 1),
        }
