"""FastV (Chen et al., ECCV 2024): drop visual tokens inside the LLM during prefill (stage 3).

At LLM layer K, rank the visual tokens by the attention they received from the last token at
layer K-1, averaged over heads, and drop the lowest `ratio` of them for every later layer and for
decoding (those layers' KV cache never holds them). Text tokens are never dropped; kept tokens
keep their positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import SlimVLMError
from ..registry import register
from ..method import BudgetSpec, Method, PrefillLayer, Stage, check_ratio

if TYPE_CHECKING:
    from ..models.adapter import LanguageModelAdapter


def lowest_attention_drop(scores: torch.Tensor, visual: torch.Tensor, ratio: float) -> torch.Tensor:
    """keep mask (B, L): per row, drop round(ratio * visual count) visual tokens with the lowest score (round
    half to even, as Python's round; ties by position). All rows at once, nothing read back to the host."""
    masked = scores.float().masked_fill(~visual, float("inf"))
    order = masked.argsort(dim=1, stable=True)  # lowest first; text and padding last
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    drop = torch.round(ratio * visual.sum(dim=1, dtype=torch.float32))  # (B,)
    return ~(visual & (rank < drop[:, None]))


@register
class FastV(Method):
    name = "fastv"
    description = "FastV: at LLM layer K drop the visual tokens least attended by the last token (Chen et al. ECCV'24)"
    stages = frozenset({Stage.PREFILL})
    queries = "last"

    def __init__(self, k: int = 2, ratio: float = 0.5) -> None:
        if k < 1:
            raise SlimVLMError(f"fastv: k={k} must be >= 1 (it reads the attention of layer k-1)")
        self.k = int(k)
        self.ratio = check_ratio("ratio", ratio)
        self.drop_layers = (self.k,)

    @classmethod
    def spec_for_budget(cls, adapter: LanguageModelAdapter, budget: int, **context: Any) -> BudgetSpec:
        return f"fastv:k=2,ratio={round(1 - budget / adapter.tokens_per_image, 4)}"

    def check_model(self, num_vision_layers: int, num_llm_layers: int, tokens_per_image: int) -> None:
        if self.k >= num_llm_layers:
            raise SlimVLMError(f"fastv: k={self.k} but the language model has {num_llm_layers} layers; use k < {num_llm_layers}")

    def prefill_keep(self, layer: PrefillLayer) -> torch.Tensor:
        scores = layer.rows.mean(dim=1)[:, 0]  # (B, L): the last query, averaged over heads
        sequence = layer.sequence
        return lowest_attention_drop(scores, sequence.visual & sequence.valid, self.ratio)
