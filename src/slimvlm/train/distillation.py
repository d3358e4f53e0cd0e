"""Self- and teacher distillation on the answer: the KL between two runs' next-token distributions at the
positions that predict a labelled token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SlimVLMError
from ..sequence import IGNORE_INDEX


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, V) logits of the positions that predict a labelled token (next-token shift), row-major. Indexing by
    the labels reads their count back to the host; `answer_weights` keeps the shapes instead."""
    return logits[:, :-1][answer_weights(labels).bool()]


def answer_weights(labels: torch.Tensor) -> torch.Tensor:
    """(B, L - 1) 1.0 where logits[:, :-1] predict a labelled token, else 0.0."""
    return (labels[:, 1:] != IGNORE_INDEX).float()


def distillation_kl(teacher: torch.Tensor, student: torch.Tensor, tau: float,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(teacher / tau) || softmax(student / tau)) per position of (..., V) logits, in float32, averaged
    over the positions, or over those `weights` (the leading shape, 0/1) marks: one formula for logits indexed to
    the answer and for aligned rows masked to it."""
    if teacher.shape != student.shape:
        raise SlimVLMError(f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student.shape)} do not align")
    log_t = F.log_softmax(teacher.float() / tau, dim=-1)
    log_s = F.log_softmax(student.float() / tau, dim=-1)
    per_position = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    if weights is None:
        return per_position.mean() if per_position.numel() else student.sum() * 0.0
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)
