"""VisionZip (Yang et al., CVPR 2025): at the vision feature layer, keep the dominant tokens (most
attended by CLS) and merge the rest into a few contextual tokens (stage 1, at the encoder output).

Dominant: the class token plus the `dominant - 1` patches with the highest CLS attention (summed
over heads) in the feature layer. A tower without a class token (SigLIP: LLaVA-OneVision) keeps the
`dominant` patches that receive the most attention, averaged over heads and over all queries, as
LightCompress runs VisionZip on LLaVA-OneVision (see received_attention). Contextual: of the remaining
tokens, `contextual` targets at a uniform stride; every other remaining token joins its most similar
target by cosine similarity of the feature layer's keys (averaged over heads); each contextual token
is its target's feature plus the mean feature of the tokens that joined it, as in the authors' code.
The LLM sees [CLS, dominant patches in spatial order, contextual tokens in target order].

On Qwen2-VL / Qwen2.5-VL (no class token; a 2 x 2 merger after the tower) VisionZip acts on the merged
tokens, as the authors' Qwen2.5-VL port does (dvlab-research/VisionZip, Qwen2_5_VL/qwen2_5vl_visionzip.py,
read through its mirror jsilvcast/VisionZip): a merged token's score is the attention its 4 patches receive in
the last ViT block (mean over heads, summed over the queries of its image or frame, mean over the 4), its key
their keys' mean; each contextual token sits at its target's place and keeps the target's M-RoPE position
(EncoderAttention.received, positions_kept; models/qwen2_vl.py). Budgets are counts per view (a Qwen item), or
the port's fractions of its tokens (dominant_ratio, contextual_ratio).
"""

from __future__ import annotations

import torch

from typing import TYPE_CHECKING, Any

from ..attention import received_attention
from ..errors import SlimVLMError
from ..registry import register
from ..sequence import gather_rows
from ..method import BudgetSpec, EncoderAttention, Method, Stage
from ..tokens import VisualTokens

if TYPE_CHECKING:
    from ..models.adapter import LanguageModelAdapter


def contextual_groups(metric: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """metric (B, R, C) of each image's R remaining tokens in spatial order -> (target positions (T,),
    group of each remaining token (B, R) in [0, T)): targets at a uniform stride, others to the most
    similar target."""
    remaining = metric.shape[1]
    step = max(1, remaining // count)
    targets = torch.arange(0, remaining, step, device=metric.device)[:count]
    normed = metric / metric.norm(dim=-1, keepdim=True)
    group = (normed @ normed[:, targets].transpose(1, 2)).argmax(dim=-1)
    group[:, targets] = torch.arange(len(targets), device=metric.device)
    return targets, group


@register
class VisionZip(Method):
    name = "visionzip"
    description = ("VisionZip: dominant tokens by CLS attention (attention received, without a class token) + contextual "
                   "tokens merged by key similarity (Yang et al. CVPR'25)")
    stages = frozenset({Stage.ENCODE})
    feeds_cls = True
    acts_in_encoder_layers = False
    at_merged_tokens = True
    capturable = True

    def __init__(self, dominant: int = 54, contextual: int = 10, dominant_ratio: float | None = None,
                 contextual_ratio: float | None = None) -> None:
        if dominant < 1:
            raise SlimVLMError(f"visionzip: dominant={dominant} must be >= 1 (it counts the class token)")
        if contextual < 0:
            raise SlimVLMError(f"visionzip: contextual={contextual} must be >= 0")
        for name, ratio in (("dominant_ratio", dominant_ratio), ("contextual_ratio", contextual_ratio)):
            if ratio is not None and not 0 < ratio < 1:
                raise SlimVLMError(f"visionzip: {name}={ratio} must be a fraction in (0, 1), e.g. 0.45")
        if (dominant_ratio or 0) + (contextual_ratio or 0) > 1:
            raise SlimVLMError(f"visionzip: dominant_ratio + contextual_ratio = {dominant_ratio + contextual_ratio} "
                               "keeps more than every token; give fractions that sum to at most 1")
        self.dominant = int(dominant)
        self.contextual = int(contextual)
        # fractions of each view's (each Qwen item's) tokens, in place of the counts, as the Qwen2.5-VL port takes
        # them: int(dominant_ratio x N) dominant tokens (at least 1), max(int(contextual_ratio x N), 1) contextual
        self.dominant_ratio = dominant_ratio
        self.contextual_ratio = contextual_ratio

    @classmethod
    def spec_for_budget(cls, adapter: LanguageModelAdapter, budget: int, **context: Any) -> BudgetSpec:
        dominant = round(budget * 54 / 64)  # the paper's split at 64 tokens: 54 dominant, 10 contextual
        return f"visionzip:dominant={dominant},contextual={budget - dominant}"

    def budgets(self, n: int) -> tuple[int, int]:
        """(dominant, contextual) tokens for a view of n tokens."""
        dominant = self.dominant if self.dominant_ratio is None else max(1, int(self.dominant_ratio * n))
        contextual = self.contextual if self.contextual_ratio is None else max(1, int(self.contextual_ratio * n))
        return dominant, contextual

    def check_model(self, num_vision_layers: int, num_llm_layers: int, tokens_per_image: int) -> None:
        if self.dominant_ratio is not None or self.contextual_ratio is not None:
            return  # fractions fit any view
        if self.dominant - 1 + self.contextual > tokens_per_image:
            raise SlimVLMError(
                f"visionzip: dominant={self.dominant} and contextual={self.contextual} keep more tokens than the "
                f"{tokens_per_image} of the largest visual item this model takes (the class token, where the tower "
                "has one, is one of the dominant); lower the budget"
            )

    def encode_output(self, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        n = tokens.x.shape[1]
        if any(count != n for count in tokens.host_counts()):
            raise SlimVLMError("visionzip needs the encoder's full token set")
        dominant, contextual = self.budgets(n)
        if dominant > n:
            raise SlimVLMError(f"visionzip: dominant={dominant} is more than the {n} tokens of a view (a Qwen image or "
                               "video: an item); lower it, or give dominant_ratio")
        batch = tokens.x.shape[0]
        device = tokens.x.device
        if attention.received is not None:
            score = attention.received
        elif tokens.has_cls:
            score = attention.rows(torch.zeros(batch, 1, dtype=torch.long, device=device)).sum(dim=1)[:, 0]
            score[:, 0] = float("inf")  # the class token is always dominant
        else:
            score = received_attention(attention.rows, tokens.valid)
        chosen = torch.zeros(batch, n, dtype=torch.bool, device=device)
        chosen.scatter_(1, score.topk(dominant, dim=1).indices, True)
        # every image has the same counts, so each part is one (B, count) gather, in spatial order
        by_kind = chosen.to(torch.uint8).argsort(dim=1, descending=True, stable=True)
        kept, rest = by_kind[:, :dominant], by_kind[:, dominant:]
        assign = torch.arange(n, device=device).expand(batch, n).clone()
        contextual = min(contextual, rest.shape[1])
        order = torch.cat([tokens.origin, tokens.num_patches + torch.arange(contextual, device=device).expand(batch, -1)], 1)
        at = None
        if contextual:
            targets, group = contextual_groups(gather_rows(attention.keys.mean(dim=1), rest), contextual)
            if attention.positions_kept:  # each contextual token at its target's place and position
                order = at = torch.cat([tokens.origin, gather_rows(tokens.origin, rest[:, targets])], 1)
            assign.scatter_(1, rest, n + group)
            joins = torch.ones(rest.shape[1], dtype=tokens.x.dtype, device=device)
            joins.index_fill_(0, targets, 0)  # a target is the contextual token's base, not one of the tokens joining it
            count = joins.expand(batch, -1).new_zeros(batch, contextual).scatter_add_(1, group, joins.expand(batch, -1))
        else:
            assign.scatter_(1, rest, -1)

        # the regroup puts its groups (a dominant token's: its index; contextual token g's: n + g) in the order of
        # their `order` keys: the features below, computed group by group, go in that order too
        groups = torch.cat([kept, n + torch.arange(contextual, device=device).expand(batch, -1)], dim=1)
        placed = order.gather(1, groups).argsort(dim=1, stable=True)

        def merged(x: torch.Tensor) -> torch.Tensor:
            """(B, n, E) -> (B, dominant + contextual, E) in the regroup's order: the dominant tokens as they are,
            each contextual token its target plus the mean of the tokens joining it."""
            features = gather_rows(x, kept)
            if contextual:
                members = gather_rows(x, rest)
                joined = members.new_zeros(batch, contextual, x.shape[2]).scatter_add_(
                    1, group[..., None].expand(-1, -1, x.shape[2]), members * joins[None, :, None])
                features = torch.cat([features, members[:, targets] + joined / count.clamp_min(1)[..., None]], dim=1)
            return gather_rows(features, placed)

        regrouped = tokens.regroup(assign, n + contextual, order=order, counts=[dominant + contextual] * batch, at=at)
        layer_features = tokens.layer_features  # Qwen3-VL's DeepStack features, merged as the tokens are
        if layer_features is not None:
            layer_features = merged(layer_features.flatten(2)).unflatten(2, layer_features.shape[2:])
        return regrouped.with_features(merged(tokens.x), layer_features)
