"""How many tokens each encoder layer merges for DyMU to reach a target (DyMU, arXiv 2504.17040, Sec. 3.1).

What `target` counts: the patch tokens (class token excluded) after the last encoder layer slimvlm
runs (adapter.vision_layers_run: 23 of 24 for LLaVA-1.5, whose feature layer is -2), i.e. the
visual tokens that reach the LLM with LLaVA's 'default' feature selection (576 untouched for
CLIP ViT-L/14-336). r_total = patches - target is split evenly over the layers run, the remainder
one each to the first layers (the authors' "constant" schedule); no layer may merge more than
ToMe's cap, half of its unprotected tokens ((t - 1) // 2 with the class token protected).
"""

from __future__ import annotations

from ...errors import SlimVLMError


def constant_schedule(patches: int, target: int, layers: int) -> list[int]:
    """The authors' constant r schedule: r_total = patches - target split evenly over `layers`, the
    remainder one each to the first layers."""
    base, extra = divmod(patches - target, layers)
    return [base + (1 if layer < extra else 0) for layer in range(layers)]


def _over_cap(schedule: list[int], patches: int, protected: int = 1) -> tuple[int, int, int] | None:
    """The first layer whose r exceeds ToMe's cap (t - protected) // 2, as (layer, r, cap), or None."""
    tokens = patches + protected
    for layer, r in enumerate(schedule):
        cap = (tokens - protected) // 2
        if r > cap:
            return layer, r, cap
        tokens -= r
    return None


def schedule_for(patches: int, target: int, layers: int) -> list[int]:
    """The r schedule for `target`, or a clear error if the target is out of reach."""
    if isinstance(target, bool) or not isinstance(target, int):
        raise SlimVLMError(f"target={target!r} must be a whole number of tokens")
    if not 1 <= target < patches:
        raise SlimVLMError(f"target={target} must be between 1 and {patches - 1} (an image has {patches} patch tokens)")
    schedule = constant_schedule(patches, target, layers)
    over = _over_cap(schedule, patches)
    if over is not None:
        lowest = target
        while lowest < patches and _over_cap(constant_schedule(patches, lowest, layers), patches) is not None:
            lowest += 1
        layer, r, cap = over
        raise SlimVLMError(
            f"target={target} is out of reach in {layers} encoder layers: layer {layer} would have to merge {r} tokens "
            f"per image but can merge at most {cap} (half of its tokens); the lowest target is {lowest}"
        )
    return schedule
