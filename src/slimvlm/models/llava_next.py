"""The LLaVA-NeXT adapter: LlavaNextForConditionalGeneration = LLaVA-1.5's CLIP tower, MLP projector and
Llama-family LM, with AnyRes images: each image is a base view and tiles, all encoded as 336-px crops,
laid out for the LLM by models/anyres.py (the tiles' canvas cut to the image's aspect ratio, with
image_newline after each row). The module names are LLaVA's, plus image_newline.

Where methods act on it:
- stage 1 (tome, dymu, visionzip, mustdrop's merge and important set) runs per crop, as the vision tower
  does (MustDrop, DualSpeed and VisionZip run on LLaVA-NeXT that way): budgets such as ToMe's r or
  VisionZip's dominant/contextual counts are per crop, and check_model sees one crop's patch tokens;
- stages 2-4 (divprune, random, uniform; fastv; mustdrop's filter and cache) see each image's whole token
  set as it enters the LLM: base view, kept tiles and newlines (the newlines are that image's tokens too),
  so a budget is per image; pool and llava-mini, which need one patch grid per image, are refused.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextCausalLMOutputWithPast,
    get_anyres_image_grid_shape,
    unpad_image,
)

from ..errors import SlimVLMError
from ..method import Method, Stage
from ..tokens import VisualTokens
from .anyres import ImageLayout, pack
from .adapter import images_in_prompt_order
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA's adapter with AnyRes images (see the module's docstring). tokens_per_image stays one crop's
    patch tokens (the vision tower's unit); an image's placeholder count follows its size (image_tokens(),
    after views())."""

    family = "llava-next"
    name = "LLaVA-NeXT"  # in messages
    output_class = LlavaNextCausalLMOutputWithPast
    vision_capturable = False  # the packing follows image_sizes and reads each image's count back

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.newline = model.model.image_newline
        self.pinpoints = [list(p) for p in self.config.image_grid_pinpoints]
        self.layouts: list[ImageLayout] = []  # of the images last given to views(); pack() lays them out
        # the most placeholders an image can have: the largest tile grid, nothing cut
        self.max_image_tokens = max(self.layout_of(h, w).slots for h, w in self.pinpoints)

    def _check_config(self, config) -> None:
        if config.vision_feature_select_strategy != "default":
            raise SlimVLMError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} on {self.name}: the model "
                "lays each tile's tokens out on its patch grid, which a class token does not fit (transformers fails "
                f"too); use 'default', as {self.name} checkpoints do"
            )

    @classmethod
    def refusal(cls, method: Method) -> str | None:
        if method.needs_patch_grid:
            return (f"{method.name} works on one square patch grid per image, but a {cls.name} image is a base view and "
                    "AnyRes tiles cut to its aspect ratio, with image_newline after each row; use uniform, random or "
                    "divprune at stage 2 (or a stage-1 method, which runs per crop)")
        return None

    def method_limits(self, method: Method) -> tuple[int, int, int]:
        tokens = self.tokens_per_image if Stage.ENCODE in method.stages else self.max_image_tokens
        return self.vision_layers_run, len(self.llm_layers), tokens

    def layout_of(self, height: int, width: int) -> ImageLayout:
        """The layout the model gives an image of height x width pixels (its own functions decide)."""
        side = self.grid[0]
        tiles = get_anyres_image_grid_shape([height, width], self.pinpoints, self.vision_config.image_size)
        canvas = torch.arange(tiles[0] * side * tiles[1] * side).view(1, tiles[0] * side, tiles[1] * side)
        kept = unpad_image(canvas, [height, width])[0]
        first = int(kept[0, 0]) if kept.numel() else 0
        return ImageLayout(side, tuple(tiles), first // canvas.shape[2], first % canvas.shape[2], *kept.shape)

    def views(self, pixel_values: torch.Tensor, image_sizes, interpolate: bool) -> torch.Tensor:
        """Each image's crops (base view, then tiles), as the model takes them: (images, crops, C, H, W)
        padded to the most crops, or the crops of all images stacked; image_sizes (images, 2) as (H, W)."""
        if image_sizes is None:
            raise SlimVLMError(
                f"{self.name} lays each image out by its size: pass image_sizes (the processor returns them with pixel_values)"
            )
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
        layouts = self.image_layouts([(int(h), int(w)) for h, w in sizes])
        needed = [layout.views for layout in layouts]
        if pixel_values.dim() == 5 and pixel_values.shape[0] == len(layouts) and pixel_values.shape[1] >= max(needed):
            crops = torch.cat([image[:count] for image, count in zip(pixel_values, needed)])
        elif pixel_values.dim() == 4 and pixel_values.shape[0] == sum(needed):
            crops = pixel_values
        else:
            raise SlimVLMError(
                f"pixel_values of shape {tuple(pixel_values.shape)} do not hold the crops that image_sizes {sizes} give "
                f"({needed} per image, base view included); pass the processor's pixel_values and image_sizes together"
            )
        self._check_view_size(crops, interpolate)
        self.layouts = layouts
        return crops

    def image_layouts(self, sizes: list[tuple[int, int]]) -> list[ImageLayout]:
        """The layouts of a forward's images of these (height, width) sizes, in order."""
        return [self.layout_of(height, width) for height, width in sizes]

    def image_tokens(self) -> list[int]:
        return [layout.slots for layout in self.layouts]

    def images_per_sample(self, placeholders: list[int]) -> list[int]:
        return images_in_prompt_order(placeholders, self.image_tokens(), self.sizes_argument)

    def pack(self, tokens: VisualTokens) -> VisualTokens:
        return pack(tokens, self.layouts, self.newline)

    def synthetic_size(self) -> tuple[int, int]:
        """(height, width) of the benchmark's images: the largest pinpoint, the most tiles and nothing cut,
        the most tokens."""
        return tuple(max(self.pinpoints, key=lambda size: size[0] * size[1]))

    def synthetic_images(self, count: int, generator: torch.Generator) -> tuple[dict, int]:
        """Images of synthetic_size(), as the processor hands them over, and their placeholders."""
        height, width = self.synthetic_size()
        layout = self.layout_of(height, width)
        vision = self.vision_config
        pixels = torch.randn(count, layout.views, vision.num_channels, vision.image_size, vision.image_size,
                             generator=generator)
        return {"pixel_values": pixels, "image_sizes": torch.tensor([[height, width]] * count)}, layout.slots
