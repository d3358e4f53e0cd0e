"""A transformers.Trainer over a module whose forward returns the step's loss."""

from __future__ import annotations

from torch import nn

from ..errors import SlimVLMError


def module_trainer(module: nn.Module, args, train_dataset, data_collator=None, pass_step: bool = False,
                   train_sampler=None, prepare_batch=None, **kwargs):
    """Trainer whose loss is `module(**batch)` (or `module(global_step, **batch)` with pass_step,
    for methods whose step decides the mode). The batches must hold input_ids, attention_mask,
    pixel_values and labels, so `args.remove_unused_columns` must be False. `train_sampler`
    replaces the Trainer's random order (e.g. data.OneKindBatches); `prepare_batch` maps each batch
    once it is on the device (e.g. SceneCollator.on_device: raw pixels normalised there). Checkpoints (save_strategy
    "steps") are safetensors + JSON and resume exactly (checkpoints.SafetensorsCheckpoints)."""
    from transformers import Trainer

    from .checkpoints import SafetensorsCheckpoints

    if getattr(args, "remove_unused_columns", False):
        raise SlimVLMError("set remove_unused_columns=False in the TrainingArguments (the module's forward takes **batch)")

    class ModuleTrainer(SafetensorsCheckpoints, Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if prepare_batch is not None:
                inputs = prepare_batch(inputs)
            loss = model(self.state.global_step, **inputs) if pass_step else model(**inputs)
            return (loss, None) if return_outputs else loss

        def _get_train_sampler(self, *args, **kwargs):
            return train_sampler if train_sampler is not None else super()._get_train_sampler(*args, **kwargs)

    return ModuleTrainer(model=module, args=args, train_dataset=train_dataset, data_collator=data_collator, **kwargs)
