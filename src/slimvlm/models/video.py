"""Videos on the LLaVA families that take them (LLaVA-NeXT-Video, LLaVA-OneVision): how a video's frames become
the LLM's tokens, and where a prompt's images and videos come.

A video is `frames` views of the crop size, each encoded by the image tower as a crop is. The model then pools
each frame's side x side patch features into fewer tokens and projects them, and the LLM takes the frames'
tokens in order as one span of video placeholders:
- LLaVA-NeXT-Video pools first (vision_resampler: average, max or conv, kernel = stride) into cells of stride x
  stride patches, (side // stride)^2 a frame (patches past the last whole cell are left out, as the pooling
  floors), then projects them; no newline (VideoLayout);
- LLaVA-OneVision projects first, then resizes each frame's grid bilinearly to ceil(side / 2) a side, and puts
  one image_newline after the last frame (ResizedVideoLayout). A resized token mixes the patches around its
  sampling point; its slot's patches are those nearest to it, so that each patch lands on one token.
As for an AnyRes image (models/anyres.py), that layout is a numbered list of slots, frame after frame, each
frame's tokens in raster order (then the newline), and a frame patch lands on its token's slot: anyres.pack lays
a video out from it as it lays out an image, so a prompt's images and videos are one list of items.

Where methods act on a video: stages 2-4 (divprune, random, uniform; fastv; mustdrop's filter and cache) see its
whole span, every frame's tokens: a stage-2 budget is per video, as it is per image. Stage 1 (tome, dymu,
visionzip, mustdrop's merge and important set) is refused on prompts with videos: the pooling reads each frame's
full patch grid, and a token merged (or chosen) in the encoder may cover patches of several pooled tokens, so
no pooled token stands for it (unmerging before the pooling would give the LLM as many tokens as untouched).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SlimVLMError
from ..method import Method
from ..tokens import VisualTokens
from .compat import modality_outputs
from .adapter import items_in_prompt_order, placeholder_runs


@dataclass(frozen=True)
class VideoLayout:
    """A LLaVA-NeXT-Video video: `frames` views of side x side patches, each pooled into cells of stride x stride
    patches."""

    frames: int
    side: int
    stride: int

    @property
    def views(self) -> int:
        return self.frames

    @property
    def rows(self) -> int:
        """The newlines of its layout (anyres.pack puts `newline` on each of newline_slots())."""
        return 0

    @property
    def per_side(self) -> int:
        """Tokens along a frame's side."""
        return self.side // self.stride

    @property
    def cells(self) -> int:
        """Tokens per frame."""
        return self.per_side**2

    @property
    def slots(self) -> int:
        """The video's tokens in the untouched LLM input: every frame's cells, then its newlines."""
        return self.frames * self.cells + self.rows

    def token_along_side(self) -> torch.Tensor:
        """(side,): the token row (or column) each patch row (or column) pools into, -1 past the last whole cell."""
        at = torch.arange(self.side) // self.stride
        return torch.where(at < self.per_side, at, -1)

    def cell_of_patch(self) -> torch.Tensor:
        """(side * side,): the token of its frame each patch lands on, -1 where the pooling leaves it out."""
        at = self.token_along_side()
        row, col = at[:, None], at[None, :]
        return torch.where((row >= 0) & (col >= 0), row * self.per_side + col, -1).flatten()

    def view_slots(self) -> torch.Tensor:
        """(frames, side * side): the slot of each frame's patch (its token's), -1 where the pooling leaves it out."""
        cell = self.cell_of_patch()[None]
        return torch.where(cell >= 0, torch.arange(self.frames)[:, None] * self.cells + cell, -1)

    def newline_slots(self) -> torch.Tensor:
        return torch.arange(self.frames * self.cells, self.slots)


@dataclass(frozen=True)
class ResizedVideoLayout(VideoLayout):
    """A LLaVA-OneVision video: each frame's grid resized bilinearly to ceil(side / stride) a side (stride 2), one
    newline after the last frame."""

    @property
    def rows(self) -> int:
        return 1

    @property
    def per_side(self) -> int:
        return math.ceil(self.side / self.stride)

    def token_along_side(self) -> torch.Tensor:
        """The token whose sampling point (align_corners=False: token i samples (i + 1/2) side / per_side - 1/2)
        is nearest to each patch."""
        return ((2 * torch.arange(self.side) + 1) * self.per_side) // (2 * self.side)


@dataclass(frozen=True)
class Visuals:
    """What views() takes of a forward besides its images' pixels: their sizes, its videos and the prompts,
    whose placeholders order them."""

    image_sizes: object
    videos: torch.Tensor | None
    input_ids: torch.Tensor | None


class VideoItems:
    """Videos for a LLaVA-NeXT-family adapter, placed before it in the bases (`class A(VideoItems, ImagesAdapter)`):
    a forward's images and videos become one list of items in prompt order (self.layouts: the image adapter's
    layout per image, a VideoLayout per video); frames are encoded as crops, pooled and projected by the family's
    pool_and_project. A family gives video_layout() and pool_and_project()."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.video_token_id = self.config.video_token_id
        self.placeholder_ids = (self.image_token_id, self.video_token_id)
        # a stage-2 budget is checked against each item's tokens on each input; a video may fill the LM's context
        self.max_image_tokens = max(self.max_image_tokens, self.text_config.max_position_embeddings)

    def video_layout(self, frames: int) -> VideoLayout:
        raise NotImplementedError

    def pool_and_project(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames' patch features (F, side * side, D_vision) -> their tokens (F, cells, D_llm), as the model does."""
        raise NotImplementedError

    def synthetic_videos(self, count: int, frames: int, generator: torch.Generator) -> tuple[dict, int]:
        side = self.vision_config.image_size
        pixels = torch.randn(count, frames, self.vision_config.num_channels, side, side, generator=generator)
        return {"pixel_values_videos": pixels}, self.video_layout(frames).slots

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
                    f"pixel_values_videos of shape {tuple(videos.shape)}: {type(self.model).__name__} takes (videos, "
                    "frames, channels, height, width), as its processor returns them"
                )
            self._check_view_size(videos, interpolate)
            frames = list(videos)
            video_layouts = [self.video_layout(videos.shape[1])] * len(frames)
        image, video = self.image_token_id, self.video_token_id
        order = items_in_prompt_order(
            placeholder_runs(visuals.input_ids, [image, video]),
            {image: [layout.slots for layout in image_layouts], video: [layout.slots for layout in video_layouts]},
            {image: "image", video: "video"},
        )
        pieces = {image: (crops, image_layouts), video: (frames, video_layouts)}
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
    def encode(self, pixel_values: torch.Tensor, method: Method | None, graphs: bool = False,
               keep_width: bool = False) -> tuple[VisualTokens, list[torch.Tensor]]:
        if method is not None and self._frame_views():
            cells = next(layout for layout in self.layouts if isinstance(layout, VideoLayout)).cells
            raise SlimVLMError(
                f"{method.name} acts in the vision encoder (stage 1), but this prompt holds a video, whose frames the "
                f"model pools into {cells} tokens each: a token merged or chosen in a frame can cover patches of "
                "several pooled tokens, and no pooled token stands for it. On videos use a stage-2-4 method "
                "(divprune, random, uniform, fastv, mustdrop:lsm=false,important=false); stage-1 methods run on "
                "prompts with images alone"
            )
        return super().encode(pixel_values, method, graphs, keep_width)

    def project(self, tokens: VisualTokens, keep_cls: bool = False) -> VisualTokens:
        """The image adapter's projection, each frame pooled and projected as the model does: a frame's tokens
        become its pooled tokens (a regroup of the patches landing on each, with the model's features), padded
        to a crop's."""
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
        if crops:  # with videos alone the batch is a frame's tokens wide
            features[crops] = self.projector(patches.x[crops])
        features[frames, : layout.cells] = self.pool_and_project(patches.x[frames])
        return cells.with_features(features)

    # ---- outputs --------------------------------------------------------------------------------------
    def visual_outputs(self, tokens: VisualTokens) -> dict:
        """The images' tokens in the image field, the videos' in the video field, as the untouched model's."""
        items = tokens.split()
        video = [isinstance(layout, VideoLayout) for layout in self.layouts]
        return modality_outputs({"image": [t for t, v in zip(items, video) if not v],
                                 "video": [t for t, v in zip(items, video) if v]}, self.output_class)
