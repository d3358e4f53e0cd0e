"""The LLaVA-NeXT-Video adapter: LlavaNextVideoForConditionalGeneration = LLaVA-NeXT (its images exactly: AnyRes,
models/llava_next.py) and videos (models/video.py). A video's frames (pixel_values_videos: videos x frames crops)
run through the same CLIP tower as crops; the model pools each frame's patch features into cells
(vision_resampler, stride x stride patches a cell), projects them, and the LLM takes each video's frames' cells
as one span of video placeholders, no newline. Stage-1 methods are refused on prompts with videos, run on
images as on LLaVA-NeXT; stages 2-4 see each video's span as one item.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoCausalLMOutputWithPast

from .llava_next import LlavaNextAdapter
from .video import VideoItems, VideoLayout


class LlavaNextVideoAdapter(VideoItems, LlavaNextAdapter):
    """LLaVA-NeXT's adapter with videos pooled by the model's vision_resampler."""

    family = "llava-next-video"
    name = "LLaVA-NeXT-Video"  # in messages
    output_class = LlavaNextVideoCausalLMOutputWithPast

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.resampler = model.model.vision_resampler
        self.stride = self.config.spatial_pool_stride

    def video_layout(self, frames: int) -> VideoLayout:
        return VideoLayout(frames, self.grid[0], self.stride)

    def pool_and_project(self, frames: torch.Tensor) -> torch.Tensor:
        return self.projector(self.resampler(frames))
