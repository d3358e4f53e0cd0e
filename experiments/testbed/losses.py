"""The training losses: the answer's cross-entropy plus :data:`AUX_WEIGHT` x the auxiliary losses.

The auxiliary losses read the vision tower's feature layer (``hidden_states[-2]``): a linear head on
the CLS hidden state predicts, with BCE, which (colour, shape) pairs and which words are in the
scene (slimvlm's CLS-attention methods need a CLS token that carries a trained global signal;
without this loss the CLS row of a LLaVA tower gets no gradient at all, the "default" feature
selection drops it); per-patch heads predict what covers each patch and the patch's grid row and
column (cross-entropy); the *word bag* (:func:`~.targets.word_bag_matrix`) asks each projected patch
to name what covers it in the LM's own input-embedding space; and *guided attention*
(:func:`guided_attention_loss`): decoder layer :data:`GUIDED_LAYER`'s attention from the answer
position should fall on the patches the question names, one head group per named object. The heads
are training-only: not part of the saved model (:data:`AUX_HEADS_FILE` beside it keeps them for
``--init``).

Why guided attention: without it, three H100 runs (0.6M-1.6M samples, with and without the
curriculum and the word bag) stayed at chance (35-38% held-out): the LM learned the answer priors
and never learned to find the named object among 576 patches. With it, continuing the
1.6M-sample run for 5.6 minutes reached 61% (shape 100%, colour 78%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimvlm.attention import apply_rope, attention_rows
from slimvlm.errors import SlimVLMError
from slimvlm.testbed import scenes

from .targets import AUX_LABELS, GUIDED_GROUPS, PATCH, PATCH_CLASSES

AUX_WEIGHT = 0.5
GUIDED_LAYER = 2  # decoder layer whose attention from the answer position is guided to the asked patches
AUX_HEADS_FILE = "aux_heads.safetensors"  # training-only heads, saved beside the model so --init can resume them


class AuxHeads(torch.nn.Module):
    """Training-only heads on the vision tower's feature layer: CLS -> which pairs/words are in the
    scene (a global signal for CLS-attention methods), each patch -> what covers it and which grid
    row and column it sits in (keeps 2D position linearly readable for the position/quadrant
    questions: the LM itself only has 1D RoPE over the raster order)."""

    def __init__(self, width: int, word_bag: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cls = torch.nn.Linear(width, len(AUX_LABELS))
        self.patch = torch.nn.Linear(width, PATCH_CLASSES)
        self.grid = torch.nn.Linear(width, 2 * (scenes.IMAGE_SIZE // PATCH))
        # (PATCH_CLASSES, vocab) multi-hot: the words that name what covers a patch (not saved)
        self.register_buffer("word_bag", word_bag, persistent=False)


def forward_losses(model, head: AuxHeads, batch: dict[str, torch.Tensor], pixel_values: torch.Tensor):
    """(lm_loss, aux_loss, answer_correct) with the vision tower run once per scene, features shared by
    its questions; ``answer_correct`` (B,) says whether the first answer token is the argmax
    (teacher-forced training accuracy, logged per question type)."""
    inner = model.model
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise SlimVLMError("the testbed trainer supports a single int vision_feature_layer")
    # The vision tower's own forward and LLaVA's projector, placed into the embeddings by hand: the
    # same computation as LlavaForConditionalGeneration.forward on every transformers 5.x release.
    hidden = inner.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer]
    cls = hidden[:, 0]  # (S, vision_hidden): CLS at the feature layer
    patches = hidden[:, 1:]
    if model.config.vision_feature_select_strategy == "default":
        hidden = patches
    features = inner.multi_modal_projector(hidden)  # (S, 576, D)
    per_question = features.index_select(0, batch["image_index"])  # (B, 576, D)
    if "visual_keep" in batch:  # a shortened image span (token dropout)
        keep = batch["visual_keep"]
        per_question = per_question.gather(1, keep[..., None].expand(-1, -1, per_question.shape[-1]))
    embeds = model.get_input_embeddings()(batch["input_ids"])
    placeholders = (batch["input_ids"] == model.config.image_token_id)[..., None]
    embeds = embeds.masked_scatter(placeholders, per_question.to(embeds.dtype))
    # No attention_mask: batches are right-padded, so under the causal mask no real token sees a pad
    # (pads carry label -100); this keeps SDPA on its fastest causal kernel.
    labels = batch["labels"]
    guided = "attention_target" in batch
    out = model(inputs_embeds=embeds, labels=labels, output_hidden_states=guided)
    first = (labels != -100).int().argmax(1)  # each row's first answer token
    rows = torch.arange(labels.shape[0], device=labels.device)
    correct = (out.logits[rows, first - 1].argmax(-1) == labels[rows, first]).float()
    aux_loss = F.binary_cross_entropy_with_logits(head.cls(cls).float(), batch["aux_target"].float())
    aux_loss = aux_loss + F.cross_entropy(head.patch(patches).flatten(0, 1).float(), batch["patch_target"].flatten())
    side = scenes.IMAGE_SIZE // PATCH
    grid_logits = head.grid(patches).float().unflatten(-1, (2, side))  # (S, 576, 2, side)
    index = torch.arange(side * side, device=patches.device)
    grid_target = torch.stack([index // side, index % side], -1).expand(patches.shape[0], -1, -1)  # (row, col)
    aux_loss = aux_loss + F.cross_entropy(grid_logits.flatten(0, 2), grid_target.flatten())
    if head.word_bag is not None:
        words = model.get_input_embeddings().weight[: head.word_bag.shape[1]]
        # on RMS-normalised features (what the LM's first norm sees), so the loss cannot be met by
        # inflating the features
        unit = features.float() * torch.rsqrt(features.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        bag_logits = unit @ words.float().T  # (S, 576, vocab)
        aux_loss = aux_loss + F.binary_cross_entropy_with_logits(bag_logits, head.word_bag[batch["patch_target"]])
    if guided:
        span = placeholders[..., 0, None].expand(-1, -1, GUIDED_GROUPS)  # (B, T, G)
        target = torch.zeros(span.shape, device=labels.device).masked_scatter(
            span, batch["attention_target"].float().transpose(1, 2).contiguous()
        ).transpose(1, 2)  # (B, G, T)
        aux_loss = aux_loss + guided_attention_loss(model, out.hidden_states[GUIDED_LAYER], first - 1, target)
    return out.loss, aux_loss, correct


def guided_attention_loss(model, hidden: torch.Tensor, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over head groups of -log of the attention mass (mean over the group's heads) that decoder
    layer ``GUIDED_LAYER`` puts, from each row's ``query`` position (the one that predicts the
    answer), on that group's ``target`` positions (B, GUIDED_GROUPS, T: the patches of the object
    the group reads, see :func:`~.targets.question_patches`); rows with no target count 0.

    ``hidden`` is that layer's input (right-padded rows, positions 0..T-1, causal). The attention
    row is rebuilt from the layer's own q/k projections and rotary embedding, beside SDPA.
    Guiding one layer's attention to the named object teaches the binding that answer-only
    training did not find in 1.6M samples; one head group per object keeps two objects apart for
    the comparisons (position, size) that one pooled read cannot answer."""
    layer = model.model.language_model.layers[GUIDED_LAYER]
    attn = layer.self_attn
    b, t, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    rows = torch.arange(b, device=hidden.device)
    positions = torch.arange(t, device=hidden.device).expand(b, t)
    cos, sin = model.model.language_model.rotary_emb(normed, position_ids=positions)
    d = attn.head_dim
    q = attn.q_proj(normed[rows, query]).view(b, -1, 1, d)
    k = attn.k_proj(normed).view(b, t, -1, d).transpose(1, 2)
    q = apply_rope(q, cos[rows, query][:, None], sin[rows, query][:, None])
    k = apply_rope(k, cos, sin)
    allowed = (positions <= query[:, None])[:, None, None, :]
    weights = attention_rows(q, k, attn.scaling, allowed=allowed)[:, :, 0]  # (B, H, T)
    groups = weights.unflatten(1, (GUIDED_GROUPS, -1)).mean(2)  # (B, G, T): heads in order, one block per group
    mass = (groups * target).sum(-1)  # (B, G)
    has_target = (target.sum((1, 2)) > 0).float()
    per_row = -(mass + 1e-4).log().mean(1)
    return (per_row * has_target).sum() / has_target.sum().clamp_min(1.0)
