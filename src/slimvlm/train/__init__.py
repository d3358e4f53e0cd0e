"""Training-time methods (stage 5): DualSpeed."""

from .dualspeed import DualSpeed, ModeIsolator, distillation_kl, remap_labels, step_uniform

__all__ = ["DualSpeed", "ModeIsolator", "distillation_kl", "remap_labels", "step_uniform"]
