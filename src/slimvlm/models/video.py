"""Videos on LLaVA-NeXT-Video: how a video's frames become the LLM's tokens, and where a prompt's images and
videos come.

A video is `frames` views of the crop size, each encoded by the image tower as a crop is. The model pools each
frame's side x side patch features (vision_resampler: average, max or conv, kernel = stride) into cells of
stride x stride patches, (side // stride)^2 a frame (patches past the last whole cell are left out, as the
pooling floors), then projects them; the LLM takes the frames' cells in order, with no newline. As for an
AnyRes image (models/anyres.py), that layout is a numbered list of slots, frame after frame, each frame's cells
in raster order, and a frame patch lands on its cell's slot: anyres.pack lays a video out from it as it lays out
an image, so a prompt's images and videos are one list of items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SlimVLMError


@dataclass(frozen=True)
class VideoLayout:
    """A video: `frames` views of side x side patches, each pooled into cells of stride x stride patches."""

    frames: int
    side: int
    stride: int

    @property
    def views(self) -> int:
        return self.frames

    @property
    def rows(self) -> int:
        """The newlines of its layout: none (anyres.pack adds one after each row of an image's canvas)."""
        return 0

    @property
    def cells(self) -> int:
        """Tokens per frame."""
        return (self.side // self.stride) ** 2

    @property
    def slots(self) -> int:
        """The video's tokens in the untouched LLM input: every frame's cells."""
        return self.frames * self.cells

    def cell_of_patch(self) -> torch.Tensor:
        """(side * side,): the cell each patch of a frame pools into, -1 past the last whole cell."""
        per_row = self.side // self.stride
        at = torch.arange(self.side) // self.stride
        row, col = at[:, None], at[None, :]
        return torch.where((row < per_row) & (col < per_row), row * per_row + col, -1).flatten()

    def view_slots(self) -> torch.Tensor:
        """(frames, side * side): the slot of each frame's patch (its cell's), -1 where the pooling leaves it out."""
        cell = self.cell_of_patch()[None]
        return torch.where(cell >= 0, torch.arange(self.frames)[:, None] * self.cells + cell, -1)

    def newline_slots(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)


def items_in_prompt_order(input_ids: torch.Tensor, counts: dict[int, list[int]], names: dict[int, str]) -> list[tuple[int, int]]:
    """The visual items of a batch of prompts in the order their placeholders come, as (placeholder id, index
    among that id's items). counts: per placeholder id, each of its items' placeholders, items of one id taken
    in their own order (as the model scatters them); each run of one id's placeholders must hold whole items.
    names: per id, what its items are called in errors ('image', 'video'). One read of the runs from the device."""
    ids = torch.tensor(list(counts), device=input_ids.device)
    marked = torch.where(torch.isin(input_ids, ids), input_ids, -1)
    marked = torch.nn.functional.pad(marked, (0, 1), value=-1).flatten()  # a run never crosses into the next prompt
    values, lengths = torch.unique_consecutive(marked, return_counts=True)
    taken = dict.fromkeys(counts, 0)
    order = []
    for kind, length in zip(values.tolist(), lengths.tolist()):
        if kind == -1:
            continue
        items = counts[kind]
        while length and taken[kind] < len(items) and items[taken[kind]] <= length:
            length -= items[taken[kind]]
            order.append((kind, taken[kind]))
            taken[kind] += 1
        if length:
            raise SlimVLMError(
                f"a run of {names[kind]} placeholders (token id {kind}) is not whole {names[kind]}s': the "
                f"{names[kind]}s given take {', '.join(map(str, items)) or 'none'} in turn, {taken[kind]} placed so far; "
                f"put one placeholder per {names[kind]} in the text, let the processor expand it, and pass the "
                f"{names[kind]}s in prompt order"
            )
    for kind, items in counts.items():
        if taken[kind] < len(items):
            raise SlimVLMError(
                f"{len(items)} {names[kind]}(s) given but the prompts have placeholders (token id {kind}) for "
                f"{taken[kind]}; put one placeholder per {names[kind]} in the text and let the processor expand it"
            )
    return order
