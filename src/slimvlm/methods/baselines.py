"""Stage-2 baselines: keep everything, keep a random subset, a spatially uniform subset, or pool."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SlimVLMError
from ..registry import register
from ..method import BudgetSpec, Method, PromptContext, Stage, check_budget, check_ratio
from ..tokens import VisualTokens

if TYPE_CHECKING:
    from ..models.adapter import LanguageModelAdapter


@register
class NoReduction(Method):
    name = "none"
    description = "keep every visual token (the untouched model; the no-op)"
    stages = frozenset()


class BudgetMethod(Method):
    """A stage-2 method that keeps `budget` tokens per image, or a `ratio` of them."""

    stages = frozenset({Stage.PROJECT})

    def __init__(self, budget: int | None = None, ratio: float | None = None) -> None:
        if (budget is None) == (ratio is None):
            raise SlimVLMError(f"{self.name}: give exactly one of budget (tokens per image) or ratio (fraction kept)")
        self.budget = budget
        self.ratio = check_ratio("ratio", ratio) if ratio is not None else None

    @classmethod
    def spec_for_budget(cls, adapter: LanguageModelAdapter, budget: int, **context: Any) -> BudgetSpec:
        return f"{cls.name}:budget={budget}"

    def check_model(self, num_vision_layers: int, num_llm_layers: int, tokens_per_image: int) -> None:
        if self.budget is not None:
            check_budget("budget", self.budget, tokens_per_image)

    def target(self, available: int) -> int:
        """Tokens to keep of `available`: the budget, or round(ratio * available), at least 1."""
        if self.budget is not None:
            return check_budget("budget", self.budget, available, "a visual item of this input (an image or a video)")
        return max(1, round(self.ratio * available))


@register
class RandomKeep(BudgetMethod):
    name = "random"
    description = "keep a random subset of the visual tokens (seeded: the same subset for every image of a count)"

    def __init__(self, budget: int | None = None, ratio: float | None = None, seed: int = 0) -> None:
        super().__init__(budget, ratio)
        self.seed = seed

    def project(self, tokens: VisualTokens, context: PromptContext) -> VisualTokens:
        keep = torch.zeros_like(tokens.valid)
        counts = [self.target(count) for count in tokens.host_counts()]
        for image, (count, kept) in enumerate(zip(tokens.host_counts(), counts)):
            # a generator per image: what an image keeps does not depend on the images before it in the batch
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            keep[image, torch.randperm(count, generator=generator)[:kept].to(keep.device)] = True
        return tokens.keep(keep, counts=counts)


def uniform_indices(count: int, keep: int) -> torch.Tensor:
    """keep indices spread evenly over range(count): the centre of each of `keep` equal bins."""
    return ((torch.arange(keep, dtype=torch.float64) + 0.5) * count / keep).floor().long()


@register
class UniformKeep(BudgetMethod):
    name = "uniform"
    description = "keep a spatially uniform subsample of the visual tokens (a regular sub-grid when it fits)"

    def project(self, tokens: VisualTokens, context: PromptContext) -> VisualTokens:
        rows, cols = tokens.grid or (0, 0)  # no grid (views packed into a layout): evenly along the tokens
        keep = torch.zeros_like(tokens.valid)
        kept = []
        for image, count in enumerate(tokens.host_counts()):
            target = self.target(count)
            kept.append(target)
            side = math.isqrt(target)
            if count == rows * cols and side * side == target:
                r = uniform_indices(rows, side)
                c = uniform_indices(cols, side)
                chosen = (r[:, None] * cols + c[None, :]).flatten()
            else:
                chosen = uniform_indices(count, target)
            keep[image, chosen.to(keep.device)] = True
        return tokens.keep(keep, counts=kept)


@register
class Pool(BudgetMethod):
    name = "pool"
    description = "2D average pooling of the visual-token grid down to a budget (a square number of tokens)"
    capturable = True
    needs_patch_grid = True

    @classmethod
    def spec_for_budget(cls, adapter: LanguageModelAdapter, budget: int, **context: Any) -> BudgetSpec:
        side = round(math.sqrt(budget))  # the square nearest the budget
        return f"pool:budget={side * side}"

    def check_model(self, num_vision_layers: int, num_llm_layers: int, tokens_per_image: int) -> None:
        if math.isqrt(tokens_per_image) ** 2 != tokens_per_image:
            raise SlimVLMError(
                f"pool averages the square grid of patch tokens, but this model gives {tokens_per_image} tokens per "
                "image (vision_feature_select_strategy='full' keeps the class token); use random, uniform or "
                "divprune, or a model with the 'default' strategy"
            )
        super().check_model(num_vision_layers, num_llm_layers, tokens_per_image)
        target = self.target(tokens_per_image)
        side = math.isqrt(target)
        if side * side != target:
            raise SlimVLMError(f"pool needs a square budget (e.g. 64, 144), got {target}; pick budget={side * side}")

    def project(self, tokens: VisualTokens, context: PromptContext) -> VisualTokens:
        rows, cols = tokens.grid
        if tokens.has_cls or any(count != rows * cols for count in tokens.host_counts()):
            raise SlimVLMError("pool needs the full token grid; do not combine it with a stage-1 method that merges tokens")
        side = math.isqrt(self.target(rows * cols))
        if side * side != self.target(rows * cols):
            raise SlimVLMError("pool needs a square budget (e.g. 64, 144)")
        r = torch.arange(rows, device=tokens.x.device) * side // rows
        c = torch.arange(cols, device=tokens.x.device) * side // cols
        cell = (r[:, None] * side + c[None, :]).flatten()
        # adaptive average pooling with bins of (nearly) equal size: each patch joins its cell
        assign = cell.expand(tokens.batch_size, -1).clone()
        return tokens.regroup(assign, side * side, counts=[side * side] * tokens.batch_size)
