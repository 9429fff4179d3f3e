"""The typed configuration of a Temp-LoRA session (Wang et al. 2024, arXiv 2401.11504)."""

from __future__ import annotations

from dataclasses import dataclass

from lengthwise.registry import option
from lengthwise.errors import UserError


@dataclass(frozen=True)
class TempLoraConfig:
    """How a session reads, trains and generates (each field's help says what it sets)."""

    chunk_size: int = option(64, "tokens scored (or generated) between two LoRA updates; the paper's key parameter")
    window: int = option(256, "tokens the model attends to at once (KV cache capacity)")
    keep: int | None = option(None, "context tokens kept (and re-encoded under the current LoRA) when the window "
                              "overflows; default: window - chunk_size, so every scored token sees at least that many "
                              "earlier tokens")
    rank: int = option(8, "LoRA rank r")
    alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha / rank")
    target_modules: str | tuple[str, ...] = option("all-linear", "'all-linear' (every linear layer except the output "
                                                   "head), or a tuple of module-name suffixes")
    lr: float = option(2e-3, "learning rate of the AdamW optimizer on the LoRA weights")
    steps_per_chunk: int = option(1, "optimizer steps on each chunk (0: no training, the same-window baseline)")
    weight_decay: float = option(0.0, "AdamW weight decay on the LoRA weights")
    max_grad_norm: float | None = option(1.0, "gradient-norm clip per step; None: no clipping")
    reuse_cache: bool = option(True, "keep KV states computed under older LoRA weights until the window overflows "
                               "(the paper's cache reuse); false re-encodes the cached window after every update")
    seed: int = option(0, "seed of the LoRA initialisation")

    def __post_init__(self) -> None:
        for name in ("chunk_size", "window", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"temp-lora {name} must be a positive integer, got {value!r}")
        if self.chunk_size > self.window:
            raise UserError(
                f"temp-lora chunk_size ({self.chunk_size}) must not exceed window ({self.window}): a chunk is "
                "scored and trained inside one window; accepted: 1 <= chunk_size <= window"
            )
        room = self.window - self.chunk_size
        if self.keep is not None and (not isinstance(self.keep, int) or not 0 <= self.keep <= room):
            raise UserError(
                f"temp-lora keep must be an integer in [0, window - chunk_size] = [0, {room}] "
                f"(room must remain for a chunk after an overflow), got {self.keep!r}"
            )
        if not isinstance(self.steps_per_chunk, int) or self.steps_per_chunk < 0:
            raise UserError(f"temp-lora steps_per_chunk must be an integer >= 0, got {self.steps_per_chunk!r}")
        if not self.lr > 0:
            raise UserError(f"temp-lora lr must be > 0, got {self.lr!r}")
        if not self.alpha > 0:
            raise UserError(f"temp-lora alpha must be > 0, got {self.alpha!r}")
        if self.weight_decay < 0:
            raise UserError(f"temp-lora weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UserError(f"temp-lora max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        targets = self.target_modules
        if isinstance(targets, list):
            object.__setattr__(self, "target_modules", tuple(targets))
            targets = self.target_modules
        if isinstance(targets, str):
            if targets != "all-linear" and not targets:
                raise UserError("temp-lora target_modules must be 'all-linear' or module-name suffixes, got ''")
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise UserError(
                f"temp-lora target_modules must be 'all-linear' or a non-empty tuple of module-name suffixes, "
                f"got {targets!r}"
            )

    @property
    def context_keep(self) -> int:
        """Tokens kept as context when the window overflows."""
        return self.window - self.chunk_size if self.keep is None else self.keep

    @property
    def trains(self) -> bool:
        return self.steps_per_chunk > 0
