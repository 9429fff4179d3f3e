"""Fitness of a candidate: perplexity of the model at the target length, patched with the candidate's factors.

The production path patches through the registered `longrope` method (one code path with what users apply
later). `direct_longrope_patch` is an independent, minimal implementation (θ_i/λ_i, positions < n_hat keep θ_i)
kept as an eager reference: tests check that both give the same perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lengthwise.api import load_model, patch
from lengthwise.errors import UserError
from lengthwise.models.rotary import rotary_layout
from lengthwise.patching import Undo
from lengthwise.rope.scaling import base_inv_freq, longrope_attention_factor
from lengthwise.scoring import nll_one_pass
from lengthwise.search.space import Candidate


@dataclass
class PerplexityFitness:
    """`fitness(candidate) -> PPL` over `documents` (each a token list of the same length).

    regime "long": the candidate gives the long factors (documents longer than L, so the long factors apply).
    regime "short": the candidate gives the short factors, `long_factors` stay fixed, documents of <= L tokens.
    """

    model: Any
    documents: list[list[int]]
    pretrain_length: int
    scale: float  # s, for the attention factor when `attention_factor` is None
    attention_factor: float | None = None
    regime: str = "long"
    long_factors: tuple[float, ...] | None = None  # fixed long factors (short regime)
    n_hat: int = 0  # fixed n_hat (short regime: the long result's)
    threads: int | None = None  # torch threads during an evaluation (same count => bit-identical results)
    direct: bool = False  # use direct_longrope_patch instead of the registered method (reference)
    evaluations: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.regime not in ("long", "short"):
            raise UserError(f"unknown regime {self.regime!r}; accepted: long, short")
        if self.regime == "short" and self.long_factors is None:
            raise UserError("the short-factor search needs the long factors it will be switched with")
        if not self.documents:
            raise UserError("fitness needs at least one document")

    def options(self, candidate: Candidate) -> dict:
        """Options of the `longrope` method that apply `candidate`."""
        opts: dict[str, Any] = {
            "factor": float(self.scale),
            "original_max_position_embeddings": self.pretrain_length,
        }
        if self.attention_factor is not None:
            opts["attention_factor"] = float(self.attention_factor)
        if self.regime == "long":
            opts.update(long_factors=tuple(candidate.lambdas), n_hat=candidate.n_hat)
        else:
            opts.update(long_factors=tuple(self.long_factors), short_factors=tuple(candidate.lambdas), n_hat=self.n_hat)
        return opts

    @torch.no_grad()
    def __call__(self, candidate: Candidate) -> float:
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            if self.direct:
                undo = direct_longrope_patch(self.model, candidate, self.pretrain_length, self._attention())
                remove = undo.remove
            else:
                remove = patch(self.model, "longrope", **self.options(candidate)).remove
            try:
                total, count = 0.0, 0
                for ids in self.documents:
                    nll = nll_one_pass(self.model, torch.tensor(ids))  # (N-1,)
                    total += float(nll.double().sum())
                    count += nll.numel()
            finally:
                remove()
        finally:
            torch.set_num_threads(previous)
        self.evaluations += 1
        value = math.exp(total / count)
        return value if math.isfinite(value) else math.inf

    def _attention(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return longrope_attention_factor(self.scale, self.pretrain_length)


def direct_longrope_patch(model, candidate: Candidate, pretrain_length: int, attention: float) -> Undo:
    """Reference patch: cos/sin from θ_i/λ_i, positions < n_hat with the original θ_i, times `attention`.

    Long regime only (no switch). Replaces the forward of the model's rotary module (half layout models).
    """

    layout = rotary_layout(model)
    rotary = layout.rotary_module
    if rotary is None:
        raise UserError("direct_longrope_patch needs a model with a rotary_emb module")
    theta = base_inv_freq(layout.rotary_dim, layout.base).double()  # (d/2,)
    lam = torch.tensor(candidate.lambdas, dtype=torch.float64)
    if lam.shape != theta.shape:
        raise UserError(f"candidate has {lam.numel()} factors; this model needs {theta.numel()}")
    scaled = theta / lam

    def forward(x, position_ids, *args, **kwargs):
        pos = position_ids[..., None].double()  # (B, T, 1)
        angles = torch.where(pos < candidate.n_hat, pos * theta, pos * scaled)  # (B, T, d/2)
        emb = torch.cat((angles, angles), dim=-1)
        return (emb.cos() * attention).to(x.dtype), (emb.sin() * attention).to(x.dtype)

    undo = Undo()
    undo.shadow(rotary, "forward", forward)
    return undo


@dataclass
class FitnessFactory:
    """A picklable recipe that builds a `PerplexityFitness` in a Ray worker: its own model copy, its own threads.

    `model` is a model object (pickled to the worker) or a name/path for `lengthwise.load_model`.
    """

    model: Any
    kwargs: dict

    def __call__(self) -> PerplexityFitness:
        if isinstance(self.model, str):

            model, _ = load_model(self.model)
        else:
            model = self.model
        model.eval()
        return PerplexityFitness(model=model, **self.kwargs)
