"""Training-time methods (stage 5): DualSpeed."""

from .dualspeed import DualSpeed, ModeIsolator, distillation_kl, step_uniform

__all__ = ["DualSpeed", "ModeIsolator", "distillation_kl", "step_uniform"]
