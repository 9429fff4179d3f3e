"""LongRoPE search: evolutionary search of per-dimension RoPE factors and start tokens (Ding et al. 2024,
LongRoPE, arXiv 2402.13753).

Pure engine (`space`, `evolution`), fitness (`fitness`), checkpoints, serial/Ray backends, and the end-to-end
`longrope(model, tokenizer, documents, target_length=...)`.
"""

from lengthwise.search.evolution import EvolutionConfig, SearchState, evolve
from lengthwise.search.longrope import LongRopeResult, longrope
from lengthwise.search.space import Candidate, SearchSpace

__all__ = ["Candidate", "EvolutionConfig", "LongRopeResult", "SearchSpace", "SearchState", "evolve", "longrope"]
