"""Training-time methods (stage 5): DualSpeed."""

from .dualspeed import DualSpeed, DualSpeedModule, ModeIsolator, distillation_kl, dualspeed_trainer, step_uniform

__all__ = ["DualSpeed", "DualSpeedModule", "ModeIsolator", "distillation_kl", "dualspeed_trainer", "step_uniform"]
