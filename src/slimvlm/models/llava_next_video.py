"""The LLaVA-NeXT-Video adapter: LlavaNextVideoForConditionalGeneration = LLaVA-NeXT (its images exactly: AnyRes,
models/llava_next.py) and videos. A video's frames (pixel_values_videos: videos x frames crops) run through the
same CLIP tower as crops; the model pools each frame's patch features into cells (vision_resampler, stride x
stride patches a cell), projects them, and the LLM takes each video's frames' cells as one span of video
placeholders (models/video.py). A prompt may hold images and videos: slimvlm makes them one list of items in
prompt order, each laid out by anyres.pack, so that every later stage sees each video as one item.

Where methods act on a video:
- stages 2-4 (divprune, random, uniform; fastv; mustdrop's filter and cache) see its whole token span, every
  frame's cells: a stage-2 budget is per video, as it is per image;
- stage 1 (tome, dymu, visionzip, mustdrop's merge and important set) is refused on prompts with videos: the
  model's pooling reads each frame's full patch grid, and a token merged (or chosen) in the encoder may cover
  patches of several cells, so no pooled cell stands for it (unmerging before the pooling would give the LLM as
  many tokens as untouched); the error names the stage-2-4 methods that run. On images they run as on LLaVA-NeXT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoCausalLMOutputWithPast

from ..errors import SlimVLMError
from ..stages import Method
from ..tokens import VisualTokens
from .compat import modality_outputs
from .llava_next import LlavaNextAdapter
from .video import VideoLayout, items_in_prompt_order


@dataclass(frozen=True)
class Visuals:
    """What views() takes of a forward besides its images' pixels: their sizes, its videos and the prompts,
    whose placeholders order them."""

    image_sizes: object
    videos: torch.Tensor | None
    input_ids: torch.Tensor | None


class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT's adapter with videos (see the module's docstring); self.layouts holds the last forward's items
    in prompt order, an ImageLayout per image and a VideoLayout per video."""

    family = "llava-next-video"
    output_class = LlavaNextVideoCausalLMOutputWithPast

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.video_token_id = self.config.video_token_id
        self.placeholder_ids = (self.image_token_id, self.video_token_id)
        self.resampler = model.model.vision_resampler
        self.stride = self.config.spatial_pool_stride
        # a stage-2 budget is checked against each item's tokens on each input; a video may fill the LM's context
        self.max_image_tokens = max(self.max_image_tokens, self.text_config.max_position_embeddings)

    # ---- images and videos: one list of items in prompt order ---------------------------------------
    def visual_inputs(self, arguments: dict) -> tuple[torch.Tensor | None, Visuals] | None:
        images, videos = arguments.get("pixel_values"), arguments.get("pixel_values_videos")
        if images is None and videos is None:
            return None
        return images, Visuals(arguments.get("image_sizes"), videos, arguments.get("input_ids"))

    def views(self, pixel_values: torch.Tensor | None, visuals: Visuals, interpolate: bool) -> torch.Tensor:
        """Every item's views in prompt order: an image's crops (base view, then tiles), a video's frames."""
        crops, image_layouts = [], []
        if pixel_values is not None:
            image_crops = super().views(pixel_values, visuals.image_sizes, interpolate)
            image_layouts = self.layouts
            crops = list(image_crops.split([layout.views for layout in image_layouts]))
        frames, video_layouts = [], []
        videos = visuals.videos
        if videos is not None:
            if videos.dim() != 5:
                raise SlimVLMError(
                    f"pixel_values_videos of shape {tuple(videos.shape)}: LLaVA-NeXT-Video takes (videos, frames, "
                    "channels, height, width), as its processor returns them"
                )
            self._check_view_size(videos, interpolate)
            frames = list(videos)
            video_layouts = [VideoLayout(videos.shape[1], self.grid[0], self.stride)] * len(frames)
        order = items_in_prompt_order(
            visuals.input_ids,
            {self.image_token_id: [layout.slots for layout in image_layouts],
             self.video_token_id: [layout.slots for layout in video_layouts]},
            {self.image_token_id: "image", self.video_token_id: "video"},
        )
        pieces = {self.image_token_id: (crops, image_layouts), self.video_token_id: (frames, video_layouts)}
        self.layouts = [pieces[kind][1][index] for kind, index in order]
        return torch.cat([pieces[kind][0][index] for kind, index in order])

    def _frame_views(self) -> list[int]:
        """The views of the last views() that are video frames (their rows in the encoder's batch)."""
        frames, at = [], 0
        for layout in self.layouts:
            if isinstance(layout, VideoLayout):
                frames.extend(range(at, at + layout.views))
            at += layout.views
        return frames

    # ---- stage 1 and the pooling -------------------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor, method: Method | None,
               graphs: bool = False) -> tuple[VisualTokens, list[torch.Tensor]]:
        if method is not None and self._frame_views():
            raise SlimVLMError(
                f"{method.name} acts in the vision encoder (stage 1), but this prompt holds a video, whose frames the "
                f"model pools {self.stride} x {self.stride} patches into a token: a token merged or chosen in a frame "
                "can cover patches of several cells, and no pooled token stands for it. On videos use a stage-2-4 "
                "method (divprune, random, uniform, fastv, mustdrop:lsm=false,important=false); stage-1 methods run "
                "on prompts with images alone"
            )
        return super().encode(pixel_values, method, graphs)

    def project(self, tokens: VisualTokens, keep_cls: bool = False) -> VisualTokens:
        """LLaVA-NeXT's projection, each frame first pooled by the model's vision_resampler: a frame's tokens
        become its cells (a regroup of each cell's patches, with the pooler's features), padded to a crop's."""
        frames = self._frame_views()
        if not frames:
            return super().project(tokens, keep_cls)
        patches = tokens.drop_cls()  # encode() ran no stage-1 method: every view has its full patch grid
        layout = next(layout for layout in self.layouts if isinstance(layout, VideoLayout))  # one frame size for all
        num_views, width, _ = patches.x.shape
        crops = sorted(set(range(num_views)) - set(frames))
        assign = torch.arange(width).repeat(num_views, 1)  # a crop's patches stay as they are
        assign[frames] = layout.cell_of_patch()
        counts = [width] * num_views
        for frame in frames:
            counts[frame] = layout.cells
        cells = patches.regroup(assign.to(tokens.x.device), width, counts=counts)
        features = cells.x.new_zeros(*cells.x.shape[:2], self.text_config.hidden_size)
        if crops:  # with videos alone the batch is a frame's cells wide
            features[crops] = self.projector(patches.x[crops])
        features[frames, : layout.cells] = self.projector(self.resampler(patches.x[frames]))
        return cells.with_features(features)

    # ---- outputs --------------------------------------------------------------------------------------
    def visual_outputs(self, tokens: VisualTokens) -> dict:
        """The images' tokens in the image field, the videos' in the video field, as the untouched model's."""
        items = tokens.split()
        video = [isinstance(layout, VideoLayout) for layout in self.layouts]
        return modality_outputs({"image": [t for t, v in zip(items, video) if not v],
                                 "video": [t for t, v in zip(items, video) if v]}, self.output_class)
