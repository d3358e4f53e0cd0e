"""AnyRes: how LLaVA-NeXT lays the tokens of an image's encoder views out for the LLM.

An image is encoded as several views of one fixed size: a base view (the whole image, resized) and
tiles of the image resized to a grid of views (the best of the model's image_grid_pinpoints). The LLM
sees the base view's patches, then the tiles joined into one canvas, cut to the image's aspect ratio
(the letterbox padding goes) and with image_newline after every canvas row. Here that layout is a
numbered list of slots: the base view's side x side patches in raster order, then the kept canvas
row by row, each row `cols + 1` slots wide (its patches, then its newline). An untouched image's
placeholder tokens are exactly its slots, in order.

Tokens that a stage-1 method merged or dropped inside a view keep that bookkeeping: a token lands on
the slots of its patches that survive the cut, takes the first of them as its origin and their number
as its size; a token left with no slot lay wholly in the padding and goes, as the untouched model
drops it. Class tokens (kept by methods that feed CLS on) come first, in view order. The packed
VisualTokens of an image are in slot order, so any later regroup keeps the LLM's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokens import CLS_ORIGIN, PADDING_ORIGIN, VisualTokens


@dataclass(frozen=True)
class ImageLayout:
    """One image: views of side x side patches, a base view then tiles[0] x tiles[1] tiles (row-major);
    of the tiles' canvas the LLM keeps rows [top, top + rows) and columns [left, left + cols)."""

    side: int
    tiles: tuple[int, int]
    top: int
    left: int
    rows: int
    cols: int

    @property
    def views(self) -> int:
        return 1 + self.tiles[0] * self.tiles[1]

    @property
    def slots(self) -> int:
        """The image's tokens in the untouched LLM input: base patches, then each kept row and its newline."""
        return self.side * self.side + self.rows * (self.cols + 1)

    def view_slots(self) -> torch.Tensor:
        """(views, side * side): the slot of each view's patch, -1 where the cut to the aspect ratio drops it."""
        side, (_, tile_cols) = self.side, self.tiles
        base = torch.arange(side * side)[None]
        tile = torch.arange(self.views - 1)[:, None]
        patch = torch.arange(side * side)[None]
        row = (tile // tile_cols) * side + patch // side - self.top  # in the kept canvas
        col = (tile % tile_cols) * side + patch % side - self.left
        inside = (row >= 0) & (row < self.rows) & (col >= 0) & (col < self.cols)
        tiles = torch.where(inside, side * side + row * (self.cols + 1) + col, -1)
        return torch.cat([base, tiles])

    def newline_slots(self) -> torch.Tensor:
        """(rows,): the slot of each kept canvas row's newline."""
        return self.side * self.side + torch.arange(self.rows) * (self.cols + 1) + self.cols


def pack(views: VisualTokens, layouts: list[ImageLayout], newline: torch.Tensor) -> VisualTokens:
    """Each image's views (consecutive rows of `views`, as `layouts` count them) joined into its
    LLM tokens in slot order, with `newline` (D,) at every newline slot. Reads the counts back once."""
    device = views.x.device
    num_views, per_view, dim = views.x.shape
    if num_views != sum(layout.views for layout in layouts):
        raise ValueError(f"{num_views} views, the layouts need {sum(layout.views for layout in layouts)}")
    patch_slot = torch.cat([layout.view_slots() for layout in layouts]).to(device)  # (V, P)
    view_image = torch.cat([torch.full((layout.views,), i) for i, layout in enumerate(layouts)]).to(device)
    # each view token: the first slot it lands on and how many; class tokens stay (origin CLS_ORIGIN)
    token = views.patch_to_token
    lands = (token >= 0) & (patch_slot >= 0)
    flat = (torch.arange(num_views, device=device)[:, None] * per_view + token.clamp_min(0))[lands]
    origin = torch.full((num_views * per_view,), PADDING_ORIGIN, dtype=torch.long, device=device)
    origin.scatter_reduce_(0, flat, patch_slot[lands], reduce="amin")
    size = torch.zeros(num_views * per_view, dtype=torch.float32, device=device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.float32))
    cls = (views.is_cls & views.valid).flatten()
    origin = torch.where(cls, CLS_ORIGIN, origin)
    size = torch.where(cls, views.size.flatten(), size)

    # candidates per image: its views' tokens, then its newlines; sorted by origin (ties: class tokens, in view order)
    first_view = [0]
    for layout in layouts[:-1]:
        first_view.append(first_view[-1] + layout.views)
    width = max(layout.views for layout in layouts) * per_view + max(layout.rows for layout in layouts)
    images = len(layouts)
    table = torch.full((images, width), -1, dtype=torch.long, device=device)  # candidate -> row of `features`
    key = torch.full((images, width), PADDING_ORIGIN, dtype=torch.long, device=device)
    cand_size = torch.zeros(images, width, dtype=torch.float32, device=device)
    newlines = num_views * per_view  # the row of `features` that holds the newline
    for i, (layout, start) in enumerate(zip(layouts, first_view)):
        rows = torch.arange(start * per_view, (start + layout.views) * per_view, device=device)
        table[i, : rows.numel()] = rows
        key[i, : rows.numel()] = origin[rows]
        cand_size[i, : rows.numel()] = size[rows]
        at = layout.views * per_view + torch.arange(layout.rows, device=device)
        table[i, at] = newlines
        key[i, at] = layout.newline_slots().to(device)
        cand_size[i, at] = 1.0
    key = torch.where(cand_size > 0, key, PADDING_ORIGIN)
    sorted_all = key.argsort(dim=1, stable=True)
    counts = (key != PADDING_ORIGIN).sum(dim=1).tolist()  # the one read back
    order = sorted_all[:, : max(counts)]
    features = torch.cat([views.x.reshape(-1, dim), newline.to(views.x.dtype)[None]])
    picked = table.gather(1, order)
    kept = torch.arange(order.shape[1], device=device)[None] < torch.tensor(counts, device=device)[:, None]
    x = torch.where(kept[..., None], features[picked.clamp_min(0)], 0)

    # the source map: each slot -> the rank of the token on it
    rank = torch.empty(images, width, dtype=torch.long, device=device)
    rank.scatter_(1, sorted_all, torch.arange(width, device=device).expand(images, -1))
    slots = max(layout.slots for layout in layouts)
    patch_to_token = torch.full((images, slots), -1, dtype=torch.long, device=device)
    column = (torch.arange(num_views, device=device) - torch.tensor(first_view, device=device)[view_image])[:, None] * per_view + token
    image_of_patch = view_image[:, None].expand_as(token)
    patch_to_token[image_of_patch[lands], patch_slot[lands]] = rank[image_of_patch[lands], column[lands]]
    for i, layout in enumerate(layouts):
        at = layout.views * per_view + torch.arange(layout.rows, device=device)
        patch_to_token[i, layout.newline_slots().to(device)] = rank[i, at]
    return VisualTokens(
        x=x,
        size=torch.where(kept, cand_size.gather(1, order), 0.0),
        origin=torch.where(kept, key.gather(1, order), PADDING_ORIGIN),
        patch_to_token=patch_to_token,
        grid=None,
        has_cls=views.has_cls,
        known=counts,
        view_slots=torch.where(patch_slot >= 0, view_image[:, None] * slots + patch_slot, -1),
    )
