"""Views whose patch grid the model joins after the tower into units, each unit one fixed square block of
patches (InternVL's pixel shuffle, Gemma 3's average pooling): what stage-1 methods inside the tower see (a
view's patches) and what every other method sees (its units) differ, and a patch's unit is where its marks land
(MustDrop's important set)."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..method import Method, Stage
from ..tokens import VisualTokens
from .pixel_shuffle import unit_of_patch


class UnitViews:
    """For a LLaVA-style adapter (grid, tokens_per_image: a view's patches) whose model joins block x block patches
    into one unit: units is the units' grid, view_tokens their number (a view's tokens for the LLM)."""

    joined_by = ""  # what joins the patches, as messages name it

    @classmethod
    def refusal(cls, method: Method) -> str | None:
        """What the units leave no place for: virtual unmerging (stage-1 merges are undone before the units are
        formed) and modules laid out a projected token per patch (LLaVA-Mini)."""
        if method.virtual_unmerge:
            return (f"{method.name} unmerges in the LLM the tokens a stage-1 method merged, but on {cls.name} the merges "
                    f"are undone before the {cls.joined_by} (each patch takes its merged token's features; every view "
                    "gives the LLM all its tokens), so nothing stays merged; run the stage-1 method alone (tome, "
                    "dymu:vtu=false)")
        if method.grid_from_vision_config:
            return (f"{method.name}'s modules are laid out on the vision config's patch grid, a projected token per "
                    f"patch, but {cls.name}'s {cls.joined_by} joins each block of patches into one token; use pool, "
                    "uniform, random or divprune at stage 2")
        return None

    def _join_units(self, block: int) -> None:
        """Set the units of a view whose square grid block x block patches tile (the caller has checked it)."""
        rows, cols = self.grid
        self.block = block
        self.units = (rows // block, cols // block)
        self.view_tokens = self.units[0] * self.units[1]
        self.patch_unit = unit_of_patch(self.grid, block)

    def method_limits(self, method: Method) -> tuple[int, int, int]:
        """Stage 1 inside the tower reaches a view's patches, every other method its units."""
        inside = Stage.ENCODE in method.stages and not method.at_merged_tokens
        tokens = self.tokens_per_image if inside else self.view_tokens
        return self.vision_layers_run, len(self.llm_layers), tokens

    def unit_tokens(self, projected: torch.Tensor) -> VisualTokens:
        """Each view's projected units (B, U, D) as fresh tokens on the units grid, each patch's unit in view_slots."""
        units = VisualTokens.from_patches(projected, self.units, has_cls=False)
        if self.patch_unit.device != projected.device:  # moved once, not in a CUDA graph's capture (after its warm-up)
            self.patch_unit = self.patch_unit.to(projected.device)
        view = torch.arange(projected.shape[0], device=projected.device)[:, None] * self.view_tokens
        return replace(units, view_slots=view + self.patch_unit)

    def projector_counts(self, projected: VisualTokens) -> list[int]:
        """Every view's units: the projector runs on all of them, before a method chooses."""
        return [self.view_tokens] * projected.batch_size
