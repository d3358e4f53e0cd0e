"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse subset of the projected visual
tokens (stage 2), by greedy max-min selection on cosine distance."""

from __future__ import annotations

import torch

from ..registry import register
from ..stages import PromptContext
from ..tokens import VisualTokens
from .baselines import BudgetMethod


def max_min_diverse(features: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, N) mask of the tokens kept: per image b, `keep[b]` of its valid rows of features
    (B, N, D), chosen greedily: first the token whose nearest neighbour is farthest, then each
    time the token farthest from everything chosen so far (distance = 1 - cosine similarity).
    An image with keep >= its valid count keeps them all.

    All images advance together, one greedy step per iteration and no host sync inside the loop:
    a per-image loop reading each argmax back costs a sync per chosen token, which dominated
    training steps at batch 32 on a GPU (results/README.md, DualSpeed).

    A chosen token is never chosen again: where many tokens are identical (a flat background),
    every distance left can be 0, and the authors' argmax would pick an already chosen token and
    return fewer distinct tokens than the budget; here the tie goes to the first unchosen one."""
    counts = valid.sum(dim=1)
    active = keep < counts
    steps = int(keep[active].max()) if bool(active.any()) else 0
    if steps == 0:
        return valid.clone()
    n = features.shape[1]
    rows = torch.arange(features.shape[0], device=features.device)
    normed = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1.0 - normed @ normed.transpose(1, 2)  # (B, N, N)
    flat = distance.view(-1, n)  # row i of image b is flat[b * n + i]; far faster than distance[rows, i]
    # column j's second-smallest distance over the valid rows (the smallest is j itself)
    nearest_other = distance.masked_fill(~valid[:, :, None], float("inf")).topk(2, dim=1, largest=False).values[:, 1]
    first = nearest_other.masked_fill(~valid, float("-inf")).argmax(dim=1)
    chosen = torch.zeros_like(valid)
    chosen[rows, first] = active
    # distance to the nearest chosen token; -1 marks the chosen (distances lie in [0, 2]), -inf padding
    nearest = flat.index_select(0, rows * n + first).masked_fill(~valid, float("-inf")).masked_fill(chosen, -1.0)
    for step in range(1, steps):
        pick = nearest.argmax(dim=1)
        take = active & (keep > step)
        chosen[rows, pick] |= take
        nearest = torch.where(take[:, None], torch.minimum(nearest, flat.index_select(0, rows * n + pick)), nearest)
        nearest = nearest.masked_fill(chosen, -1.0)
    return torch.where(active[:, None], chosen, valid)


@register
class DivPrune(BudgetMethod):
    name = "divprune"
    description = "DivPrune: greedy max-min diversity subset of the projected visual tokens (Alvar et al. CVPR'25)"

    def __init__(self, budget: int | None = None, ratio: float | None = None) -> None:
        if budget is None and ratio is None:
            ratio = 0.098  # the paper's default: 56 of 576 tokens
        super().__init__(budget, ratio)

    def project(self, tokens: VisualTokens, context: PromptContext) -> VisualTokens:
        keep = torch.tensor([self.target(count) for count in tokens.counts.tolist()], device=tokens.x.device)
        return tokens.keep(max_min_diverse(tokens.x, tokens.valid, keep))
