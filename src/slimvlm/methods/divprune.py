"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse subset of the projected visual
tokens (stage 2), by greedy max-min selection on cosine distance."""

from __future__ import annotations

import torch

from ..registry import register
from ..stages import PromptContext
from ..tokens import VisualTokens
from .baselines import BudgetMethod


def max_min_diverse(features: torch.Tensor, valid: torch.Tensor, keep: list[int], counts: list[int]) -> torch.Tensor:
    """(B, N) mask of the tokens kept: per image b, `keep[b]` of its `counts[b]` valid rows of
    features (B, N, D), chosen greedily: first the token whose nearest neighbour is farthest, then
    each time the token farthest from everything chosen so far (distance = 1 - cosine similarity).
    An image with keep >= its count keeps them all.

    All images advance together, five kernels per greedy step and nothing read back to the host (the
    counts come from it), so the loop can replay from a CUDA graph: a per-image loop reading each
    argmax back costs a sync per chosen token, which dominated training steps at batch 32 on a GPU
    (results/README.md, DualSpeed). An image that needs fewer steps than another takes its first
    keep[b] picks (the greedy order does not depend on the budget).

    A chosen token is never chosen again: where many tokens are identical (a flat background),
    every distance left can be 0, and the authors' argmax would pick an already chosen token and
    return fewer distinct tokens than the budget; here the tie goes to the first unchosen one."""
    batch, n, _ = features.shape
    active = [k < c for k, c in zip(keep, counts)]
    steps = max((k for k, a in zip(keep, active) if a), default=0)
    if steps == 0:
        return valid.clone()
    device = features.device
    normed = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1.0 - normed @ normed.transpose(1, 2)  # (B, N, N)
    flat = distance.view(-1, n)  # row i of image b is flat[b * n + i]; far faster than distance[rows, i]
    row_start = torch.arange(batch, device=device) * n
    # column j's second-smallest distance over the valid rows (the smallest is j itself)
    nearest_other = distance.masked_fill(~valid[:, :, None], float("inf")).topk(2, dim=1, largest=False).values[:, 1]
    picks = torch.empty(batch, steps, dtype=torch.long, device=device)
    picks[:, 0] = nearest_other.masked_fill(~valid, float("-inf")).argmax(dim=1)
    # distance to the nearest chosen token; -1 marks the chosen (distances lie in [0, 2]), -inf padding
    nearest = flat.index_select(0, row_start + picks[:, 0]).masked_fill(~valid, float("-inf"))
    for step in range(1, steps):
        nearest.scatter_(1, picks[:, step - 1 : step], -1.0)
        picks[:, step] = nearest.argmax(dim=1)
        nearest = torch.minimum(nearest, flat.index_select(0, row_start + picks[:, step]))
    # one budget for all (the usual case) needs no host-to-device copy, which a CUDA graph cannot hold
    budgets = keep[0] if len(set(keep)) == 1 else torch.tensor(keep, device=device)[:, None]
    taken = (torch.arange(steps, device=device)[None, :] < budgets).expand(batch, -1)
    chosen = torch.zeros(batch, n, dtype=torch.uint8, device=device)
    chosen.scatter_reduce_(1, picks, taken.to(torch.uint8), reduce="amax")  # an image past its count repeats picks
    if all(active):
        return chosen.bool()
    return torch.where((valid.sum(dim=1, keepdim=True) > budgets), chosen.bool(), valid)


@register
class DivPrune(BudgetMethod):
    name = "divprune"
    description = "DivPrune: greedy max-min diversity subset of the projected visual tokens (Alvar et al. CVPR'25)"
    capturable = True

    def __init__(self, budget: int | None = None, ratio: float | None = None) -> None:
        if budget is None and ratio is None:
            ratio = 0.098  # the paper's default: 56 of 576 tokens
        super().__init__(budget, ratio)

    def project(self, tokens: VisualTokens, context: PromptContext) -> VisualTokens:
        counts = tokens.host_counts()
        keep = [self.target(count) for count in counts]
        return tokens.keep(max_min_diverse(tokens.x, tokens.valid, keep, counts), counts=[min(k, c) for k, c in zip(keep, counts)])
