"""Training LLaVA-Mini's modules (compressor queries + pre-fusion layers), with or without the LLM.

The `llava-mini` method (slimvlm.methods.llava_mini) holds the learned modules; this file wraps
the model and those modules in one nn.Module so that an optimizer, DDP or a
`transformers.Trainer` sees all the trainable parameters. The model is never left modified.

During training the forward is given labels: the method then leaves every labelled position
(the answer) out of the pre-fusion sequence, so those tokens keep their raw embeddings, as the
authors' training code does (it treats labelled tokens as padding) and as generated tokens do at inference.

    method = LlavaMini(budget=64, layers=4)
    trainer = llava_mini_trainer(method, model, args, dataset)   # args.remove_unused_columns=False
    trainer.train()
    method.save(folder)          # the caller's job: the Trainer's own checkpoints are not this format
    slimvlm.apply(model, f"llava-mini:weights={folder}")   # (with the fine-tuned model, if train_llm)

or by hand:

    module = LlavaMiniModule(method, model, teacher=copy.deepcopy(model))   # distil from the untouched model
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
from ..models import adapter_for
from ..registry import build
from .distillation import answer_logits, answer_weights, distillation_kl
from .spans import batch_span, causal_lm_loss, lm_logits, row_tokens
from .trainer import module_trainer


class LlavaMiniModule(nn.Module):
    """The LLaVA model and the method's LlavaMiniModules as one module.

    method: a LlavaMini instance or a "llava-mini:..." spec (its modules are built for `model`
    here, on the LM's device and dtype). train_llm: the paper fine-tunes the LLM together with
    the modules (True: the model's requires_grad flags are left as they are, so freeze e.g. the
    vision tower yourself if you want it frozen); False freezes every model parameter
    (requires_grad=False, done in place on the model) so only the LLaVA-Mini modules train.
    teacher: the untouched model to distil from (a copy of `model` taken before training), or None; the
    loss is then CE + distill * tau^2 * KL(teacher || student) of the answer's next-token distributions.

    forward(**batch) -> the loss (a scalar); batch: input_ids, attention_mask, pixel_values and labels
    (-100 where no loss is taken; labelled tokens are not pre-fused). A batch that says where its rows
    hold their one image (`image_start`, `image_tokens`, as SceneCollator gives them) runs the direct
    forward of train/spans.py: no host reads and static shapes, what torch.compile wants; any other
    batch runs through slimvlm.apply (the tests hold the two equal).
    """

    def __init__(self, method: LlavaMini | str, model: nn.Module, train_llm: bool = True,
                 teacher: nn.Module | None = None, distill: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        if isinstance(method, str):
            method = build(method)
        if not isinstance(method, LlavaMini):
            raise SlimVLMError(f"LlavaMiniModule trains a llava-mini method, not {method!r}")
        if distill < 0 or tau <= 0:
            raise SlimVLMError(f"distill={distill} must be at least 0 and tau={tau} above 0")
        self.model = model
        self.mini = method.build(model)
        method.trained_here = True
        self.train_llm = bool(train_llm)
        self._method = method
        self._teacher = [teacher.requires_grad_(False)] if teacher is not None else []  # not a submodule: never trained
        self.distill, self.tau = float(distill), float(tau)
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
        if "image_start" in batch:
            return self._direct_loss(batch)
        return self._applied_loss(batch)

    def direct_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, L', V), their labels) of the direct forward: the span of each row replaced by its C tokens."""
        span = batch_span(batch, self.model.config.image_token_id)
        full = row_tokens(self.model, batch)
        embeds = adapter_for(self.model).embed(batch["input_ids"])
        rows = self._method.train_rows(full, span, embeds, batch["labels"])
        return lm_logits(self.model, rows), span.splice_labels(batch["labels"], self._method.budget)

    def _direct_loss(self, batch: dict) -> torch.Tensor:
        logits, labels = self.direct_logits(batch)
        loss = causal_lm_loss(logits, labels)
        if not (self._teacher and self.distill):
            return loss
        span = batch_span(batch, self.model.config.image_token_id)
        with torch.no_grad():  # the teacher's rows: the span holds its own image's every token
            teacher = self._teacher[0]
            rows = span.splice(adapter_for(teacher).embed(batch["input_ids"]), row_tokens(teacher, batch).x)
            taught = lm_logits(teacher, rows)[:, span.start + span.length :]
        after = span.start + self._method.budget  # the text after the visual tokens lines up in both
        kl = distillation_kl(taught[:, :-1], logits[:, after:-1], self.tau, answer_weights(labels[:, after:]))
        return loss + self.distill * self.tau ** 2 * kl

    def _applied_loss(self, batch: dict) -> torch.Tensor:
        batch = {"use_cache": False, **batch}
        handle = apply(self.model, self._method)
        try:
            output = self.model(**batch)
            labels = handle.labels
        finally:
            handle.remove()
        if not (self._teacher and self.distill):
            return output.loss
        with torch.no_grad():
            taught = self._teacher[0](**batch).logits
        kl = distillation_kl(answer_logits(taught, batch["labels"]), answer_logits(output.logits, labels), self.tau)
        return output.loss + self.distill * self.tau ** 2 * kl


def llava_mini_trainer(method: LlavaMini | str, model: nn.Module, args, train_dataset, data_collator=None,
                       train_llm: bool = True, teacher: nn.Module | None = None, **kwargs):
    """A `transformers.Trainer` over LlavaMiniModule(method, model, train_llm, teacher): each step's loss is
    the model's loss with the method applied (plus the distillation from `teacher`, if given). The batches must
    hold input_ids, attention_mask, pixel_values and labels; `args.remove_unused_columns` must be False (the
    module's forward takes **batch). Saving: after `trainer.train()`, write the modules with
    `method.save(folder)` (and the model with `model.save_pretrained` if the LLM was trained) - the Trainer's
    own checkpoints hold the wrapper's state_dict, not the `llava-mini:weights=` format."""
    module = LlavaMiniModule(method, model, train_llm=train_llm, teacher=teacher)
    return module_trainer(module, args, train_dataset, data_collator, **kwargs)
