"""The Qwen2-VL / Qwen2.5-VL adapter: Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration
= a ViT over each image or video at its own resolution, a merger that joins every 2 x 2 block of patches into
one LLM token, and a Qwen2 LM whose rotary embedding is M-RoPE (one position per axis: time, height, width).

What the LLM gets of an image or a video (a visual item, qwen_visuals.py): one token per 2 x 2 unit of its
(t, h, w) patch grid (image_grid_thw, video_grid_thw; a video's t = frames / temporal_patch_size, an image's
1), in raster order, t h w / 4 placeholders; items of different sizes have different counts. A unit's token
sits at the 3D position (t, row, col) of its unit, offset by where the item starts (on 2.5 a video's t is
spaced by tokens_per_second x second_per_grid_ts); the text after an item starts past the larger of the
grid's height and width, whatever the item's token count or length in time (Qwen2VLModel.get_rope_index). So
a reduced item keeps each kept token at its own position and the text where it was: slimvlm computes the
untouched prompt's positions with get_rope_index and every kept token takes its placeholder's
(sequence.rebuild); decoding continues one past the prompt's last token on each axis, where generate()
continues the untouched prompt (a video's temporal positions may run past it). Renumbering
(keep_positions=False) has no meaning here and is refused.

Where methods act on it:
- stage 2 (divprune, random, uniform) on each item's merger outputs, a budget per image or video;
- stages 3-4 (fastv; mustdrop's dual-attention filter and output-aware cache with lsm=false,
  important=false) inside the LM, whose rotary (cos, sin) is per token as Llama's;
- visionzip on the merged tokens, scored by the attention their patches receive in the last ViT block
  (_merged_attention; methods/visionzip.py), as the authors' Qwen2.5-VL port does;
- refused: the rest of stage 1 (tome, dymu, mustdrop's window merge and important set): the merger
  reads 2 x 2 units of patches in place and 2.5's window attention is laid out on the full grid, so the
  tower runs whole; pool and llava-mini (one square grid per image); vtu (it unmerges stage-1 merges,
  along 1-D positions).
"""

from __future__ import annotations

import inspect
import sys
from typing import Callable

import torch
from torch import nn
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

from ..attention import QUERY_CHUNK, rotate_half
from ..errors import SlimVLMError
from ..hooks import Installed, capture_inputs
from ..method import EncoderAttention, Method, Stage, no_rows
from ..tokens import VisualTokens
from .compat import modality_outputs, multimodal_output_class
from .adapter import DecodeParts, LanguageModelAdapter, images_in_prompt_order
from .qwen_visuals import KINDS, VIDEO, VisualItems, visual_items

# the most tokens a visual item can give: a video of the Qwen2-VL video processor's max_frames (768, so 384
# temporal steps) of its largest frames (longest_edge 28 x 28 x 768 pixels: 768 tokens each); an image gives
# at most 16384 (max_pixels 12845056 over 28 x 28). A budget is checked against each item's own count when it comes
MAX_ITEM_TOKENS = 384 * 768
SYNTHETIC_SIDE = 644  # px: 46 x 46 patches of 14 px, 23 x 23 = 529 tokens, a multiple of 28 the processor keeps
# frames of a video scored together for VisionZip: 8 x 16 heads x 128 queries x 2116 keys in float32 is 139 MB
SEGMENTS_AT_ONCE = 8


def equal_segments(bounds: list[int], most: int) -> list[tuple[int, int, int]]:
    """(start, length, count) runs of at most `most` consecutive attention segments of one length, from the
    ViT's cu_seqlens: a video's frames (all one size) score together, in a few kernels instead of a few per
    frame (a 16-frame 644-px video: 8 frames of 2116 patches)."""
    runs: list[tuple[int, int, int]] = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        if runs and runs[-1][1] == end - begin and runs[-1][2] < most:
            start, length, count = runs[-1]
            runs[-1] = (start, length, count + 1)
        else:
            runs.append((begin, end - begin, 1))
    return runs


def mrope_ids(positions: torch.Tensor) -> torch.Tensor:
    """Position ids as the M-RoPE rotary takes them, (3, B, L): from slimvlm's (B, L, 3), or from text
    positions (B, L), which sit at the same position on every axis."""
    if positions.dim() == 3:
        return positions.permute(2, 0, 1)
    return positions[None].expand(3, -1, -1)


class TextRotary(nn.Module):
    """The LM's rotary embedding for text position ids (B, L) (a decode step's), as the LM's own forward
    expands them: transformers 5.17's M-RoPE rotary takes only (3, B, L)."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(x, position_ids=mrope_ids(position_ids))


class QwenVLAdapter(LanguageModelAdapter):
    """Qwen2-VL and Qwen2.5-VL images and videos (see the module's docstring): the vision tower and its merger
    run as the model runs them (get_image_features); an item's tokens are its merger outputs, one per 2 x 2 unit."""

    family = "qwen2-vl"
    name = "Qwen2-VL"  # in messages
    sizes_argument = "image_grid_thw"
    frames_apart = False  # a video's temporal steps are placeholder runs of their own (qwen_visuals.visual_items)
    # why stage-1 methods cannot act inside this family's tower
    whole_tower = ("its merger joins each 2x2 block of patches in place into one token and 2.5's window attention is "
                   "laid out on the whole grid")
    # what a refusal offers instead: the methods this family runs
    instead = ("visionzip (on the merged tokens), a stage-2 method (divprune, random, uniform) or stages 3-4 (fastv, or "
               "mustdrop:lsm=false,important=false: its LLM filter and output-aware cache)")

    def __init__(self, model: nn.Module) -> None:
        inner = model.model
        super().__init__(model, inner.language_model)
        self.inner = inner
        self.visual = inner.visual
        self.vision_config = self.config.vision_config
        self.merge = self.vision_config.spatial_merge_size
        prefix = type(model).__name__.removesuffix("ForConditionalGeneration")
        self.output_class = multimodal_output_class(sys.modules[type(model).__module__], prefix)
        self.placeholder_ids = (self.config.image_token_id, self.config.video_token_id)
        self.items: VisualItems | None = None  # the images and videos of the last views(), in prompt order
        self._decode_parts = DecodeParts(model.get_input_embeddings(), self.language_model, self.language_model.layers,
                                         self.language_model.norm, TextRotary(self.language_model.rotary_emb), self.lm_head)

    @classmethod
    def refusal(cls, method: Method) -> str | None:
        """What cannot act on Qwen's images (see the module's docstring), naming what works instead."""
        if Stage.ENCODE in method.stages and not method.at_merged_tokens:
            return (f"{method.name} acts inside the vision encoder (stage 1), which slimvlm runs whole on {cls.name}: "
                    f"{cls.whole_tower}; use {cls.instead}")
        if method.needs_patch_grid:
            return (f"{method.name} works on one square patch grid per image, but {cls.name} gives each image its own grid "
                    "(dynamic resolution); use uniform, random or divprune")
        if method.virtual_unmerge:
            return (f"{method.name} unmerges the tokens a stage-1 method merged, which {cls.name} refuses (and rotates "
                    f"copies along 1-D positions, not M-RoPE's); use {cls.instead}")
        return None

    def method_limits(self, method: Method) -> tuple[int, int, int]:
        return len(self.visual.blocks), len(self.llm_layers), MAX_ITEM_TOKENS

    # ---- what the forward takes besides pixels -------------------------------------------------
    def check_inputs(self, arguments: dict) -> None:
        types = arguments.get("mm_token_type_ids")
        input_ids = arguments.get("input_ids")
        visuals = any(arguments.get(kind.pixels) is not None for kind in KINDS)
        if types is not None and visuals and input_ids is not None:
            if types.shape != input_ids.shape or not torch.equal(types.long(), self.token_types(input_ids)):
                raise SlimVLMError(
                    "mm_token_type_ids do not mark exactly the image and video placeholders of input_ids (1 at an "
                    "image's, 2 at a video's, 0 elsewhere); pass the processor's, or none (slimvlm derives them from "
                    "input_ids)"
                )

    def visual_inputs(self, arguments: dict) -> tuple[torch.Tensor, VisualItems] | None:
        """Every image's and video's patches in prompt order, with the items (qwen_visuals): one run of the
        tower encodes them all, as get_image_features and get_video_features would one kind each."""
        given = [arguments[kind.pixels] for kind in KINDS if arguments.get(kind.pixels) is not None]
        if not given:  # a decode step: nothing to read of input_ids
            return None
        input_ids = arguments.get("input_ids")
        if input_ids is None:  # nothing to order by: the runtime refuses such a prefill, naming what to pass
            return given[0], None
        items = self.visual_items(arguments, input_ids)
        return items.pixels(), items

    def positions_kept(self, keep_positions: bool | None) -> bool:
        """Always: under M-RoPE an item's tokens sit on its (t, h, w) grid and the text after it starts past
        the grid whatever the count, so there is nothing to renumber; False is refused."""
        if keep_positions is False:
            raise SlimVLMError(
                f"keep_positions=False renumbers visual tokens, which has no meaning under {self.name}'s M-RoPE (an "
                "image's or video's tokens sit at (time, height, width) positions of its grid and the text after it "
                "starts past the grid, whatever the count); leave keep_positions unset: kept tokens keep their own "
                "positions"
            )
        return True

    def patch_generate(self) -> Callable[[], None]:
        """Beams and several sequences per prompt: generate() repeats every input along dim 0, but Qwen's
        pixel_values (and pixel_values_videos) pack all items' patches along dim 0 (transformers 5.25 repeats
        them pre-encoded, which slimvlm turns off: the runtime encodes), so here each prompt's patches, grids
        and seconds repeat as a whole. And the visual inputs are checked before generate() computes positions."""
        model = self.model
        original = model._expand_inputs_for_generation

        def expand(expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs):
            items = None if expand_size == 1 or input_ids is None else self.visual_items(model_kwargs, input_ids)
            if items is None:
                return original(expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids,
                                **model_kwargs)
            repeated = items.repeated(expand_size)
            rest = {name: value for name, value in model_kwargs.items() if name not in repeated}
            input_ids, rest = original(expand_size=expand_size, is_encoder_decoder=is_encoder_decoder,
                                       input_ids=input_ids, **rest)
            return input_ids, {**rest, **repeated}

        model._expand_inputs_for_generation = Installed(expand)
        prepare = model._prepare_position_ids_for_generation

        def checked(inputs_tensor, model_kwargs):
            """generate() asks transformers' get_rope_index for M-RoPE positions before any forward: bad grids or
            placeholders fail there (a shape mismatch, a bare StopIteration). The items are read here first, as the
            forward reads them, so that they fail with slimvlm's errors."""
            input_ids = model_kwargs.get("input_ids", inputs_tensor)
            if input_ids is not None and input_ids.dim() == 2 and any(model_kwargs.get(kind.pixels) is not None
                                                                       for kind in KINDS):
                self.visual_items(model_kwargs, input_ids)
            return prepare(inputs_tensor, model_kwargs)

        model._prepare_position_ids_for_generation = Installed(checked)

        def undo() -> None:
            del model._expand_inputs_for_generation
            del model._prepare_position_ids_for_generation

        return undo

    def visual_items(self, arguments: dict, input_ids: torch.Tensor) -> VisualItems | None:
        """The images and videos of a forward's (or generate()'s) arguments, checked, in prompt order (qwen_visuals)."""
        return visual_items(arguments, self.token_types(input_ids), self.patch_values, self.merge, self.frames_apart)

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) mm_token_type_ids as the processor makes them: 1 at image placeholders, 2 at video ones."""
        return (input_ids == self.config.image_token_id).long() + VIDEO.type_id * (input_ids == self.config.video_token_id)

    def text_inputs(self, input_ids: torch.Tensor) -> dict:
        """mm_token_type_ids, which the untouched model needs for its 3D positions (without them Qwen2-VL
        fails and Qwen2.5-VL falls back to 1-D positions)."""
        return {"mm_token_type_ids": self.token_types(input_ids)}

    def prompt_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         position_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, L, 3) the untouched prompt's M-RoPE positions, computed as the model does (get_rope_index) from
        input_ids and the items' grids (and videos' seconds): generate()'s own position_ids are 1-D wherever the
        caller left out mm_token_type_ids, so they are not taken."""
        positions, _ = self.inner.get_rope_index(input_ids, self.token_types(input_ids), attention_mask=attention_mask,
                                                 **self.items.rope_arguments())
        return positions.permute(1, 2, 0)

    # ---- images and videos: views in, the LLM's tokens out -----------------------------------
    def views(self, pixel_values: torch.Tensor, items: VisualItems, interpolate: bool) -> torch.Tensor:
        """The patches of every image and video, (sum t h w, C T P P), in prompt order as visual_inputs()
        packed them, taken with the items: what the tower runs on."""
        if interpolate:
            raise SlimVLMError(f"interpolate_pos_encoding is not a {self.name} argument (its ViT takes any size); leave it "
                               "out")
        self.items = items
        return pixel_values

    @property
    def grids(self) -> list[tuple[int, int, int]]:
        """(t, h, w) patches of each item of the last views(), in prompt order."""
        return [] if self.items is None else self.items.grids

    def visual_outputs(self, tokens: VisualTokens) -> dict:
        """image_outputs and video_outputs, each kind's items' tokens, as the untouched model fills them."""
        split = tokens.split()
        return modality_outputs({kind.name: [t for t, own in zip(split, self.items.kinds) if own is kind] for kind in KINDS},
                                self.output_class)

    @property
    def patch_values(self) -> int:
        """Values a row of pixel_values holds: a patch of each channel over the frames it spans."""
        vision = self.vision_config
        return vision.in_channels * vision.temporal_patch_size * vision.patch_size**2

    def image_tokens(self) -> list[int]:
        return [t * h * w // self.merge**2 for t, h, w in self.grids]

    def images_per_sample(self, placeholders: list[int]) -> list[int]:
        return images_in_prompt_order(placeholders, self.image_tokens(), self.sizes_argument)

    def synthetic_images(self, count: int, generator: torch.Generator) -> tuple[dict, int]:
        """Images of SYNTHETIC_SIDE x SYNTHETIC_SIDE pixels as the processor hands them over (no resize needed)."""
        side = SYNTHETIC_SIDE // self.vision_config.patch_size
        pixels = torch.randn(count * side * side, self.patch_values, generator=generator)
        grid = torch.tensor([[1, side, side]] * count)
        return {"pixel_values": pixels, "image_grid_thw": grid}, side * side // self.merge**2

    def synthetic_videos(self, count: int, frames: int, generator: torch.Generator) -> tuple[dict, int]:
        """Videos of `frames` frames of SYNTHETIC_SIDE px (frames / temporal_patch_size steps), a second per step."""
        steps, rest = divmod(frames, self.vision_config.temporal_patch_size)
        if rest or not steps:
            raise SlimVLMError(f"--video-frames {frames}: {self.name} takes frames in pairs "
                               f"(temporal_patch_size {self.vision_config.temporal_patch_size}); give an even count")
        side = SYNTHETIC_SIDE // self.vision_config.patch_size
        pixels = torch.randn(count * steps * side * side, self.patch_values, generator=generator)
        tensors = {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[steps, side, side]] * count)}
        if "second_per_grid_ts" in inspect.signature(self.model.forward).parameters:  # Qwen2.5-VL
            tensors["second_per_grid_ts"] = torch.ones(count)
        return tensors, steps * side * side // self.merge**2

    # ---- stages 1-2: the vision tower and merger ------------------------------------------------
    def encode(self, pixel_values: torch.Tensor, method: Method | None, graphs: bool = False,
               keep_width: bool = False) -> tuple[VisualTokens, list[torch.Tensor]]:
        """The vision tower and its merger as the model runs them: each item's merger outputs, padded to the
        longest item (get_video_features is get_image_features on a video's frames). The trace gives, per ViT
        block, the tokens of each attention segment at its input (an image or a video's frame, or in 2.5's
        windowed blocks a window; 0 past a block's last segment), for the FLOPs. graphs, keep_width: unused (the
        tower is not captured: vision_capturable is False)."""
        grid = torch.tensor(self.grids)
        if pixel_values.dim() != 2 or pixel_values.shape[0] != int(grid.prod(dim=1).sum()):
            raise SlimVLMError(
                f"pixel_values of shape {tuple(pixel_values.shape)} are not the patches of the items views() took "
                f"({self.grids}): {self.name}'s tower runs on the processor's packed patches with image_grid_thw, not on "
                "fixed-size views (bench-vision's); time it with slimvlm bench or bench-generate"
            )
        if method is None:
            output = self.inner.get_image_features(pixel_values, grid.to(pixel_values.device))
            return VisualTokens.from_images(list(output.pooler_output), self.layer_features(output)), self._segments(grid)
        last = self.visual.blocks[-1].attn
        with capture_inputs(last) as captured:
            output = self.inner.get_image_features(pixel_values, grid.to(pixel_values.device))
        received, keys = self._merged_attention(last, captured["args"][0], captured["kwargs"], grid)
        features = self.layer_features(output)
        parts, start = [], 0
        for index, item in enumerate(output.pooler_output):  # each item alone: its own token count
            end = start + len(item)
            attention = EncoderAttention(layer=len(self.visual.blocks) - 1, num_layers=len(self.visual.blocks),
                                         keys=keys[start:end].transpose(0, 1)[None], rows=no_rows,
                                         received=received[None, start:end], positions_kept=True)
            tokens = VisualTokens.from_images([item], None if features is None else [features[index]])
            parts.append(method.encode_output(attention, tokens))
            start = end
        return VisualTokens.cat(parts), self._segments(grid)

    def layer_features(self, output) -> list[torch.Tensor] | None:
        """Per item, what its tokens add to the LM's first layers (VisualTokens.layer_features): none on Qwen2-VL."""
        return None

    def _merged_attention(self, attn: nn.Module, hidden: torch.Tensor, kwargs: dict,
                          grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per merged token in prompt order (as the merger's outputs): the attention its 2 x 2 patches receive
        in the last ViT block (softmax of rotated queries and keys within each image or frame, mean over heads,
        summed over the queries, mean over the 4 patches) and their rotated keys' mean, (U,) and (U, H, d): what
        VisionZip's Qwen2.5-VL port scores and merges by. Computed beside the block's SDPA, queries in chunks."""
        patches, heads = hidden.shape[0], attn.num_heads
        q, k = attn.qkv(hidden).view(patches, 3, heads, -1).float().unbind(1)[:2]
        cos, sin = (t.float()[:, None] for t in kwargs["position_embeddings"])
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        q = q * q.shape[-1] ** -0.5  # scaled once here, not on every (H, chunk, n) block of logits
        received = torch.zeros(patches, dtype=torch.float32, device=hidden.device)
        for begin, length, count in equal_segments(kwargs["cu_seqlens"].tolist(), SEGMENTS_AT_ONCE):
            # `count` images or video frames of `length` patches each, side by side: (G, H, n, d)
            end = begin + count * length
            keys = k[begin:end].view(count, length, heads, -1).transpose(1, 2)
            queries = q[begin:end].view(count, length, heads, -1).transpose(1, 2)
            total = received[begin:end].view(count, length)
            for first in range(0, length, QUERY_CHUNK):
                probabilities = (queries[:, :, first : first + QUERY_CHUNK] @ keys.transpose(2, 3)).softmax(dim=-1)
                total += probabilities.sum(dim=(1, 2)) / heads  # mean over heads, summed over queries
        unit = self.merge**2
        received, keys = received.view(-1, unit).mean(dim=1), k.view(-1, unit, heads, k.shape[-1]).mean(dim=1)
        if hasattr(self.visual, "fullatt_block_indexes"):  # Qwen2.5-VL's blocks run its units in window order
            window, _ = get_vision_window_index(grid, self.merge, self.visual.window_size, self.visual.patch_size)
            back = window.argsort().to(received.device)
            received, keys = received[back], keys[back]
        return received, keys

    def _segments(self, grid: torch.Tensor) -> list[torch.Tensor]:
        """Per ViT block, the patches of each attention segment (zero-padded to a common length)."""
        frames = get_vision_cu_seqlens(grid).diff()
        full = set(range(len(self.visual.blocks)))
        windows = frames
        if hasattr(self.visual, "fullatt_block_indexes"):  # Qwen2.5-VL: window attention but in these blocks
            full = set(self.visual.fullatt_block_indexes)
            _, bounds = get_vision_window_index(grid, self.merge, self.visual.window_size, self.visual.patch_size)
            windows = bounds.diff()
        longest = max(len(frames), len(windows))
        padded = [nn.functional.pad(s.long(), (0, longest - len(s))) for s in (frames, windows)]
        return [padded[0] if block in full else padded[1] for block in range(len(self.visual.blocks))]

    def project(self, tokens: VisualTokens, keep_cls: bool = False) -> VisualTokens:
        """Nothing left to run: the merger (Qwen's projector) ran in encode, as get_image_features runs it."""
        return tokens

    def projector_counts(self, projected: VisualTokens) -> list[int]:
        """Every item's units: the merger runs on all of them, before visionzip chooses."""
        return self.image_tokens()

    # ---- the language model: M-RoPE position ids ------------------------------------------------
    def decode_parts(self) -> DecodeParts:
        return self._decode_parts

    def run_llm(self, embeds, attention_mask, position_ids, cache, use_cache, **kwargs):
        return super().run_llm(embeds, attention_mask, mrope_ids(position_ids), cache, use_cache, **kwargs)

    def position_embeddings(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.language_model.rotary_emb(like, position_ids=mrope_ids(positions))

