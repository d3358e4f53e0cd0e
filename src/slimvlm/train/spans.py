"""Training forwards on batches whose every row holds one image's placeholders as one span at one place.

LLaVA's training data and the testbed's collator put each sample's image at a fixed place of a fixed
prompt template and pad the rows on the right. On such a batch a stage-2 method's tokens replace the
span by plain slicing: every row keeps one length, the LM runs with no mask (under the causal mask no
real token sees the trailing pads, which carry no label), nothing is read back to the host and every
shape is known ahead, so a step compiles. That is what lets a pruned training step cost less than a
full one (DualSpeed) and LLaVA-Mini train fast. Everything else (several images, left padding, images
at different places) goes through the runtime's general rebuild (`slimvlm.apply`); the tests hold the
two equal on the batches both take.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..errors import SlimVLMError
from ..models import adapter_for
from ..models.adapter import run_causal
from ..sequence import IGNORE_INDEX
from ..method import PromptContext
from ..tokens import VisualTokens


@dataclass(frozen=True)
class ImageSpan:
    """Where every row of a batch holds its image: placeholder columns start .. start + length - 1."""

    start: int
    length: int

    @classmethod
    def of(cls, input_ids: torch.Tensor, image_token_id: int) -> "ImageSpan":
        """The span of a batch, checked: one read from the device. A collator that builds the rows knows it
        already and can hand it over instead (`image_start` in the batch), saving the read."""
        placeholders = input_ids == image_token_id
        count, first, last = torch.stack([placeholders.sum(dim=1), placeholders.int().argmax(dim=1),
                                          input_ids.shape[1] - 1 - placeholders.flip(1).int().argmax(dim=1)]).tolist()
        span = cls(first[0], count[0])
        if count[0] == 0 or any(c != span.length for c in count) or any(f != span.start for f in first) or any(
                e != span.start + span.length - 1 for e in last):
            raise SlimVLMError(
                "this batch's rows do not each hold one image as one run of placeholders at the same column "
                f"(placeholders per row {count}, first at {first}); collate one image per sample at a fixed place "
                "(right padding), or train through slimvlm.apply, which takes any layout"
            )
        return span

    def splice(self, rows: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """rows (B, L, ...) with the span replaced by visual (B, K, ...): (B, L - length + K, ...)."""
        return torch.cat([rows[:, : self.start], visual.to(rows.dtype), rows[:, self.start + self.length :]], dim=1)

    def splice_labels(self, labels: torch.Tensor, visual_tokens: int) -> torch.Tensor:
        """The labels of a spliced row: no loss on the `visual_tokens` that fill the span."""
        fill = labels.new_full((labels.shape[0], visual_tokens), IGNORE_INDEX)
        return self.splice(labels, fill)

    def text(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (B, L, ...) with the span cut out: each row's text, in order."""
        return torch.cat([rows[:, : self.start], rows[:, self.start + self.length :]], dim=1)


def batch_span(batch: dict, image_token_id: int) -> ImageSpan:
    """The batch's span: from its `image_start` (an int the collator set; no read), else found on the device."""
    start = batch.get("image_start")
    if start is None:
        return ImageSpan.of(batch["input_ids"], image_token_id)
    return ImageSpan(int(start), int(batch["image_tokens"]))


def visual_tokens(model, pixel_values: torch.Tensor, image_sizes=None) -> VisualTokens:
    """Stages 1-2 with no method: each image's tokens as the LLM would take them (the vision tower to its
    feature layer, the feature selection, the projector and the family's packing)."""
    adapter = adapter_for(model)
    tokens, _ = adapter.encode(adapter.views(pixel_values, image_sizes, False), None)
    return adapter.pack(adapter.project(tokens))


def row_tokens(model, batch: dict, method=None) -> VisualTokens:
    """Each row's image tokens, through a stage-2 `method` if given (its project(), per image), for images that
    all end with the same number (what a span of one length takes). batch['pixel_values'] holds one image a row,
    or the images that rows share through batch['image_index'] (the testbed collator's: a scene's questions
    share its image, which the vision tower and the method then run on once)."""
    tokens = visual_tokens(model, batch["pixel_values"], batch.get("image_sizes"))
    if method is not None:
        context = PromptContext(input_ids=None, image_of_sample=[[i] for i in range(tokens.batch_size)])
        tokens = method.project(tokens, context)
    counts = tokens.host_counts()
    if len(set(counts)) > 1 or counts[0] != tokens.x.shape[1]:
        raise SlimVLMError(f"images with different token counts ({sorted(set(counts))}) do not fit one span length; "
                           "train through slimvlm.apply")
    index = batch.get("image_index")
    if index is None:
        return tokens
    return replace(tokens, x=tokens.x[index], size=tokens.size[index], origin=tokens.origin[index],
                   patch_to_token=tokens.patch_to_token[index], known=[counts[0]] * index.shape[0], view_slots=None)


def lm_logits(model, embeds: torch.Tensor) -> torch.Tensor:
    """The LM's logits (B, L, V) over right-padded rows of input embeddings, positions 0.. and no mask: its
    decoder layers, norm and head as its own forward runs them, without the forward's read of whether the
    mask can be dropped (models/adapter.py: run_causal)."""
    adapter = adapter_for(model)
    lm = adapter.language_model
    hidden = run_causal(adapter.llm_layers, embeds, adapter.position_embeddings, adapter.text_config._attn_implementation)
    return adapter.lm_head(lm.norm(hidden))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each labelled token given the positions before it (as transformers' causal LM loss)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
