"""DToMe's bipartite matching (DyMU, arXiv 2504.17040, Sec. 3.1): ToMe's split with every edge scored, so that
inference merges the edges above a layer's threshold and calibration the top B * r_l of a whole batch."""

from __future__ import annotations

import torch


def best_partners(metric: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite split, every edge scored: metric (B, N, C) per-token features, valid (B, N)
    real tokens, protect (B, N) tokens that never merge away. Returns, per A token (even index),
    its best cosine similarity to a valid B token (odd index), -inf for protected or padding A
    tokens, and that B partner's position among the B tokens: (best (B, NA), partner (B, NA))."""
    metric = metric.float()  # thresholds near 1 need more than bfloat16's 3 digits
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = (a @ b.transpose(-1, -2)).clamp(-1.0, 1.0)  # rounding can push a cosine past 1
    scores = scores.masked_fill(~valid[:, None, 1::2], float("-inf"))
    best, partner = scores.max(dim=-1)
    best = best.masked_fill(protect[:, ::2] | ~valid[:, ::2], float("-inf"))
    return best, partner


def merge_assign(merge: torch.Tensor, partner: torch.Tensor, n: int) -> torch.Tensor:
    """Per-edge decisions -> a token -> group assignment for VisualTokens.regroup: merge (B, NA) True
    where A token 2i joins its B partner 2 * partner[i] + 1; every other token keeps its index."""
    batch = merge.shape[0]
    assign = torch.arange(n, device=merge.device).expand(batch, n).clone()
    a_index = 2 * torch.arange(merge.shape[1], device=merge.device).expand(batch, -1)
    target = torch.where(merge, 2 * partner + 1, a_index)
    assign[:, ::2] = target
    return assign


def threshold_merge(metric: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor, threshold: float) -> torch.Tensor:
    """DToMe at inference: every A token whose best similarity is strictly greater than `threshold`
    merges into its B partner. Returns the assignment (B, N)."""
    if metric.shape[1] < 2:
        return torch.arange(metric.shape[1], device=metric.device).expand(metric.shape[0], -1).clone()
    best, partner = best_partners(metric, valid, protect)
    return merge_assign(best > threshold, partner, metric.shape[1])
