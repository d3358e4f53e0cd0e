"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse subset of the projected visual
tokens (stage 2), by greedy max-min selection on cosine distance."""

from __future__ import annotations

import torch

from ..registry import register
from ..method import PromptContext
from ..tokens import VisualTokens
from .baselines import BudgetMethod


PAPER_RATIO = 0.098  # the paper's default: 56 of 576 tokens (one object: `slimvlm methods` shows it as the default)

# the (B, N, N) float32 distances are held whole up to this; past it (a long video: 30k tokens would take 3.6 GB)
# each pick's row is computed from the tokens, and the nearest neighbours in blocks of BLOCK_BYTES
MATRIX_BYTES = 1 << 30
BLOCK_BYTES = 1 << 28


def distances(normed: torch.Tensor, rows: slice) -> torch.Tensor:
    """(B, r, N): 1 - cosine similarity of the unit vectors `rows` to every token, -1 on each row's own token."""
    block = 1.0 - normed[:, rows] @ normed.transpose(1, 2)
    block[:, :, rows].diagonal(dim1=1, dim2=2).fill_(-1.0)
    return block


def nearest_other(block: torch.Tensor, valid: torch.Tensor, padded: bool) -> torch.Tensor:
    """(B, r): each row's distance to its nearest other valid token, the second smallest of its row (the smallest
    is its own -1; distances are symmetric, so a row is the column the authors read)."""
    if padded:
        block = block.masked_fill(~valid[:, None, :], float("inf"))
    return block.topk(2, dim=-1, largest=False).values[..., 1]


def max_min_diverse(features: torch.Tensor, valid: torch.Tensor, keep: list[int], counts: list[int]) -> torch.Tensor:
    """(B, N) mask of the tokens kept: per image b, `keep[b]` of its `counts[b]` valid rows of
    features (B, N, D), chosen greedily: first the token whose nearest neighbour is farthest, then
    each time the token farthest from everything chosen so far (distance = 1 - cosine similarity).
    An image with keep >= its count keeps them all.

    All images advance together, three kernels per greedy step (four past batch 1) and nothing read
    back to the host (the counts come from it): a per-image loop reading each argmax back costs a sync
    per chosen token, which dominated training steps at batch 32 on a GPU (results/README.md,
    DualSpeed), and at batch 1 the loop is paid in launches (640 picks of a video: results/generate).
    An image that needs fewer steps than another takes its first keep[b] picks (the greedy order does
    not depend on the budget). Where the distances would pass MATRIX_BYTES, each step computes its
    pick's row instead of reading it (memory N x D, not N x N; a few kernels more per step).

    A chosen token is never chosen again: where many tokens are identical (a flat background),
    every distance left can be 0, and the authors' argmax would pick an already chosen token and
    return fewer distinct tokens than the budget; here the tie goes to the first unchosen one."""
    batch, n, _ = features.shape
    active = [k < c for k, c in zip(keep, counts)]
    steps = max((k for k, a in zip(keep, active) if a), default=0)
    if steps == 0:
        return valid.clone()
    device = features.device
    padded = min(counts) < n
    # a choice, not a value: no gradient flows through it (and the in-place loop could not record one)
    normed = torch.nn.functional.normalize(features.detach().float(), dim=-1)
    if batch * n * n * 4 <= MATRIX_BYTES:
        whole = distances(normed, slice(None))  # -1 on the diagonal: the minimum with a pick's row marks it chosen
        flat = whole.view(-1, n)  # row i of image b is flat[b * n + i]; far faster than whole[rows, i]
        row_start = torch.arange(batch, device=device) * n if batch > 1 else None

        def rows(pick: torch.Tensor) -> torch.Tensor:
            return flat.index_select(0, pick if row_start is None else pick + row_start)

        nearest_others = nearest_other(whole, valid, padded)
    else:
        block_rows = max(1, BLOCK_BYTES // (4 * batch * n))

        def rows(pick: torch.Tensor) -> torch.Tensor:
            chosen = normed.gather(1, pick[:, None, None].expand(-1, 1, normed.shape[-1]))  # (B, 1, D)
            return (1.0 - (chosen @ normed.transpose(1, 2))[:, 0]).scatter_(1, pick[:, None], -1.0)

        nearest_others = torch.cat([nearest_other(distances(normed, slice(first, first + block_rows)), valid, padded)
                                    for first in range(0, n, block_rows)], dim=1)
    picks = torch.empty(steps, batch, dtype=torch.long, device=device)
    pick_at = picks.unbind(0)  # views made once: the loop dispatches kernels alone
    torch.argmax(nearest_others.masked_fill(~valid, float("-inf")), dim=1, out=pick_at[0])
    # distance to the nearest chosen token: -1 for the chosen, -inf for padding
    nearest = rows(pick_at[0]).masked_fill(~valid, float("-inf"))
    for step in range(1, steps):
        torch.argmax(nearest, dim=1, out=pick_at[step])
        torch.minimum(nearest, rows(pick_at[step]), out=nearest)
    picks = picks.T
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

    def __init__(self, budget: int | None = None, ratio: float | None = PAPER_RATIO) -> None:
        if budget is not None and ratio is PAPER_RATIO:  # the default gives way to a budget; a ratio given with it is refused
            ratio = None
        super().__init__(budget, ratio)

    def project(self, tokens: VisualTokens, context: PromptContext) -> VisualTokens:
        counts = tokens.host_counts()
        keep = [self.target(count) for count in counts]
        return tokens.keep(max_min_diverse(tokens.x, tokens.valid, keep, counts), counts=[min(k, c) for k, c in zip(keep, counts)])
