"""Attention to the middle of the Λ as a config of its own: which middle keys a query takes back, and on which layers.

`lm-infinite` holds one (`option_group`), so its options are spelled flat beside the Λ's own
(`lm-infinite:n_local=4096,top_blocks=4`); the kernels read the `MiddleRetrieval` it resolves to
(`lengthwise.attention.middle`). top_k = top_blocks = 0 (the default): no middle, plain Λ attention, bounded cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from lengthwise.attention.middle import MiddleRetrieval
from lengthwise.attention.pattern import LambdaPattern
from lengthwise.errors import UserError
from lengthwise.registry import check_positive, option

METHOD = "lm-infinite"  # the method that holds this config, for the messages


@dataclass(frozen=True)
class MiddleConfig:
    top_k: int = option(0, "middle tokens each query and head adds (official code: --top_k_attention); 0: none")
    top_blocks: int = option(0, "or: middle blocks each query group and head adds (InfLLM-like block retrieval); "
                             "0: none")
    retrieval_block: int = option(128, "positions per middle block (top_blocks)")
    representatives: int = option(4, "bounding boxes scored per middle block (top_blocks)")
    query_group: int = option(64, "queries (by position // query_group) sharing one block selection (top_blocks)")
    middle_distance: int | None = option(None, "distance middle keys are scored at (official: --top_k_insert_at); "
                                         "default: n_local")
    middle_from_layer: int = option(0, "first layer that attends to the middle (official: --top_k_from_layer)")
    middle_to_layer: int | None = option(None, "one past the last layer that attends to the middle (official: "
                                         "--top_k_to_layer); default: all")
    middle_queries: str = option("all", "'all' queries, or only the 'last' of each forward call (as the official "
                                 "code) attend to the middle")
    middle_order: str = option("none", "'none': every middle key at middle_distance; 'kept' (top_blocks): the "
                               "selected blocks end to end in text order, the nearest key at middle_distance")

    def __post_init__(self) -> None:
        for name in ("top_k", "top_blocks", "middle_from_layer"):
            check_positive(METHOD, name, getattr(self, name), allow_zero=True)
        for name in ("retrieval_block", "representatives", "query_group", "middle_distance", "middle_to_layer"):
            check_positive(METHOD, name, getattr(self, name))
        if self.enabled:
            try:
                self.retrieval(distance=1)
            except ValueError as error:
                raise UserError(f"{METHOD} {error}") from None
        if self.middle_to_layer is not None and self.middle_to_layer <= self.middle_from_layer:
            raise UserError(f"{METHOD} middle_to_layer ({self.middle_to_layer}) must exceed middle_from_layer "
                            f"({self.middle_from_layer})")

    @property
    def enabled(self) -> bool:
        return bool(self.top_k or self.top_blocks)

    def retrieval(self, distance: int) -> MiddleRetrieval:
        return MiddleRetrieval(distance, self.top_k, self.top_blocks, self.retrieval_block, self.representatives,
                               self.query_group, self.middle_queries, self.middle_order)

    def resolve(self, pattern: LambdaPattern, num_layers: int) -> tuple[MiddleRetrieval | None, range]:
        """(MiddleRetrieval, layers) on a model of `num_layers` under `pattern`, or (None, range(0)): plain Λ."""
        if not self.enabled:
            return None, range(0)
        distance = self.middle_distance or pattern.n_local
        middle = self.retrieval(distance)
        if middle.farthest > pattern.limit:
            spread = f" + top_blocks x retrieval_block - 1 (middle_order 'kept') = {middle.farthest}" \
                if middle.order == "kept" else ""
            raise UserError(f"{METHOD} middle_distance ({distance}){spread} must not exceed distance_limit "
                            f"({pattern.limit}): middle keys must appear at a distance seen in training")
        if self.top_blocks and self.retrieval_block > pattern.n_local:
            raise UserError(f"{METHOD} retrieval_block ({self.retrieval_block}) must not exceed n_local "
                            f"({pattern.n_local})")
        if self.middle_from_layer >= num_layers:
            raise UserError(f"{METHOD} middle_from_layer ({self.middle_from_layer}) must be below the model's "
                            f"{num_layers} layers")
        last = min(self.middle_to_layer or num_layers, num_layers)
        return middle, range(self.middle_from_layer, last)
