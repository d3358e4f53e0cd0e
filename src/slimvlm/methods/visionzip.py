"""VisionZip (Yang et al., CVPR 2025): at the vision feature layer, keep the dominant tokens (most
attended by CLS) and merge the rest into a few contextual tokens (stage 1, at the encoder output).

Dominant: the class token plus the `dominant - 1` patches with the highest CLS attention (summed
over heads) in the feature layer. Contextual: of the remaining tokens, `contextual` targets at a
uniform stride; every other remaining token joins its most similar target by cosine similarity of
the feature layer's keys (averaged over heads); each contextual token is its target's feature
plus the mean feature of the tokens that joined it, as in the authors' code. The LLM sees
[CLS, dominant patches in spatial order, contextual tokens in target order].
"""

from __future__ import annotations

import torch

from ..errors import SlimVLMError
from ..registry import register
from ..stages import EncoderAttention, Method, Stage
from ..tokens import VisualTokens


def contextual_groups(metric: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """metric (R, C) of the R remaining tokens in spatial order -> (target positions (T,), group of
    each remaining token (R,) in [0, T)), targets at a uniform stride, others to the most similar."""
    remaining = metric.shape[0]
    step = max(1, remaining // count)
    targets = torch.arange(0, remaining, step, device=metric.device)[:count]
    normed = metric / metric.norm(dim=-1, keepdim=True)
    group = (normed @ normed[targets].T).argmax(dim=-1)
    group[targets] = torch.arange(len(targets), device=metric.device)
    return targets, group


@register
class VisionZip(Method):
    name = "visionzip"
    description = "VisionZip: dominant tokens by CLS attention + contextual tokens merged by key similarity (Yang et al. CVPR'25)"
    stages = frozenset({Stage.ENCODE})
    feeds_cls = True

    def __init__(self, dominant: int = 54, contextual: int = 10) -> None:
        if dominant < 1:
            raise SlimVLMError(f"visionzip: dominant={dominant} must be >= 1 (it counts the class token)")
        if contextual < 0:
            raise SlimVLMError(f"visionzip: contextual={contextual} must be >= 0")
        self.dominant = int(dominant)
        self.contextual = int(contextual)

    def check_model(self, num_vision_layers: int, num_llm_layers: int, tokens_per_image: int) -> None:
        if self.dominant - 1 + self.contextual > tokens_per_image:
            raise SlimVLMError(
                f"visionzip: dominant-1 + contextual = {self.dominant - 1 + self.contextual} is larger than the "
                f"{tokens_per_image} patch tokens of an image; lower the budget"
            )

    def encode_output(self, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        if not tokens.has_cls or bool((tokens.counts != tokens.x.shape[1]).any()):
            raise SlimVLMError("visionzip needs the encoder's full token set with its class token")
        batch, n, _ = tokens.x.shape
        device = tokens.x.device
        cls_attention = attention.rows(torch.zeros(batch, 1, dtype=torch.long, device=device)).sum(dim=1)[:, 0]
        cls_attention[:, 0] = float("inf")  # the class token is always dominant
        dominant = torch.zeros(batch, n, dtype=torch.bool, device=device)
        dominant.scatter_(1, cls_attention.topk(self.dominant, dim=1).indices, True)
        metric = attention.keys.mean(dim=1)

        assign = torch.arange(n, device=device).expand(batch, n).clone()
        order = tokens.origin.clone()
        order = torch.cat([order, torch.empty(batch, self.contextual, dtype=torch.long, device=device)], dim=1)
        features = []
        for image in range(batch):
            kept = tokens.x[image, dominant[image]]
            rest = (~dominant[image]).nonzero().squeeze(1)
            contextual = kept[:0]
            if self.contextual and len(rest):
                targets, group = contextual_groups(metric[image, rest], self.contextual)
                assign[image, rest] = n + group
                order[image, n : n + len(targets)] = tokens.num_patches + torch.arange(len(targets), device=device)
                members = tokens.x[image, rest]
                is_target = torch.zeros(len(rest), dtype=torch.bool, device=device)
                is_target[targets] = True
                joined = torch.zeros(len(targets), members.shape[1], dtype=members.dtype, device=device)
                joined.index_add_(0, group[~is_target], members[~is_target])
                joined_count = torch.bincount(group[~is_target], minlength=len(targets)).clamp_min(1)
                contextual = members[targets] + joined / joined_count[:, None].to(members.dtype)
            else:
                assign[image, rest] = -1
            features.append(torch.cat([kept, contextual]))
        regrouped = tokens.regroup(assign, n + self.contextual, order=order)
        return regrouped.with_features(torch.nn.utils.rnn.pad_sequence(features, batch_first=True))
