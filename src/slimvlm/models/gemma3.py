"""The Gemma 3 adapter: Gemma3ForConditionalGeneration = a SigLIP vision tower (no class token, no pre-layernorm),
a projector that average-pools each image's patch grid to mm_tokens_per_image tokens (64 x 64 patches to 16 x 16
at 896 px), norms them and projects them without bias, and a Gemma 3 LM: five sliding-window layers to one global
one, each kind with its own rotary base, and image tokens that attend to each other both ways within each run of
them (with the processor's token_type_ids; without them the model's mask is causal).

Where methods act on it:
- stage 1 inside the tower (tome, dymu:vtu=false) runs on each image's patches through SigLIP's layers, as on a
  LLaVA-OneVision crop. The pooling reads the whole grid, so each patch takes its merged token's features before
  it (models/units.py, as before InternVL's pixel shuffle): an image still gives the LLM its mm_tokens_per_image
  tokens, and stage 1 saves encoder compute alone;
- stage 2 (divprune, random, uniform, pool on the pooled grid) on each image's projected tokens; the kept tokens
  of an image are one run in the rebuilt prompt, and with token_type_ids they attend to each other both ways, as
  the model's own tokens do (prompt_mask);
- refused: stages 3-4 (fastv, mustdrop, vtu): slimvlm's drops inside the LM give every layer one causal mask and
  one rotary embedding, but Gemma 3's sliding layers need their window, their own rotary base and a cache that
  keeps only the window, and its image tokens their two-way block; visionzip (it would choose among pooled tokens
  by a class token's attention, which SigLIP lacks); llava-mini (its modules are laid out a projected token per
  patch); slimvlm's static cache (its masks and cache know no sliding window).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.gemma3.modeling_gemma3 import Gemma3CausalLMOutputWithPast

from ..errors import SlimVLMError
from ..method import Method, Stage
from ..tokens import VisualTokens
from .llava import LlavaAdapter
from .pixel_shuffle import unmerged
from .units import UnitViews


class Gemma3Adapter(UnitViews, LlavaAdapter):
    """LLaVA's encoder loop on Gemma 3's SigLIP, one view per image; the average pooling and projector after it, and
    the LM's two-way image blocks (see the module's docstring). grid and tokens_per_image are an image's patches,
    units its pooled grid and view_tokens their number: an image's tokens for the LLM."""

    family = "gemma3"
    name = "Gemma 3"  # in messages
    output_class = Gemma3CausalLMOutputWithPast
    vision_towers = ("SiglipVisionModel", "SiglipVisionTransformer")
    has_cls = False
    instead = "a stage-2 method (divprune, random, uniform, pool) or a stage-1 method in the tower (tome, dymu:vtu=false)"
    static_cache_refusal = (
        "Gemma 3's LM attends within a sliding window on five of every six layers, which slimvlm's static cache and its "
        "masks do not apply; generate without cache_implementation='static' (the dynamic cache runs every method Gemma 3 "
        "takes)"
    )

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
        if {Stage.PREFILL, Stage.DECODE} & set(method.stages):
            return (f"{method.name} acts inside the LM (stages 3-4: drops, cache cuts or virtual unmerging), where slimvlm "
                    "gives every layer one causal mask and one rotary embedding; Gemma 3's sliding-window layers need their "
                    "window, their own rotary base and a cache that keeps only the window, and its image tokens attend to "
                    f"each other both ways, so slimvlm does not run it on {cls.name} yet; use {cls.instead}")
        if method.at_merged_tokens:
            return (f"{method.name} chooses among the tokens the LLM gets by the attention a class token pays them, but "
                    f"{cls.name}'s SigLIP has none and its projector pools the whole patch grid, so slimvlm has no score "
                    f"for the pooled tokens yet; use {cls.instead}")
        if method.grid_from_vision_config:
            return (f"{method.name}'s modules are laid out on the vision config's patch grid, a projected token per "
                    f"patch, but {cls.name}'s projector pools blocks of patches into one token; use {cls.instead}")
        return None

    # ---- after the tower: pooling and projector ----------------------------------------------
    def project(self, tokens: VisualTokens, keep_cls: bool = False) -> VisualTokens:
        """Each image's patches (merged tokens unmerged onto them) through SigLIP's post_layernorm and the model's own
        projector (pooling, norm, projection): its pooled tokens as fresh tokens on the units grid."""
        features = self.vision.post_layernorm(unmerged(tokens))
        return self.unit_tokens(self.projector(features))

    # ---- the language model ----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The scaled text embeddings; a placeholder id past the vocabulary embeds as id 0, as the model does (its
        rows take the image's tokens)."""
        if self.image_token_id >= self.text_config.vocab_size:
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        return super().embed(input_ids)

    def prompt_mask(self, sequence, embeds: torch.Tensor, cache, arguments: dict) -> torch.Tensor | dict:
        """With token_type_ids, the model's own masks with each run of visual tokens attending to itself both ways
        (on sliding layers within the window), the runs those of the rebuilt prompt: an image's kept tokens are one
        run. Without them, the causal masks the LM builds from the 2D mask, as the model does."""
        if arguments.get("token_type_ids") is None:
            return super().prompt_mask(sequence, embeds, cache, arguments)
        blocks = modeling_gemma3.get_block_sequence_ids_for_mask(sequence.visual.long())
        # positional: the cache's keyword is past_key_values before transformers 5.24
        return modeling_gemma3.create_masks_for_vision_model(self.text_config, embeds, sequence.valid.long(), cache,
                                                             sequence.positions, blocks)

    def text_inputs(self, input_ids: torch.Tensor) -> dict:
        """token_type_ids, as the processor returns them: 1 at the image placeholders."""
        return {"token_type_ids": (input_ids == self.image_token_id).long()}
