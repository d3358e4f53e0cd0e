"""DyMU's calibration: the per-layer merge thresholds for a target token count.

DToMe (DyMU, arXiv 2504.17040, Sec. 3.1 "Finding Redundancy Thresholds"; the authors' code,
MikeWangWZHL/dymu `batch_level_bipartite_soft_matching` and `threshold_finder.py`): choose how many
tokens r_l each encoder layer should merge per image on average (schedule.py), then run batches of images
through the vision tower; at layer l rank the bipartite edges (each A token's best similarity) of
the WHOLE batch, merge the top B * r_l of them, so simple images merge more and busy ones less,
and record tau_l = the similarity of the first edge not merged (at least 0). The next layer sees
the tokens so merged. tau_l is averaged over batches (the authors' running mean). At inference an
image merges every edge whose similarity is strictly greater than tau_l.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch

from ...errors import SlimVLMError
from ...method import EncoderAttention, Method, Stage
from ...models import adapter_for
from ...tokens import VisualTokens
from ..tome import merge_published
from .matching import best_partners, merge_assign
from .method import DyMU
from .schedule import schedule_for
from .thresholds import Thresholds, identity_of


class BatchLevelMerge(Method):
    """The calibration pass at layer l: merge the top B * r_l edges of the whole batch and record
    the similarity of the first edge not merged."""

    name = "dymu-calibration"
    stages = frozenset({Stage.ENCODE})
    proportional_attention = True

    def __init__(self, schedule: list[int]) -> None:
        self.schedule = schedule
        self.taus: list[float | None] = [None] * len(schedule)

    def encode_layer(self, attention: EncoderAttention, tokens: VisualTokens) -> VisualTokens:
        r = self.schedule[attention.layer]
        n = tokens.x.shape[1]
        if r == 0 or n < 2:
            return tokens
        best, partner = best_partners(attention.keys.mean(dim=1), tokens.valid, tokens.is_cls)
        flat = best.flatten()
        candidates = int(torch.isfinite(flat).sum())
        count = tokens.batch_size * r
        order = flat.argsort(descending=True, stable=True)
        # the authors clip the index to the last edge, which is -inf (a class token) once every
        # candidate merges: tau is then 0
        tau = float(flat[order[count]]) if count < candidates else 0.0
        self.taus[attention.layer] = max(tau, 0.0)
        merge = torch.zeros_like(flat, dtype=torch.bool)
        merge[order[: min(count, candidates)]] = True
        return merge_published(tokens, merge_assign(merge.view_as(best), partner, n))


def _pixels(items: list, processor, device, dtype) -> torch.Tensor:
    """PIL images (through the processor) and (3, H, W) or (B, 3, H, W) tensors -> (B, 3, H, W): the
    encoder's views (LLaVA-NeXT: each image's crops, which DyMU merges one by one)."""
    out = []
    for item in items:
        if isinstance(item, torch.Tensor):
            if item.dim() == 3:
                item = item[None]
            if item.dim() != 4 or item.shape[1] != 3:
                raise SlimVLMError(f"a pixel tensor must have shape (3, H, W) or (B, 3, H, W), got {tuple(item.shape)}")
            out.append(item)
        else:
            if processor is None:
                raise SlimVLMError("PIL images need the model's processor: pass processor=... (or pixel tensors)")
            image_processor = getattr(processor, "image_processor", processor)
            pixels = image_processor(images=[item], return_tensors="pt")["pixel_values"]
            out.append(pixels[0] if pixels.dim() == 5 else pixels)  # AnyRes (LLaVA-NeXT): the image's crops
    return torch.cat(out).to(device=device, dtype=dtype)


def _batches(images: Iterable, size: int) -> Iterator[list]:
    batch = []
    for image in images:
        batch.append(image)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _image_count(item) -> int:
    return item.shape[0] if isinstance(item, torch.Tensor) and item.dim() == 4 else 1


@torch.no_grad()
def calibrate_dymu(
    model,
    images: Iterable,
    target: int,
    batch_size: int = 16,
    progress: bool = True,
    processor=None,
) -> Thresholds:
    """DyMU's per-layer thresholds for an average of `target` patch tokens per image (class token
    excluded) after the last encoder layer run, from `images` (PIL images, processed by
    `processor`, or pixel tensors). Batch-level merging needs several images per batch: the
    thresholds are a running mean over batches, so use many varied images."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise SlimVLMError(f"batch_size={batch_size} must be at least 1 (the paper ranks edges over large batches)")
    adapter = adapter_for(model)
    patches = adapter.grid[0] * adapter.grid[1]
    layers = adapter.vision_layers_run
    schedule = schedule_for(patches, target, layers)
    weight = next(adapter.vision.parameters())  # the tower's device and dtype
    sums = [0.0] * layers
    counts = [0] * layers
    seen = 0
    total = len(images) if hasattr(images, "__len__") else None
    bar = tqdm(total=total, unit="image", desc=f"calibrating dymu (target {target})", disable=not progress)
    try:
        for batch in _batches(images, batch_size):
            pixels = _pixels(batch, processor, weight.device, weight.dtype)
            pass_ = BatchLevelMerge(schedule)
            adapter.encode(pixels, pass_)
            for layer, tau in enumerate(pass_.taus):
                if tau is not None:
                    sums[layer] += tau
                    counts[layer] += 1
            seen += pixels.shape[0]
            bar.update(sum(_image_count(item) for item in batch))
    finally:
        bar.close()
    if seen == 0:
        raise SlimVLMError("no calibration images: give a folder with images PIL can read, or 'testbed'")
    # a layer that merges nothing (r = 0) gets 1.0: no cosine similarity is greater
    thresholds = [sums[l] / counts[l] if counts[l] else 1.0 for l in range(layers)]
    return Thresholds(thresholds=thresholds, identity=identity_of(model), target=target, schedule=schedule, images=seen)


@torch.no_grad()
def token_counts(model, thresholds: Thresholds, images: Iterable, batch_size: int = 16, processor=None) -> list[int]:
    """Per image, the patch tokens (class token excluded) DyMU keeps with these thresholds."""
    thresholds.check(model)
    adapter = adapter_for(model)
    method = DyMU(thresholds=thresholds, vtu=False)
    adapter.check_method(method)
    weight = next(adapter.vision.parameters())  # the tower's device and dtype
    out: list[int] = []
    for batch in _batches(images, batch_size):
        tokens, _ = adapter.encode(_pixels(batch, processor, weight.device, weight.dtype), method)
        out += (tokens.counts - int(tokens.has_cls)).tolist()
    return out


def summary(counts: list[int]) -> str:
    """The tokens kept per image as `slimvlm calibrate --check` reports them: mean +- std (min, max)."""
    mean = sum(counts) / len(counts)
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts))
    return f"{mean:.1f} +- {std:.1f} (min {min(counts)}, max {max(counts)})"
