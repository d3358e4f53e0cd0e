"""AdamW and its learning-rate schedule.

Schedule (wall-clock driven, no step estimate needed): linear warmup over the first
``--warmup-steps`` steps (300; 100 with ``--init``), times a cosine from 1 to :data:`MIN_LR_RATIO`
over the training-progress fraction ``f`` (:class:`~.loop.Budget`: elapsed training time / time
available for training, or ``step / --steps`` if that is larger).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

MIN_LR_RATIO = 0.1


def adamw(modules: Sequence[torch.nn.Module], lr: float, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.98) over the trainable parameters, weight decay on matrices only."""
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), fused=fused)


def lr_factor(step: int, frac: float, warmup_steps: int) -> float:
    """Linear warmup over ``warmup_steps`` times a cosine from 1 to 0.1 over progress ``frac`` in [0, 1]."""
    warm = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    frac = min(max(frac, 0.0), 1.0)
    return warm * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * frac)))
