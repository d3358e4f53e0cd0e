"""The InternVL adapter: InternVLForConditionalGeneration (InternVL3 as transformers has it) = an InternViT
vision tower, a pixel shuffle that joins each 2 x 2 block of patches into one token (downsample_ratio 0.5), an
MLP projector, and a Qwen2 or Llama LM.

What the LLM gets of an image: the processor cuts it into 448-px tiles (how many follows its aspect ratio) and,
where there are several, adds a thumbnail of the whole image; each tile is one view of the tower (32 x 32
patches and a class token), shuffled into 16 x 16 = 256 tokens, and an image's placeholders are one run of 256
per tile between <img> and </img> (a video's frames: one tile each). The model is handed the tiles alone
(pixel_values stacks every image's tiles; the processor keeps their count per image), so here each tile is a
visual item of 256 tokens, as the model sees it: budgets and stats are per tile.

Where methods act on it:
- stage 1 inside the tower (tome, dymu:vtu=false, mustdrop's window merge and important set) runs on each tile's
  patches and class token, as on a LLaVA crop, through InternViT's layers (layer scale, q/k norms where the
  config has them). The pixel shuffle reads the whole grid, so each patch takes its merged token's features
  before it (models/pixel_shuffle.py): a tile still gives the LLM its 256 tokens, and stage 1 saves encoder
  compute alone. MustDrop's important set moves to the shuffled tokens: a token is important where any of its 4
  patches is;
- visionzip on the shuffled tokens, each 2 x 2 block whole (as on Qwen's merged tokens): a token's score is the
  class token's attention to its 4 patches in the feature layer (summed over heads, mean over the 4), its key
  their keys' mean; a tile's dominant and contextual tokens reach the LLM;
- stage 2 (divprune, random, uniform, pool on a tile's 16 x 16 grid) on each tile's projected tokens;
- stages 3-4 (fastv; mustdrop's LLM filter and output-aware cache) in the LM, as on LLaVA;
- refused: vtu (and dymu's default, which asks for it): nothing stays merged for the LLM to unmerge; llava-mini,
  whose modules are laid out on the vision config's patch grid, a projected token per patch.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.internvl.modeling_internvl import InternVLCausalLMOutputWithPast

from ..errors import SlimVLMError
from ..method import EncoderAttention, Method, no_rows
from ..tokens import VisualTokens
from .llava import EncoderBlock, LlavaAdapter
from .pixel_shuffle import unit_mean, unmerged
from .units import UnitViews


class InternVLAdapter(UnitViews, LlavaAdapter):
    """LLaVA's encoder loop on InternViT, each tile a view; the pixel shuffle and projector after it (see the
    module's docstring). grid and tokens_per_image are a tile's patches (what stage 1 sees, as on a LLaVA-NeXT
    crop), units its shuffled grid and view_tokens their number: a tile's tokens for the LLM."""

    family = "internvl"
    name = "InternVL"  # in messages
    output_class = InternVLCausalLMOutputWithPast
    joined_by = "pixel shuffle"
    vision_towers = ("InternVLVisionModel",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        ratio = self.config.downsample_ratio
        block = round(1 / ratio)
        rows, cols = self.grid
        if block * ratio != 1 or rows != cols or rows % block:
            raise SlimVLMError(
                f"downsample_ratio={ratio} on a {rows} x {cols} patch grid: the pixel shuffle joins square blocks of "
                "1 / downsample_ratio patches a side on a square grid they tile; use a checkpoint whose config does "
                "(InternVL3: 0.5 on 32 x 32)"
            )
        self._join_units(block)
        # get_image_features reads the tower's last_hidden_state (after its final norm) only for layer -1
        self.final_norm = self.vision.layernorm if self.config.vision_feature_layer == -1 else None

    def _blocks(self) -> list[EncoderBlock]:
        """InternViT's layers: layernorm_before/after, layer scale lambda_1/lambda_2, q/k norms (identities where
        the config has none)."""
        return [EncoderBlock(layer.attention, layer.layernorm_before, layer.layernorm_after, layer.mlp,
                             layer.attention.q_proj, layer.attention.k_proj, layer.attention.q_norm,
                             layer.attention.k_norm, layer.lambda_1, layer.lambda_2)
                for layer in self.vision.encoder.layer]

    def _check_config(self, config) -> None:
        if config.vision_feature_select_strategy != "default":
            raise SlimVLMError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} on InternVL keeps the class "
                "token, which the pixel shuffle's square grid has no place for (the model fails too); use 'default', "
                "as InternVL checkpoints do"
            )

    def _embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """InternViT's class and patch embeddings with its position embeddings; no pre-layernorm."""
        return self.vision.embeddings(pixel_values)

    # ---- stage 1 on the shuffled tokens (VisionZip) ---------------------------------------------
    def _encode_output(self, method: Method, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        """A method that acts on merged tokens chooses among each tile's shuffled, projected tokens, scored by the
        class token's attention to their patches (see the module's docstring); others as on LLaVA."""
        if not method.at_merged_tokens:
            return super()._encode_output(method, attention, tokens)
        batch = tokens.batch_size
        cls_row = attention.rows(torch.zeros(batch, 1, dtype=torch.long, device=tokens.x.device)).sum(dim=1)[:, 0]
        received = unit_mean(cls_row[:, 1:, None], self.grid, self.block)[..., 0]  # fresh tokens: patch p is p + 1
        keys = unit_mean(attention.keys[:, :, 1:], self.grid, self.block)
        units = EncoderAttention(layer=attention.layer, num_layers=attention.num_layers, keys=keys, rows=no_rows,
                                 received=received, keep_width=attention.keep_width)
        return method.encode_output(units, self.shuffled(tokens))

    # ---- after the tower: pixel shuffle and projector --------------------------------------------
    def project(self, tokens: VisualTokens, keep_cls: bool = False) -> VisualTokens:
        """The tower's tokens (with their class token) shuffled and projected; those a method chose among the
        projected tokens in encode (VisionZip: no class token) are the LLM's already."""
        return self.shuffled(tokens) if tokens.has_cls else tokens

    def shuffled(self, tokens: VisualTokens) -> VisualTokens:
        """Each tile's patches (merged tokens unmerged onto them) through the final norm, the model's own pixel
        shuffle and the projector: its units as fresh tokens on the units grid, each patch's unit in view_slots
        (where MustDrop's important set of patches lands)."""
        features = unmerged(tokens)
        if self.final_norm is not None:
            features = self.final_norm(features)
        batch, rows, cols = features.shape[0], *self.grid
        blocks = self.model.model.pixel_shuffle(features.reshape(batch, rows, cols, -1),
                                                scale_factor=self.config.downsample_ratio)
        return self.unit_tokens(self.projector(blocks.reshape(batch, -1, blocks.shape[-1])))
