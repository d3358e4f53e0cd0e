"""The curriculum: training scenes start simple and grow to the held-out mix.

A training scene's target complexity (see :mod:`slimvlm.testbed.scenes`) is uniform on
``[0, cap]``, the cap rising linearly from :data:`CURRICULUM_START` (1-3 objects, little clutter)
at global step 0 to 1.0 at ``--curriculum-steps`` (default 3000; 0 disables); from then on scenes
are drawn exactly like the held-out ones. Evaluation always uses the standard held-out set. The
global step counts over an ``--init`` chain (its runs without a curriculum count 0: the ramp
restarts).
"""

from __future__ import annotations

import numpy as np

CURRICULUM_START = 0.15  # scene-complexity cap at global step 0 (1-3 objects, little clutter)


def curriculum_cap(step: int, curriculum_steps: int) -> float:
    """Upper end of the scene-complexity range at global ``step``: :data:`CURRICULUM_START` at step 0,
    rising linearly to 1.0 at ``curriculum_steps`` and staying there; always 1.0 when ``curriculum_steps``
    is 0 (curriculum off)."""
    if curriculum_steps <= 0:
        return 1.0
    ramp = min(1.0, max(step, 0) / curriculum_steps)
    return CURRICULUM_START + (1.0 - CURRICULUM_START) * ramp


def scene_complexity(seed: int, cap: float) -> float | None:
    """The target complexity handed to ``scenes.layout`` for a scene seed under ``cap``: uniform on
    [0, cap], drawn from the seed (deterministic). ``None`` at cap 1, so that ``layout`` draws its own
    uniform target and the scene is exactly the standard (held-out-like) scene of that seed."""
    if cap >= 1.0:
        return None
    return float(np.random.default_rng([seed, 0xC0C]).uniform(0.0, cap))
