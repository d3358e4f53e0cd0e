"""The Gemma 3 adapter: Gemma3ForConditionalGeneration = a SigLIP vision tower (no class token, no pre-layernorm),
a projector that average-pools each image's patch grid to mm_tokens_per_image tokens (64 x 64 patches to 16 x 16
at 896 px), norms them and projects them without bias, and a Gemma 3 LM: five sliding-window layers to one global
one, each kind with its own rotary base, and image tokens that attend to each other both ways within each run of
them (with the processor's token_type_ids; without them the model's mask is causal).

Where methods act on it:
- stage 1 inside the tower (tome, dymu:vtu=false, mustdrop's window merge and important set) runs on each image's
  patches through SigLIP's layers, as on a LLaVA-OneVision crop. The pooling reads the whole grid, so each patch
  takes its merged token's features before it (models/units.py, as before InternVL's pixel shuffle): an image still
  gives the LLM its mm_tokens_per_image tokens, and stage 1 saves encoder compute alone;
- visionzip on the pooled tokens, each block of patches whole (as on InternVL's shuffled tokens): a token's score
  is the attention its patches receive in the last layer, averaged over heads and all queries (no class token:
  LightCompress's SigLIP score), then over its patches; its key their keys' mean;
- stage 2 (divprune, random, uniform, pool on the pooled grid) on each image's projected tokens; the kept tokens
  of an image are one run in the rebuilt prompt, and with token_type_ids they attend to each other both ways, as
  the model's own tokens do (prompt_mask);
- stage 3 drops (fastv, mustdrop's filter) on every layer, sliding ones included: the rows they score by see the
  layer's window (AttentionParts.window), and the layers after a drop get the masks the model makes for the kept
  tokens alone (the window over their indices, each image's kept tokens one two-way block) and each kind of layer
  its own rotary embedding at the kept positions; decode steps run the LM's own forward (its sliding caches keep
  the window), each view's masks sized by its layers' caches;
- slimvlm's static cache (generate(cache_implementation="static")) runs all of the above: the LM's own forward
  fills it (or, after a drop, the dynamic cache it hands over), and each decode step gives each kind of layer its
  own mask (the window on the cache's slots, as transformers' sliding layers count it) and rotary embedding
  (runtime/static_cache.py); generate()'s 4D prompt mask holds the image blocks (two_way_pairs);
- refused: stage 4 (mustdrop's output-aware cache: a sliding layer's cache holds only the window, which slimvlm's
  cut does not follow), vtu (nothing stays merged past the pooling), llava-mini (its modules are laid out a
  projected token per patch).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn
from transformers.models.gemma3 import modeling_gemma3
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gemma3.modeling_gemma3 import Gemma3CausalLMOutputWithPast

from ..errors import SlimVLMError
from ..attention import received_attention
from ..method import EncoderAttention, Method, Stage, no_rows
from ..sequence import Sequence
from ..tokens import VisualTokens
from .adapter import DecodeParts
from .llava import LlavaAdapter
from .pixel_shuffle import unit_mean, unmerged
from .units import UnitViews


class Gemma3Adapter(UnitViews, LlavaAdapter):
    """LLaVA's encoder loop on Gemma 3's SigLIP, one view per image; the average pooling and projector after it, and
    the LM's two-way image blocks (see the module's docstring). grid and tokens_per_image are an image's patches,
    units its pooled grid and view_tokens their number: an image's tokens for the LLM."""

    family = "gemma3"
    name = "Gemma 3"  # in messages
    output_class = Gemma3CausalLMOutputWithPast
    joined_by = "projector's pooling"
    masks_layer_kinds = True
    vision_towers = ("SiglipVisionModel", "SiglipVisionTransformer")
    has_cls = False
    instead = ("visionzip (on the pooled tokens), a stage-2 method (divprune, random, uniform, pool), a stage-1 method in "
               "the tower (tome, dymu:vtu=false) or a stage-3 drop (fastv, mustdrop:output_cache=false)")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        rows, cols = self.grid
        tokens = self.config.mm_tokens_per_image
        side = math.isqrt(tokens)
        if side * side != tokens or rows != cols or rows % side:
            raise SlimVLMError(
                f"mm_tokens_per_image={tokens} on a {rows} x {cols} patch grid: Gemma 3's projector average-pools a square "
                "grid into a square number of tokens whose side divides it; use a checkpoint whose config does (256 on "
                "64 x 64 patches)"
            )
        self._join_units(rows // side)

    def _feature_selection(self, config) -> tuple[int, str]:
        """Every SigLIP layer, every patch: the model reads the tower's last_hidden_state (after post_layernorm)."""
        return -1, "full"

    def _embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP's patch embeddings: no class token, no pre-layernorm."""
        return self.vision.embeddings(pixel_values)

    # ---- which methods run here ----------------------------------------------------------------
    @classmethod
    def refusal(cls, method: Method) -> str | None:
        """The units' refusals (virtual unmerging, LLaVA-Mini), then a stage-4 cut (the module's docstring says
        why)."""
        reason = super().refusal(method)
        if reason is None and Stage.DECODE in method.stages:
            return (f"{method.name} cuts each LLM layer's KV cache after prefill (stage 4), but {cls.name}'s sliding-window "
                    "layers keep only their window's entries, which slimvlm's cut does not follow yet; use "
                    f"{cls.instead}")
        return reason

    # ---- stage 1 on the pooled tokens (VisionZip) -------------------------------------------------
    def _encode_output(self, method: Method, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        """A method that acts on merged tokens chooses among each image's pooled, projected tokens: a token's score is
        the attention its patches receive in the last layer (mean over heads and all queries: SigLIP has no class
        token; mean over its patches), its key their keys' mean; others as on LLaVA."""
        if not method.at_merged_tokens:
            return super()._encode_output(method, attention, tokens)
        received = received_attention(attention.rows, tokens.valid)
        units = EncoderAttention(layer=attention.layer, num_layers=attention.num_layers,
                                 keys=unit_mean(attention.keys, self.grid, self.block), rows=no_rows,
                                 received=unit_mean(received[..., None], self.grid, self.block)[..., 0],
                                 keep_width=attention.keep_width)
        return method.encode_output(units, self.pooled(tokens))

    # ---- after the tower: pooling and projector ----------------------------------------------
    def project(self, tokens: VisualTokens, keep_cls: bool = False) -> VisualTokens:
        """The tower's tokens pooled and projected; those a method chose among the pooled tokens in encode (VisionZip:
        they carry their patches' units, view_slots) are the LLM's already."""
        return tokens if tokens.view_slots is not None else self.pooled(tokens)

    def pooled(self, tokens: VisualTokens) -> VisualTokens:
        """Each image's patches (merged tokens unmerged onto them) through SigLIP's post_layernorm and the model's own
        projector (pooling, norm, projection): its pooled tokens as fresh tokens on the units grid."""
        return self.unit_tokens(self.projector(self.vision.post_layernorm(unmerged(tokens))))

    # ---- the language model ----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The scaled text embeddings; a placeholder id past the vocabulary embeds as id 0, as the model does (its
        rows take the image's tokens)."""
        if self.image_token_id >= self.text_config.vocab_size:
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return super().embed(input_ids)

    def mask_inputs(self, arguments: dict) -> dict:
        """Whether the call gave token_type_ids: the model's image blocks attend both ways only then."""
        return {"both_ways": arguments.get("token_type_ids") is not None}

    def two_way_visual_runs(self, mask_inputs: dict) -> bool:
        return mask_inputs["both_ways"]

    def prompt_mask(self, sequence: Sequence, embeds: torch.Tensor, cache, mask_inputs: dict) -> torch.Tensor | dict:
        """With token_type_ids, the model's own masks with each run of visual tokens attending to itself both ways
        (on sliding layers within the window), the runs those of the rebuilt prompt: an image's kept tokens are one
        run. Without them, the causal masks the LM builds from the 2D mask, as the model does."""
        if not mask_inputs["both_ways"]:
            return super().prompt_mask(sequence, embeds, cache, mask_inputs)
        return self._prefill_masks(sequence, embeds, cache)

    def _prefill_masks(self, sequence: Sequence, like: torch.Tensor, cache) -> dict:
        """Per kind of layer, the model's own masks over `sequence` with each run of its visual tokens one block."""
        blocks = modeling_gemma3.get_block_sequence_ids_for_mask(sequence.visual.long())
        # positional: the cache's keyword is past_key_values before transformers 5.24
        return modeling_gemma3.create_masks_for_vision_model(self.text_config, like, sequence.valid.long(), cache,
                                                             sequence.positions, blocks)

    def view_prefill_mask(self, sequence: Sequence, hidden: torch.Tensor, mask_dtype: torch.dtype | None,
                          mask_inputs: dict) -> dict:
        """After a drop, per kind of layer: the masks the model makes for the kept tokens alone (the window over their
        indices; each image's kept tokens one two-way block where the call gave token_type_ids), on caches those
        layers have not filled yet."""
        if mask_inputs["both_ways"]:
            return self._prefill_masks(sequence, hidden, None)
        valid = sequence.valid.long()
        return {"full_attention": create_causal_mask(self.text_config, hidden, valid, None, sequence.positions),
                "sliding_attention": create_sliding_window_causal_mask(self.text_config, hidden, valid, None,
                                                                       sequence.positions)}

    def view_decode_mask(self, view, steps: int, mask_dtype: torch.dtype | None, session, positions: torch.Tensor) -> dict:
        """Per kind of layer of the view, the masks the model makes for a decode step over the view's entries, sized
        by its first layer of that kind in the cache (a sliding layer's holds its window alone)."""
        like = torch.empty(view.key_valid.shape[0], steps, 0, dtype=self.model.dtype, device=view.key_valid.device)
        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        masks = {}
        for layer, kind in enumerate(self.layer_kinds):
            if kind not in masks and session.layer_views[layer] is view:
                masks[kind] = makers[kind](self.text_config, like, view.key_valid.long(), session.cache, positions,
                                           layer_idx=layer)
        return masks

    def view_position_embeddings(self, embeddings, gather: torch.Tensor, sequence: Sequence, like: torch.Tensor) -> dict:
        """Per kind of layer (each its own rope base), the rotary embeddings of the kept tokens' positions."""
        rotary = self.language_model.rotary_emb
        return {kind: rotary(like, sequence.positions, kind) for kind in set(self.layer_kinds)}

    def two_way_pairs(self, arguments: dict) -> torch.Tensor | None:
        """With token_type_ids, the pairs of tokens in one run of image tokens: the model's masks let them attend to
        each other both ways."""
        token_types = arguments.get("token_type_ids")
        if token_types is None:
            return None
        blocks = modeling_gemma3.get_block_sequence_ids_for_mask(token_types)
        return (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)

    def decode_parts(self) -> DecodeParts:
        """Each layer takes its kind's rotary embedding (a rope base per kind)."""
        return replace(super().decode_parts(), rotary_kinds=tuple(self.layer_kinds))

    def text_inputs(self, input_ids: torch.Tensor) -> dict:
        """token_type_ids, as the processor returns them: 1 at the image placeholders."""
        return {"token_type_ids": (input_ids == self.image_token_id).long()}
