"""The fine-tuning recipe `slimvlm train` and the lab's experiments share, so that an experiment
measures what the command runs: which weights train, and the TrainingArguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def freeze_vision(model: nn.Module) -> int:
    """Freeze the vision encoder (as LLaVA's instruction tuning does; the projector and the LLM
    train). Returns the number of frozen parameters."""
    from ..models import adapter_for

    frozen = 0
    for parameter in adapter_for(model).vision.parameters():
        parameter.requires_grad_(False)
        frozen += parameter.numel()
    return frozen


def training_arguments(output_dir: str | Path, steps: int, batch_size: int, lr: float, seed: int, device: torch.device, **extra: Any):
    """The TrainingArguments of `slimvlm train` and of the lab's experiments (bf16 autocast on CUDA)."""
    from transformers import TrainingArguments

    options: dict[str, Any] = dict(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
        seed=seed, data_seed=seed, report_to=[], remove_unused_columns=False, save_strategy="no",
        logging_steps=max(1, steps // 20), use_cpu=device.type == "cpu", bf16=device.type == "cuda",
    )
    options.update(extra)
    return TrainingArguments(**options)
