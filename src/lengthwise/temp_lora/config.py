"""The typed configuration of a Temp-LoRA session (seed 003, arXiv 2401.11504)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TempLoraConfig:
    """How a session reads, trains and generates.

    window: tokens the model attends to at once (KV cache capacity). chunk_size: tokens scored (or generated)
    between two LoRA updates; the paper's key parameter. keep: context tokens kept (and re-encoded under the
    current LoRA) when the window overflows; default `window - chunk_size`, i.e. every scored token sees at
    least `window - chunk_size` earlier tokens. reuse_cache: keep KV states computed under older LoRA weights
    until the window overflows (the paper's cache reuse); False re-encodes the cached window after every update.
    steps_per_chunk: optimizer steps on each chunk (0: no training, the same-window baseline).
    target_modules: "all-linear" (every linear layer except the output head), or a tuple of module-name suffixes.
    """

    chunk_size: int = 64
    window: int = 256
    keep: int | None = None
    rank: int = 8
    alpha: float = 16.0
    target_modules: str | tuple[str, ...] = "all-linear"
    lr: float = 2e-3
    steps_per_chunk: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    reuse_cache: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("chunk_size", "window", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"temp-lora {name} must be a positive integer, got {value!r}")
        if self.chunk_size > self.window:
            raise ValueError(
                f"temp-lora chunk_size ({self.chunk_size}) must not exceed window ({self.window}): a chunk is "
                "scored and trained inside one window; accepted: 1 <= chunk_size <= window"
            )
        if self.keep is not None and (not isinstance(self.keep, int) or not 0 <= self.keep <= self.window - self.chunk_size):
            raise ValueError(
                f"temp-lora keep must be an integer in [0, window - chunk_size] = [0, {self.window - self.chunk_size}] "
                f"(room must remain for a chunk after an overflow), got {self.keep!r}"
            )
        if not isinstance(self.steps_per_chunk, int) or self.steps_per_chunk < 0:
            raise ValueError(f"temp-lora steps_per_chunk must be an integer >= 0, got {self.steps_per_chunk!r}")
        if not self.lr > 0:
            raise ValueError(f"temp-lora lr must be > 0, got {self.lr!r}")
        if not self.alpha > 0:
            raise ValueError(f"temp-lora alpha must be > 0, got {self.alpha!r}")
        if self.weight_decay < 0:
            raise ValueError(f"temp-lora weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"temp-lora max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        targets = self.target_modules
        if isinstance(targets, list):
            object.__setattr__(self, "target_modules", tuple(targets))
            targets = self.target_modules
        if isinstance(targets, str):
            if targets != "all-linear" and not targets:
                raise ValueError("temp-lora target_modules must be 'all-linear' or module-name suffixes, got ''")
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
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
