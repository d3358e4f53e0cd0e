"""Calibration for methods whose budget is a threshold: DyMU's per-layer merge thresholds.

DToMe (DyMU, arXiv 2504.17040, Sec. 3.1 "Finding Redundancy Thresholds"; the authors' code,
MikeWangWZHL/dymu `batch_level_bipartite_soft_matching` and `threshold_finder.py`): choose how many
tokens r_l each encoder layer should merge per image on average, then run batches of images
through the vision tower; at layer l rank the bipartite edges (each A token's best similarity) of
the WHOLE batch, merge the top B * r_l of them, so simple images merge more and busy ones less,
and record tau_l = the similarity of the first edge not merged (at least 0). The next layer sees
the tokens so merged. tau_l is averaged over batches (the authors' running mean). At inference an
image merges every edge whose similarity is strictly greater than tau_l.

What `target` counts: the patch tokens (class token excluded) after the last encoder layer slimvlm
runs (adapter.vision_layers_run: 23 of 24 for LLaVA-1.5, whose feature layer is -2), i.e. the
visual tokens that reach the LLM with LLaVA's 'default' feature selection (576 untouched for
CLIP ViT-L/14-336). r_total = patches - target is split evenly over the layers run, the remainder
one each to the first layers (the authors' "constant" schedule); no layer may merge more than
ToMe's cap, half of its unprotected tokens ((t - 1) // 2 with the class token protected).

Thresholds are saved as JSON (never pickle) with the identity of the model they were made for.
A model folder may ship its own as `dymu/target_<N>.json` (`shipped_thresholds`): then `dymu:target=N`
and the presets find them without `thresholds=`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import SlimVLMError
from .methods.dymu import best_partners, merge_assign
from .methods.tome import merge_published
from .models import adapter_for
from .method import EncoderAttention, Method, Stage
from .tokens import VisualTokens

FORMAT = 1
# config entries that say how a model was loaded or run, not what it computes
RUNTIME_KEYS = {
    "dtype", "torch_dtype", "transformers_version", "architectures", "output_attentions", "output_hidden_states",
    "return_dict", "use_return_dict", "attn_implementation", "id2label", "label2id", "problem_type",
}
# readable facts kept beside the hash, so a mismatch can say what differs
FACTS = ("model_class", "vision_model_type", "hidden_size", "num_attention_heads", "image_size", "patch_size",
         "vision_feature_layer", "vision_feature_select_strategy", "vision_layers_run", "tokens_per_image")


SHIPPED = "dymu/target_{target}.json"


def shipped_thresholds(folder: str | Path) -> dict[int, Path]:
    """DyMU thresholds a model folder ships for itself, by target (`dymu/target_<N>.json`, made by
    `slimvlm calibrate --target N --out FOLDER/dymu/target_N.json`; the testbed ships 96, 195 and 394)."""
    found = {}
    for path in sorted(Path(folder).glob(SHIPPED.format(target="*"))):
        target = path.stem.removeprefix("target_")
        if target.isdigit():
            found[int(target)] = path
    return found


def identity_of(model) -> dict:
    """What a threshold file is tied to: the model class, a sha256 of the vision config (JSON, sorted
    keys, without load-time entries such as dtype) together with the feature layer and the feature
    selection, and the readable facts behind it."""
    adapter = adapter_for(model)
    config = model.config
    vision = config.vision_config
    kept = {k: v for k, v in vision.to_dict().items() if not k.startswith("_") and k not in RUNTIME_KEYS}
    hashed = {
        "vision_config": kept,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "model_class": type(model).__name__,
        "vision_config_sha256": digest,
        "vision_model_type": getattr(vision, "model_type", None),
        "hidden_size": vision.hidden_size,
        "num_attention_heads": vision.num_attention_heads,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vision_layers_run": adapter.vision_layers_run,
        "tokens_per_image": adapter.tokens_per_image,
        "patches": adapter.grid[0] * adapter.grid[1],
    }


def constant_schedule(patches: int, target: int, layers: int) -> list[int]:
    """The authors' constant r schedule: r_total = patches - target split evenly over `layers`, the
    remainder one each to the first layers."""
    base, extra = divmod(patches - target, layers)
    return [base + (1 if layer < extra else 0) for layer in range(layers)]


def _over_cap(schedule: list[int], patches: int, protected: int = 1) -> tuple[int, int, int] | None:
    """The first layer whose r exceeds ToMe's cap (t - protected) // 2, as (layer, r, cap), or None."""
    tokens = patches + protected
    for layer, r in enumerate(schedule):
        cap = (tokens - protected) // 2
        if r > cap:
            return layer, r, cap
        tokens -= r
    return None


def schedule_for(patches: int, target: int, layers: int) -> list[int]:
    """The r schedule for `target`, or a clear error if the target is out of reach."""
    if isinstance(target, bool) or not isinstance(target, int):
        raise SlimVLMError(f"target={target!r} must be a whole number of tokens")
    if not 1 <= target < patches:
        raise SlimVLMError(f"target={target} must be between 1 and {patches - 1} (an image has {patches} patch tokens)")
    schedule = constant_schedule(patches, target, layers)
    over = _over_cap(schedule, patches)
    if over is not None:
        lowest = target
        while lowest < patches and _over_cap(constant_schedule(patches, lowest, layers), patches) is not None:
            lowest += 1
        layer, r, cap = over
        raise SlimVLMError(
            f"target={target} is out of reach in {layers} encoder layers: layer {layer} would have to merge {r} tokens "
            f"per image but can merge at most {cap} (half of its tokens); the lowest target is {lowest}"
        )
    return schedule


@dataclass
class Thresholds:
    """DyMU's calibrated per-layer thresholds (one per encoder layer run) and what they were made for."""

    thresholds: list[float]
    identity: dict
    target: int
    schedule: list[int]
    images: int
    method: str = "dymu"
    source: str | None = field(default=None, compare=False)  # the file it was loaded from (not saved)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "method": self.method,
            "target": self.target,
            "target_counts": "patch tokens after the last encoder layer run, class token excluded",
            "schedule": list(self.schedule),
            "r_total": int(sum(self.schedule)),
            "images": self.images,
            "thresholds": [float(t) for t in self.thresholds],
            "identity": self.identity,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.source = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Thresholds":
        path = Path(path)
        if not path.is_file():
            raise SlimVLMError(f"no threshold file at {path}; make one with `slimvlm calibrate --method dymu --target N --out {path}`")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SlimVLMError(f"{path} is not a threshold file (not JSON: {error}); make one with `slimvlm calibrate`") from None
        try:
            thresholds = cls(
                thresholds=[float(t) for t in data["thresholds"]],
                identity=dict(data["identity"]),
                target=int(data["target"]),
                schedule=[int(r) for r in data["schedule"]],
                images=int(data["images"]),
                method=str(data.get("method", "dymu")),
                source=str(path),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise SlimVLMError(f"{path} is not a slimvlm threshold file (missing or bad entry {error}); make one with `slimvlm calibrate`") from None
        if data.get("format") != FORMAT or thresholds.method != "dymu":
            raise SlimVLMError(f"{path} is not a DyMU threshold file of format {FORMAT}; make one with `slimvlm calibrate --method dymu`")
        layers = thresholds.identity.get("vision_layers_run")
        if len(thresholds.thresholds) != len(thresholds.schedule) or len(thresholds.thresholds) != layers:
            raise SlimVLMError(
                f"{path} has {len(thresholds.thresholds)} thresholds for a model that runs {layers} encoder layers; "
                "the file is damaged: calibrate again"
            )
        return thresholds

    # ---- checks ---------------------------------------------------------------------------------
    def _where(self) -> str:
        return self.source or "these thresholds"

    def check(self, model) -> None:
        """Refuse a model other than the one the thresholds were calibrated for."""
        mine = identity_of(model)
        if mine["model_class"] == self.identity.get("model_class") and mine["vision_config_sha256"] == self.identity.get("vision_config_sha256"):
            return
        differ = [f"{key} {self.identity.get(key)!r} vs {mine[key]!r}" for key in FACTS if self.identity.get(key) != mine[key]]
        detail = "; ".join(differ) if differ else "the vision configs differ"
        raise SlimVLMError(
            f"{self._where()} were calibrated for another model (file vs this model: {detail}); "
            f"calibrate for this model: `slimvlm calibrate --model PATH --method dymu --target {self.target}`"
        )

    def check_shape(self, num_vision_layers: int, tokens_per_image: int) -> None:
        """What a method can check without the model: layers run and tokens per image."""
        if len(self.thresholds) != num_vision_layers:
            raise SlimVLMError(
                f"{self._where()} hold {len(self.thresholds)} per-layer thresholds but this model runs {num_vision_layers} "
                f"encoder layers: they were made for another model; calibrate for this one (--target {self.target})"
            )
        if self.identity.get("tokens_per_image") != tokens_per_image:
            raise SlimVLMError(
                f"{self._where()} were calibrated for {self.identity.get('tokens_per_image')} tokens per image, this model has "
                f"{tokens_per_image}: they were made for another model; calibrate for this one (--target {self.target})"
            )


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


# ---- images -------------------------------------------------------------------------------------
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
    from .testbed.scenes import make_samples

    return [sample.image for sample in make_samples(count, seed=seed, split="train")]


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


# ---- calibration ----------------------------------------------------------------------------------
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
    weight = adapter.vision.embeddings.patch_embedding.weight
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
    from .methods.dymu import DyMU

    thresholds.check(model)
    adapter = adapter_for(model)
    method = DyMU(thresholds=thresholds, vtu=False)
    adapter.check_method(method)
    weight = adapter.vision.embeddings.patch_embedding.weight
    out: list[int] = []
    for batch in _batches(images, batch_size):
        tokens, _ = adapter.encode(_pixels(batch, processor, weight.device, weight.dtype), method)
        out += (tokens.counts - int(tokens.has_cls)).tolist()
    return out


def summary(counts: list[int]) -> str:
    mean = sum(counts) / len(counts)
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts))
    return f"{mean:.1f} +- {std:.1f} (min {min(counts)}, max {max(counts)})"
