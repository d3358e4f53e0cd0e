"""Training-time methods (stage 5): DualSpeed; training LLaVA-Mini's modules."""

from .compiled import compile_llm_layers, eager_llm_layers
from .distillation import distillation_kl
from .dualspeed import DualSpeed, DualSpeedModule, ModeIsolator, dualspeed_trainer, step_uniform
from .llava_mini import LlavaMiniModule, llava_mini_trainer

__all__ = [
    "DualSpeed",
    "DualSpeedModule",
    "LlavaMiniModule",
    "ModeIsolator",
    "compile_llm_layers",
    "distillation_kl",
    "eager_llm_layers",
    "dualspeed_trainer",
    "llava_mini_trainer",
    "step_uniform",
]
