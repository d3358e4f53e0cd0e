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


def landing(views: VisualTokens, patch_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per view token (V, N): the first slot its patches land on and how many land (patch_slot (V, P):
    each view patch's slot or -1); class tokens keep CLS_ORIGIN and their size; a token with no slot
    gets size 0 (it goes)."""
    num_views, per_view = views.size.shape
    device = views.x.device
    lands = (views.patch_to_token >= 0) & (patch_slot >= 0)
    flat = (torch.arange(num_views, device=device)[:, None] * per_view + views.patch_to_token.clamp_min(0))[lands]
    origin = torch.full((num_views * per_view,), PADDING_ORIGIN, dtype=torch.long, device=device)
    origin.scatter_reduce_(0, flat, patch_slot[lands], reduce="amin")
    size = torch.zeros(num_views * per_view, dtype=torch.float32, device=device)
    size.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    cls = views.is_cls & views.valid
    origin = torch.where(cls, CLS_ORIGIN, origin.view(num_views, per_view))
    return origin, torch.where(cls, views.size, size.view(num_views, per_view))


def pack(views: VisualTokens, layouts: list[ImageLayout], newline: torch.Tensor) -> VisualTokens:
    """Each image's views (consecutive rows of `views`, as `layouts` count them) joined into its LLM
    tokens in slot order, with `newline` (D,) on every newline slot. Reads the counts back once."""
    device = views.x.device
    num_views, per_view, dim = views.x.shape
    per_image = torch.tensor([layout.views for layout in layouts])
    if num_views != int(per_image.sum()):
        raise ValueError(f"{num_views} views, the layouts need {int(per_image.sum())}")
    patch_slot = torch.cat([layout.view_slots() for layout in layouts]).to(device)  # (V, P)
    origin, size = landing(views, patch_slot)
    # candidates: a row per image holding its views' tokens (view after view), then its newlines
    view_image = torch.repeat_interleave(torch.arange(len(layouts)), per_image).to(device)
    first_view = (per_image.cumsum(0) - per_image).to(device)
    column = (torch.arange(num_views, device=device) - first_view[view_image])[:, None] * per_view
    column = column + torch.arange(per_view, device=device)  # (V, N)
    line_image = torch.cat([torch.full((layout.rows,), i) for i, layout in enumerate(layouts)]).to(device)
    line_column = torch.cat([layout.views * per_view + torch.arange(layout.rows) for layout in layouts]).to(device)
    line_slot = torch.cat([layout.newline_slots() for layout in layouts]).to(device)
    shape = (len(layouts), max(layout.views for layout in layouts) * per_view + max(layout.rows for layout in layouts))
    key = torch.full(shape, PADDING_ORIGIN, dtype=torch.long, device=device)
    weight = torch.zeros(shape, dtype=torch.float32, device=device)
    source = torch.zeros(shape, dtype=torch.long, device=device)  # the row of `features` a candidate takes
    rows = view_image[:, None].expand(-1, per_view)
    key[rows, column] = torch.where(size > 0, origin, PADDING_ORIGIN)
    weight[rows, column] = size
    source[rows, column] = torch.arange(num_views * per_view, device=device).view(num_views, per_view)
    key[line_image, line_column] = line_slot
    weight[line_image, line_column] = 1.0
    source[line_image, line_column] = num_views * per_view
    features = torch.cat([views.x.reshape(-1, dim), newline.to(views.x.dtype)[None]])

    ordered = key.argsort(dim=1, stable=True)  # by slot; class tokens first, in view order
    counts = (key != PADDING_ORIGIN).sum(dim=1).tolist()  # the one read back
    order = ordered[:, : max(counts)]
    kept = torch.arange(order.shape[1], device=device)[None] < torch.tensor(counts, device=device)[:, None]
    rank = torch.empty_like(ordered).scatter_(1, ordered, torch.arange(shape[1], device=device).expand(shape[0], -1))
    # the source map: each slot -> the rank of the token on it
    slots = max(layout.slots for layout in layouts)
    patch_to_token = torch.full((len(layouts), slots), -1, dtype=torch.long, device=device)
    lands = (views.patch_to_token >= 0) & (patch_slot >= 0)
    on = view_image[:, None].expand_as(patch_slot)[lands]
    patch_to_token[on, patch_slot[lands]] = rank[on, column.gather(1, views.patch_to_token.clamp_min(0))[lands]]
    patch_to_token[line_image, line_slot] = rank[line_image, line_column]
    return VisualTokens(
        x=torch.where(kept[..., None], features[source.gather(1, order)], 0),
        size=torch.where(kept, weight.gather(1, order), 0.0),
        origin=torch.where(kept, key.gather(1, order), PADDING_ORIGIN),
        patch_to_token=patch_to_token,
        grid=None,
        has_cls=views.has_cls,
        known=counts,
        view_slots=torch.where(patch_slot >= 0, view_image[:, None] * slots + patch_slot, -1),
    )
