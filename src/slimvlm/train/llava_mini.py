"""Training LLaVA-Mini's modules (compressor queries + pre-fusion layers), with or without the LLM.

The `llava-mini` method (slimvlm.methods.llava_mini) holds the learned modules; this file wraps
the model and those modules in one nn.Module so that an optimizer, DDP or a
`transformers.Trainer` sees all the trainable parameters, and each forward installs the method
for the duration of the call only (the model is never left modified).

During training the forward is given labels: the method then leaves every labelled position
(the answer) out of the pre-fusion sequence, so those tokens keep their raw embeddings, as the
authors' training code does and as generated tokens do at inference.

    method = LlavaMini(budget=64, layers=4)
    trainer = llava_mini_trainer(method, model, args, dataset)   # args.remove_unused_columns=False
    trainer.train()
    method.save(folder)          # the caller's job: the Trainer's own checkpoints are not this format
    slimvlm.apply(model, f"llava-mini:weights={folder}")   # (with the fine-tuned model, if train_llm)

or by hand:

    module = LlavaMiniModule(method, model)
    optimizer = torch.optim.AdamW(p for p in module.parameters() if p.requires_grad)
    for batch in loader:   # input_ids, attention_mask, pixel_values, labels (-100 where no loss)
        module(**batch).backward(); optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import torch
from torch import nn

from ..api import apply
from ..errors import SlimVLMError
from ..methods.llava_mini import LlavaMini
from ..registry import build
from .trainer import module_trainer


class LlavaMiniModule(nn.Module):
    """The LLaVA model and the method's LlavaMiniModules as one module.

    method: a LlavaMini instance or a "llava-mini:..." spec (its modules are built for `model`
    here, on the LM's device and dtype). train_llm: the paper fine-tunes the LLM together with
    the modules (True: the model's requires_grad flags are left as they are, so freeze e.g. the
    vision tower yourself if you want it frozen); False freezes every model parameter
    (requires_grad=False, done in place on the model) so only the LLaVA-Mini modules train.

    forward(**batch) -> the model's loss (a scalar); batch: input_ids, attention_mask,
    pixel_values and labels (-100 where no loss is taken; labelled tokens are not pre-fused).
    """

    def __init__(self, method: LlavaMini | str, model: nn.Module, train_llm: bool = True) -> None:
        super().__init__()
        if isinstance(method, str):
            method = build(method)
        if not isinstance(method, LlavaMini):
            raise SlimVLMError(f"LlavaMiniModule trains a llava-mini method, not {method!r}")
        self.model = model
        self.mini = method.build(model)
        method.trained_here = True
        self.train_llm = bool(train_llm)
        self._method = method
        if not self.train_llm:
            for param in model.parameters():
                param.requires_grad_(False)

    @property
    def method(self) -> LlavaMini:
        return self._method

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        if batch.get("labels") is None:
            raise SlimVLMError("the batch needs labels (-100 where no loss is taken)")
        if getattr(self.model, "_slimvlm_handle", None) is not None:
            raise SlimVLMError("slimvlm is applied to the model; remove it before LLaVA-Mini training (each step installs its own)")
        batch.setdefault("use_cache", False)
        handle = apply(self.model, self._method)
        try:
            output = self.model(**batch)
        finally:
            handle.remove()
        return output.loss


def llava_mini_trainer(method: LlavaMini | str, model: nn.Module, args, train_dataset, data_collator=None,
                       train_llm: bool = True, **kwargs):
    """A `transformers.Trainer` over LlavaMiniModule(method, model, train_llm): each step's loss is
    the model's loss with the method applied. The batches must hold input_ids, attention_mask,
    pixel_values and labels; `args.remove_unused_columns` must be False (the module's forward
    takes **batch). Saving: after `trainer.train()`, write the modules with `method.save(folder)`
    (and the model with `model.save_pretrained` if the LLM was trained) - the Trainer's own
    checkpoints hold the wrapper's state_dict, not the `llava-mini:weights=` format."""
    module = LlavaMiniModule(method, model, train_llm=train_llm)
    return module_trainer(module, args, train_dataset, data_collator, **kwargs)
