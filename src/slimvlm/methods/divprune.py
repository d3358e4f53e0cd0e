"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse subset of the projected visual
tokens (stage 2), by greedy max-min selection on cosine distance."""

from __future__ import annotations

import torch

from ..registry import register
from ..stages import PromptContext
from ..tokens import VisualTokens
from .baselines import BudgetMethod


def max_min_diverse(features: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of `keep` rows of features (N, D), chosen greedily: first the token whose nearest
    neighbour is farthest, then each time the token farthest from everything chosen so far
    (distance = 1 - cosine similarity). Returned in ascending (spatial) order.

    A chosen token is never chosen again: where many tokens are identical (a flat background),
    every distance left can be 0, and the authors' argmax would pick an already chosen token and
    return fewer distinct tokens than the budget; here the tie goes to the first unchosen one."""
    normed = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1.0 - normed @ normed.T
    n = distance.shape[0]
    if keep >= n:
        return torch.arange(n, device=features.device)
    first_scores = distance.topk(2, dim=0, largest=False).values[1] if n > 1 else distance[0]
    chosen = [int(first_scores.argmax())]
    nearest = distance[chosen[0]].clone()
    nearest[chosen[0]] = -1.0  # distances lie in [0, 2]: -1 marks the chosen
    for _ in range(keep - 1):
        pick = int(nearest.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, distance[pick])
        nearest[pick] = -1.0
    return torch.tensor(sorted(chosen), device=features.device)


@register
class DivPrune(BudgetMethod):
    name = "divprune"
    description = "DivPrune: greedy max-min diversity subset of the projected visual tokens (Alvar et al. CVPR'25)"

    def __init__(self, budget: int | None = None, ratio: float | None = None) -> None:
        if budget is None and ratio is None:
            ratio = 0.098  # the paper's default: 56 of 576 tokens
        super().__init__(budget, ratio)

    def project(self, tokens: VisualTokens, context: PromptContext) -> VisualTokens:
        keep = torch.zeros_like(tokens.valid)
        for image, count in enumerate(tokens.counts.tolist()):
            chosen = max_min_diverse(tokens.x[image, :count], self.target(count))
            keep[image, chosen] = True
        return tokens.keep(keep)
