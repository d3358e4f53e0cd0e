"""Qwen2-VL's visual items, images and videos, in the order the prompts hold them.

The forward takes each kind on its own, in its own prompt order: an image's patches in pixel_values with
its (t, h, w) patch grid in image_grid_thw, a video's in pixel_values_videos and video_grid_thw
(t = frames / temporal_patch_size), and on Qwen2.5-VL second_per_grid_ts, a video's seconds per temporal
step, which spaces its tokens' temporal positions. Both kinds run through the same ViT and merger
(get_video_features is get_image_features on a video's frames), and a video's tokens are its merger
outputs, one per 2 x 2 unit of each temporal step, as an image's are. So slimvlm takes every item, image
or video, as one unit with its own count in the order of its placeholders: encoded in one run of the tower,
reduced with a budget of its own, rebuilt in place, counted in the stats.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..errors import SlimVLMError
from .adapter import images_in_prompt_order, items_in_prompt_order


@dataclass(frozen=True)
class Kind:
    """A kind of visual item, by the names the forward and the processor give it."""

    name: str
    type_id: int  # its mm_token_type_ids value
    pixels: str  # the forward argument with its patches
    grids: str  # the forward argument with each item's (t, h, w) patch grid


IMAGE = Kind("image", 1, "pixel_values", "image_grid_thw")
VIDEO = Kind("video", 2, "pixel_values_videos", "video_grid_thw")
KINDS = (IMAGE, VIDEO)
SECONDS = "second_per_grid_ts"  # Qwen2.5-VL: per video, the seconds between its temporal steps


@dataclass(frozen=True)
class Given:
    """One kind's items as the forward passed them: packed patches (sum t h w, C T P P), (n, 3) grids (and
    read back), each item's token count, the items of each prompt, and (videos on 2.5) each one's seconds
    per temporal step."""

    pixels: torch.Tensor
    grid: torch.Tensor
    grids: list[tuple[int, int, int]]
    counts: list[int]
    per_sample: list[int]
    seconds: torch.Tensor | None = None

    def rows(self) -> tuple[torch.Tensor, ...]:
        """Per item, the indices of its rows of pixels."""
        rows = torch.arange(self.pixels.shape[0], device=self.pixels.device)
        return rows.split([t * h * w for t, h, w in self.grids])


@dataclass(frozen=True)
class VisualItems:
    """A forward's images and videos: each kind as given (what get_rope_index and generate's repeats take),
    and every item in prompt order, as its kind and its index among its kind (what slimvlm encodes and
    rebuilds)."""

    given: dict[Kind, Given]
    order: list[tuple[Kind, int]]

    @property
    def kinds(self) -> list[Kind]:
        return [kind for kind, _ in self.order]

    @property
    def grids(self) -> list[tuple[int, int, int]]:
        grids = {kind: given.grids for kind, given in self.given.items()}
        return [grids[kind][index] for kind, index in self.order]

    def pixels(self) -> torch.Tensor:
        """Every item's patches in prompt order (one kind alone: as given)."""
        if len(self.given) == 1:
            return next(iter(self.given.values())).pixels
        rows = {kind: given.rows() for kind, given in self.given.items()}
        return torch.cat([self.given[kind].pixels[rows[kind][index]] for kind, index in self.order])

    def rope_arguments(self) -> dict:
        """The grids (and a video's seconds) get_rope_index takes, each kind in its own prompt order."""
        arguments = {kind.grids: given.grid for kind, given in self.given.items()}
        seconds = self.given[VIDEO].seconds if VIDEO in self.given else None
        return arguments if seconds is None else {**arguments, SECONDS: seconds}

    def repeated(self, times: int) -> dict:
        """The forward's visual arguments with each prompt's items repeated `times` times in a row, as
        generate() repeats the prompt per beam or sequence."""
        out = {}
        for kind, given in self.given.items():
            starts = [sum(given.per_sample[:sample]) for sample in range(len(given.per_sample))]
            order = [item for start, count in zip(starts, given.per_sample) for _ in range(times)
                     for item in range(start, start + count)]
            rows = given.rows()
            out[kind.pixels] = given.pixels[torch.cat([rows[item] for item in order])]
            out[kind.grids] = given.grid[torch.tensor(order, device=given.grid.device)]
            if given.seconds is not None:
                out[SECONDS] = given.seconds[torch.tensor(order, device=given.seconds.device)]
        return out


def visual_items(arguments: dict, types: torch.Tensor, patch_values: int, merge: int,
                 frames_apart: bool = False) -> VisualItems | None:
    """The images and videos of a forward's arguments, checked against each other and against `types`
    (the prompts' mm_token_type_ids, from input_ids) and put in prompt order; None where it brings none.
    patch_values: values a row of pixels holds; merge: the merger's unit side in patches; frames_apart: each of
    a video's temporal steps is a run of placeholders of its own (Qwen3-VL writes a timestamp before each)."""
    rows = None
    given = {}
    for kind in KINDS:
        if arguments.get(kind.pixels) is None:
            continue
        if rows is None:
            rows = types.tolist()  # one read: the order and the counts below are host work
        placeholders = [row.count(kind.type_id) for row in rows]
        given[kind] = _given(kind, arguments, placeholders, patch_values, merge)
    if not given:
        return None
    if len(given) == 1:
        kind, one = next(iter(given.items()))
        return VisualItems(given, [(kind, index) for index in range(len(one.grids))])
    by_type = {kind.type_id: kind for kind in given}
    runs = [(kind, len(list(run))) for row in rows for kind, run in itertools.groupby(row) if kind in by_type]
    apart = {kind: frames_apart and kind is VIDEO for kind in given}
    parts = {kind.type_id: _parts(one, apart[kind], merge) for kind, one in given.items()}
    names = {kind.type_id: f"{kind.name} frame" if apart[kind] else kind.name for kind in given}
    order: list[tuple[Kind, int]] = []
    for type_id, part in items_in_prompt_order(runs, {type_id: counts for type_id, (counts, _) in parts.items()}, names):
        item = (by_type[type_id], parts[type_id][1][part])
        if not order or order[-1] != item:
            order.append(item)
    if len(set(order)) != len(order):
        raise SlimVLMError(
            "a video's frames are split by another image or video; put each video's frames together, as the "
            "processor writes them"
        )
    return VisualItems(given, order)


def _parts(given: Given, frames_apart: bool, merge: int) -> tuple[list[int], list[int]]:
    """(placeholders of each run an item's tokens come in, the item each run belongs to): an item is one run, or
    with frames_apart one run per temporal step."""
    if not frames_apart:
        return given.counts, list(range(len(given.counts)))
    steps = [(item, h * w // merge**2) for item, (t, h, w) in enumerate(given.grids) for _ in range(t)]
    return [count for _, count in steps], [item for item, _ in steps]


def _given(kind: Kind, arguments: dict, placeholders: list[int], patch_values: int, merge: int) -> Given:
    """One kind's items, checked: a grid per item, the rows its grids give, merge units whole, whole items
    in each prompt (placeholders: each prompt's of this kind)."""
    pixels, grid = arguments[kind.pixels], arguments.get(kind.grids)
    if grid is None:
        raise SlimVLMError(
            f"Qwen2-VL lays each {kind.name} out by its patch grid: pass {kind.grids} (the processor returns it with "
            f"{kind.pixels})"
        )
    grid = torch.as_tensor(grid)
    if grid.is_floating_point() or grid.dim() != 2 or grid.shape[1] != 3:
        raise SlimVLMError(
            f"{kind.grids} must be whole numbers, one (t, h, w) row per {kind.name} (an integer tensor of shape "
            f"({kind.name}s, 3), as the processor returns it), not a {grid.dtype} tensor of shape {tuple(grid.shape)}"
        )
    grids = [tuple(int(n) for n in row) for row in grid.tolist()]
    patches = sum(t * h * w for t, h, w in grids)
    if pixels.dim() != 2 or tuple(pixels.shape) != (patches, patch_values):
        raise SlimVLMError(
            f"{kind.pixels} of shape {tuple(pixels.shape)} do not hold the patches {kind.grids} {grids} gives "
            f"({patches} rows of {patch_values} values); pass the processor's {kind.pixels} and {kind.grids} together"
        )
    if any(h % merge or w % merge for _, h, w in grids):
        raise SlimVLMError(
            f"{kind.grids} {grids}: heights and widths must be multiples of the merge size {merge}, as the "
            "processor makes them"
        )
    seconds = arguments.get(SECONDS) if kind is VIDEO else None
    if seconds is not None and len(seconds) != len(grids):
        raise SlimVLMError(
            f"{SECONDS} gives {len(seconds)} value(s) for {len(grids)} video(s); pass the processor's, one per video"
        )
    counts = [t * h * w // merge**2 for t, h, w in grids]
    per_sample = images_in_prompt_order(placeholders, counts, kind.grids, kind.name)
    return Given(pixels, grid, grids, counts, per_sample, None if seconds is None else torch.as_tensor(seconds))
