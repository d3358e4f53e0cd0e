"""The LLaVA-OneVision adapter: LlavaOnevisionForConditionalGeneration = a SigLIP vision tower, LLaVA's MLP
projector and a Qwen2 LM, with LLaVA-NeXT's AnyRes layout (models/anyres.py) and one step more.

What differs from LLaVA-NeXT, and what it means for the methods:
- SigLIP has no class token and no pre-layernorm: a 384-px crop is 27 x 27 patch tokens, and the LLM reads the
  last layer (vision_feature_layer -1, before post_layernorm) with 'full' selection. Stage-1 methods find no
  class token to protect or read: ToMe and DyMU split all tokens (as DyMU's own SigLIP code does), VisionZip
  and MustDrop score a token by the attention it receives (methods/visionzip.py: received_attention).
- 'anyres_max_N': where the kept tile canvas holds more than 1.1^2 x N crops' worth of patches, the model
  resizes it bilinearly to about N crops' worth (OnevisionLayout.resized). A resized token mixes up to four
  patches, so a token that a stage-1 method merged or chose in a crop has no place on the resized canvas:
  stage-1 methods are refused on such images (the error names the image). Stages 2-4 run on them; their
  tokens are packed by the model's own pack_image_features.
- videos (pixel_values_videos: videos x frames crops; models/video.py): the model projects each frame's patches,
  resizes the grid bilinearly to half its side (rounded up; 27 -> 14) and puts one image_newline after the last
  frame; stage-1 methods are refused on prompts with a video, stages 2-4 see each video's span as one item.
- multi-image prompts (batch_num_images: a prompt's images, > 1): the model tiles none of their images; each is
  its base view and one newline (untiled()), stage-1 methods run on that view, as on any crop.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionCausalLMOutputWithPast

from ..errors import SlimVLMError
from ..method import Method, Stage
from ..tokens import VisualTokens
from .anyres import ImageLayout
from .llava_next import LlavaNextAdapter
from .video import ResizedVideoLayout, VideoItems, VideoLayout


@dataclass(frozen=True)
class OnevisionLayout(ImageLayout):
    """LLaVA-NeXT's layout of an image of `size` (height, width) pixels, and `resized`: the (rows, cols) the
    model resizes its kept canvas to, None where it keeps it as it is (then anyres.pack lays it out)."""

    size: tuple[int, int]
    resized: tuple[int, int] | None

    @property
    def slots(self) -> int:
        if self.resized is None:
            return super().slots
        rows, cols = self.resized
        return self.side * self.side + rows * (cols + 1)

    def view_slots(self) -> torch.Tensor:
        """ImageLayout's, where a resized canvas puts its tile patches on no slot: each of its tokens mixes several."""
        slots = super().view_slots()
        if self.resized is not None:
            slots[1:] = -1
        return slots


def max_tiles(aspect_ratio: str) -> int:
    """N of the config's vision_aspect_ratio 'anyres_max_N': the crops' worth of patches a canvas is resized to."""
    match = re.fullmatch(r"anyres_max_(\d+)", aspect_ratio)
    if match is None:
        raise SlimVLMError(
            f"vision_aspect_ratio={aspect_ratio!r}: slimvlm's LLaVA-OneVision adapter lays images out by "
            "'anyres_max_N' (the checkpoints use 'anyres_max_9'); set it in the config"
        )
    return int(match.group(1))


class OnevisionImages(LlavaNextAdapter):
    """LLaVA-NeXT's adapter on a SigLIP tower with anyres_max resizing (see the module's docstring): images."""

    family = "llava-onevision"
    name = "LLaVA-OneVision"  # in messages
    output_class = LlavaOnevisionCausalLMOutputWithPast
    vision_towers = ("SiglipVisionModel", "SiglipVisionTransformer")
    has_cls = False

    def __init__(self, model: nn.Module) -> None:
        self.max_tiles = max_tiles(model.config.vision_aspect_ratio)  # NeXT's __init__ lays the pinpoints out
        self.encoder_method: str | None = None  # the stage-1 method applied, refused on resized images
        self.tiled: list[bool] | None = None  # per image of the last forward: tiled (alone in its prompt) or not
        super().__init__(model)

    def _check_config(self, config) -> None:
        if config.vision_feature_select_strategy != "full":
            raise SlimVLMError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} on LLaVA-OneVision drops the "
                "first token as if it were a class token, but SigLIP has none: a patch goes and the placeholders no "
                "longer match; use 'full', as LLaVA-OneVision checkpoints do"
            )

    def _embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP's patch embeddings: no class token, no pre-layernorm."""
        return self.vision.embeddings(pixel_values)

    def check_inputs(self, arguments: dict) -> None:
        """Refuse what the layout cannot follow; take batch_num_images: which images the model tiles."""
        if arguments.get("pixel_values") is None:  # a decode step: generate() keeps passing batch_num_images
            return
        aspect = arguments.get("vision_aspect_ratio")
        if aspect is not None and aspect != self.config.vision_aspect_ratio:
            raise SlimVLMError(
                f"vision_aspect_ratio={aspect!r} differs from the model's config ({self.config.vision_aspect_ratio!r}); "
                "set it in the config"
            )
        per_sample = arguments.get("batch_num_images")
        self.tiled = None if per_sample is None else [n == 1 for n in torch.as_tensor(per_sample).tolist() for _ in range(n)]

    def check_method(self, method: Method) -> None:
        super().check_method(method)
        if Stage.ENCODE in method.stages:
            self.encoder_method = method.name

    def image_layouts(self, sizes: list[tuple[int, int]]) -> list[OnevisionLayout]:
        """As the model lays them out: the images of a prompt that holds several untiled (batch_num_images)."""
        tiled = self.tiled if self.tiled is not None else [True] * len(sizes)
        if len(tiled) != len(sizes):
            raise SlimVLMError(
                f"batch_num_images counts {len(tiled)} image(s), image_sizes {len(sizes)}; pass the processor's, together"
            )
        return [self.layout_of(*size) if tile else self.untiled(*size) for size, tile in zip(sizes, tiled)]

    def untiled(self, height: int, width: int) -> OnevisionLayout:
        """An image of a multi-image prompt: its base view's patches, then one newline (pack_image_features on a
        single view)."""
        return OnevisionLayout(self.grid[0], (0, 1), 0, 0, rows=1, cols=0, size=(height, width), resized=None)

    def layout_of(self, height: int, width: int) -> OnevisionLayout:
        layout = super().layout_of(height, width)
        # pack_image_features' test: the canvas against N crops' worth of patches, with 10% to spare
        ratio = math.sqrt(layout.rows * layout.cols / (self.max_tiles * layout.side**2))
        resized = (int(layout.rows // ratio), int(layout.cols // ratio)) if ratio > 1.1 else None
        return OnevisionLayout(**vars(layout), size=(height, width), resized=resized)

    def views(self, pixel_values: torch.Tensor, image_sizes, interpolate: bool) -> torch.Tensor:
        crops = super().views(pixel_values, image_sizes, interpolate)
        for index, layout in enumerate(self.layouts):
            if self.encoder_method is not None and layout.resized is not None:
                (height, width), (rows, cols) = layout.size, layout.resized
                raise SlimVLMError(
                    f"{self.encoder_method} acts in the vision encoder, per crop, but image {index} ({height} x {width} px) "
                    f"has a canvas of {layout.rows} x {layout.cols} patches that the model resizes bilinearly to "
                    f"{rows} x {cols} ({self.config.vision_aspect_ratio}): a token merged or chosen in a crop has no "
                    "place on the resized canvas. Use a stage-2-4 method on such images (divprune, random, uniform, "
                    "fastv, mustdrop:lsm=false,important=false), or give images of fewer tiles"
                )
        return crops

    def pack(self, tokens: VisualTokens) -> VisualTokens:
        if any(isinstance(layout, OnevisionLayout) and layout.resized is not None for layout in self.layouts):
            return self._pack_by_the_model(tokens)
        return super().pack(tokens)

    def _pack_by_the_model(self, tokens: VisualTokens) -> VisualTokens:
        """Untouched views (views() refused stage-1 methods) packed as the model packs them: an image by its own
        pack_image_features (base view, kept canvas resized where it is, newlines), a video as its frames'
        pooled tokens then the newline; one token per slot, in slot order."""
        per_item = [layout.views for layout in self.layouts]
        views = list(tokens.x.split(per_item))
        images = [i for i, layout in enumerate(self.layouts) if not isinstance(layout, VideoLayout)]
        packed, _ = self.model.model.pack_image_features(
            [views[i] for i in images], [list(self.layouts[i].size) for i in images],
            image_newline=self.newline, vision_aspect_ratio=self.config.vision_aspect_ratio)
        packed_images = dict(zip(images, packed))
        items = [packed_images[i] if i in packed_images else
                 torch.cat([view[:, : layout.cells].flatten(0, 1), self.newline[None].to(view.dtype)])
                 for i, (view, layout) in enumerate(zip(views, self.layouts))]
        device = tokens.x.device
        width = max(len(item) for item in items)
        view_item = torch.repeat_interleave(torch.arange(len(per_item)), torch.tensor(per_item)).to(device)
        patch_slot = torch.cat([layout.view_slots() for layout in self.layouts]).to(device)
        view_slots = torch.where(patch_slot >= 0, view_item[:, None] * width + patch_slot, -1)
        return VisualTokens.from_images(items, view_slots=view_slots)

    def synthetic_size(self) -> tuple[int, int]:
        """The pinpoint with the most tokens among those the model does not resize, so that stage-1 methods run
        on the benchmark's images too."""
        return tuple(max(self.pinpoints, key=lambda size: (self.layout_of(*size).resized is None,
                                                            self.layout_of(*size).slots)))


class LlavaOnevisionAdapter(VideoItems, OnevisionImages):
    """LLaVA-OneVision's images and videos (see the module's docstring)."""

    def video_layout(self, frames: int) -> ResizedVideoLayout:
        return ResizedVideoLayout(frames, self.grid[0], 2)

    def pool_and_project(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.model.apply_pooling(self.projector(frames))
