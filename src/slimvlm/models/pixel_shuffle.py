"""InternVL's pixel shuffle, and what it makes of tokens a stage-1 method merged.

The shuffle reads a view's whole patch grid (rows x cols, raster order) and joins each block x block square
of patches into one token, its features the block's patches' side by side (InternVLModel.pixel_shuffle: for
block 2, token (i, j) is [p(2i, 2j), p(2i, 2j+1), p(2i+1, 2j), p(2i+1, 2j+1)]), tokens in raster order of the
(rows / block) x (cols / block) grid of blocks ("units"). A stage-1 method that merged patches inside the tower
leaves fewer tokens than the grid has patches; the shuffle then gets each patch with its token's features (the
merge undone onto the patches it covers), so every unit is the model's own function of its patches' tokens and
the LLM gets a view's units, however many tokens the tower kept.
"""

from __future__ import annotations

import torch

from ..tokens import VisualTokens


def unmerged(tokens: VisualTokens) -> torch.Tensor:
    """(B, P, D): every patch of each view with the features of the token it belongs to (patch_to_token), in
    raster order, the class token left out. Stage-1 methods inside the tower merge and never drop, so every
    patch has a token."""
    return tokens.x.gather(1, tokens.patch_to_token[..., None].expand(-1, -1, tokens.x.shape[-1]))


def unit_of_patch(grid: tuple[int, int], block: int) -> torch.Tensor:
    """(P,): the unit (the shuffled token, raster order) each patch of a rows x cols grid joins."""
    rows, cols = grid
    patch = torch.arange(rows * cols)
    return (patch // cols // block) * (cols // block) + patch % cols // block


def unit_mean(values: torch.Tensor, grid: tuple[int, int], block: int) -> torch.Tensor:
    """values (..., P, C) of a grid's patches in raster order -> (..., U, C): each unit's mean over its patches."""
    rows, cols = grid
    lead, width = values.shape[:-2], values.shape[-1]
    blocks = values.reshape(*lead, rows // block, block, cols // block, block, width)
    return blocks.mean(dim=(-4, -2)).reshape(*lead, -1, width)
