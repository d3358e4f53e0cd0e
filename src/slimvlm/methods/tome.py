"""ToMe: Token Merging (Bolya et al., ICLR 2023), in the vision encoder (stage 1).

In every encoder layer, after attention and before the MLP: split the tokens alternately into
A (even) and B (odd), match each A token to its most similar B token by the cosine similarity of
the layer's keys averaged over heads, and merge the r most similar pairs (size-weighted mean).
The class token is never merged. Proportional attention adds log(size) to the attention logits,
so a merged token counts as the patches it stands for. After each merge the tokens stand in the
published code's order (facebookresearch/ToMe merge.py: unmerged A tokens, then the B tokens),
which the next layer's split runs over; at the encoder's output they return to spatial order.
Ties between equal similarities go to the first A token (a stable sort; the published code's
sort leaves them to the device).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SlimVLMError
from ..registry import register
from ..method import BudgetSpec, EncoderAttention, Method, Stage
from ..tokens import VisualTokens

if TYPE_CHECKING:
    from ..models.adapter import LanguageModelAdapter


def bipartite_matching(metric: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor, r: int) -> torch.Tensor:
    """ToMe's bipartite soft matching as a token -> group assignment.

    metric: (B, N, C) per-token features to compare; valid: (B, N) real tokens; protect: (B, N)
    tokens never merged away (the class token). Returns assign (B, N): every token keeps its own
    index as group except the r best-matched A tokens, which take the index of their B partner.
    """
    batch, n, _ = metric.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores = scores.masked_fill(~valid[:, 1::2, None].transpose(1, 2), float("-inf"))
    best, partner = scores.max(dim=-1)
    best = best.masked_fill(protect[:, ::2] | ~valid[:, ::2], float("-inf"))
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged = order[:, :r]
    assign = torch.arange(n, device=metric.device).expand(batch, n).clone()
    a_index = 2 * merged
    b_index = 2 * partner.gather(1, merged) + 1
    usable = best.gather(1, merged) > float("-inf")
    assign.scatter_(1, a_index, torch.where(usable, b_index, a_index))
    return assign


def published_order(batch: int, n: int, device: torch.device) -> torch.Tensor:
    """(B, n) sort key of the order ToMe's and DyMU's published code leave tokens in after a merge,
    `cat([unm, dst])`: the A tokens (even slots) that did not merge, in order (the class token
    first), then every B token (odd slots), in order. The next layer's alternating split runs over
    that order, so the groups it forms depend on it."""
    at = torch.arange(n, device=device)
    return torch.where(at % 2 == 0, at // 2, (n + 1) // 2 + at // 2).expand(batch, n)


def merge_published(tokens: VisualTokens, assign: torch.Tensor, counts: list[int] | None = None) -> VisualTokens:
    """A bipartite merge's regroup, its tokens left in the published order (see published_order)."""
    n = tokens.x.shape[1]
    return tokens.regroup(assign, n, order=published_order(tokens.batch_size, n, tokens.x.device), counts=counts)


def spatial_order(tokens: VisualTokens) -> VisualTokens:
    """The same tokens sorted by the first patch each covers, as slimvlm hands tokens to the LLM."""
    n = tokens.x.shape[1]
    identity = torch.arange(n, device=tokens.x.device).expand(tokens.batch_size, n)
    return tokens.regroup(identity, n, counts=tokens.known)


def merge_count(r: int, tokens: int, protected: int) -> int:
    """ToMe never merges more than half of the unprotected tokens in one layer."""
    return max(0, min(r, (tokens - protected) // 2))


@register
class ToMe(Method):
    name = "tome"
    description = "Token Merging: bipartite soft matching of keys, r merges per encoder layer (Bolya et al. ICLR'23)"
    stages = frozenset({Stage.ENCODE})
    proportional_attention = True
    capturable = True

    def __init__(self, r: int = 8, proportional_attention: bool = True) -> None:
        if r < 0:
            raise SlimVLMError(f"tome: r={r} must be >= 0 (tokens merged per layer)")
        self.r = int(r)
        self.proportional_attention = bool(proportional_attention)

    @classmethod
    def spec_for_budget(cls, adapter: LanguageModelAdapter, budget: int, **context: Any) -> BudgetSpec:
        # the tokens over the budget, merged evenly over the encoder layers run (rounded up)
        return f"tome:r={math.ceil((adapter.tokens_per_image - budget) / adapter.vision_layers_run)}"

    def encode_layer(self, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        n = tokens.x.shape[1]
        r = merge_count(self.r, tokens.min_count(), int(tokens.has_cls))
        if r == 0:
            return tokens
        metric = attention.keys.mean(dim=1)
        assign = bipartite_matching(metric, tokens.valid, tokens.is_cls, r)
        # every image has at least 2r + 1 real tokens, so each merges exactly r: no count to read back
        return merge_published(tokens, assign, counts=[count - r for count in tokens.host_counts()])

    def encode_output(self, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        return spatial_order(tokens)
