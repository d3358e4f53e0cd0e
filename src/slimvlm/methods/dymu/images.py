"""The images DyMU calibrates on: a folder of the user's, or testbed scenes."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ...errors import SlimVLMError


class ImageFolder:
    """The PIL-readable files under a folder (recursively, sorted by path), at most `limit` of them,
    opened one at a time as RGB. Files PIL cannot read are skipped."""

    def __init__(self, folder: str | Path, limit: int | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SlimVLMError(f"--images {folder}: no such folder; give a folder of images or 'testbed'")
        self.files = sorted(p for p in self.folder.rglob("*") if p.is_file())
        self.limit = limit
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.files) if self.limit is None else min(self.limit, len(self.files))

    def __iter__(self) -> Iterator:
        from PIL import Image, UnidentifiedImageError

        given = 0
        self.skipped = 0
        for path in self.files:
            if self.limit is not None and given >= self.limit:
                return
            try:
                with Image.open(path) as image:
                    rgb = image.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError):
                self.skipped += 1
                continue
            given += 1
            yield rgb


def calibration_scenes(count: int, seed: int = 0) -> list:
    """Images of `count` training-split testbed scenes (disjoint from the held-out test scenes)."""
    from ...testbed.scenes import make_samples

    return [sample.image for sample in make_samples(count, seed=seed, split="train")]
