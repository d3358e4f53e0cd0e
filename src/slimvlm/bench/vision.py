"""Vision-only timing: the vision tower (with a stage-1 method) + LLaVA's projector, nothing else.

What DToMe/ToMe cost or save inside the encoder is hidden by the LLM in `slimvlm bench`'s prefill
time; this times only adapter.encode + adapter.project (what the runtime runs before the LLM) on
testbed scenes, per batch size, and reports the tokens that leave the projector (per image,
class token excluded with LLaVA's 'default' selection) and the analytic FLOPs of the two stages.

DyMU needs thresholds calibrated for the model: a dymu spec without `thresholds=` is calibrated
here (slimvlm.methods.dymu.calibrate_dymu on training-split testbed scenes, disjoint from the
test-split scenes timed) for its target, and the result records that it was.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import SlimVLMError
from ..models import adapter_for
from ..registry import build, check_compatible, parse_spec
from ..method import Stage
from . import flops as flops_mod
from .table import text_table
from .timing import median_ms, peak_memory_bytes


@dataclass
class VisionResult:
    method: str
    batch_size: int
    tokens_mean: float
    tokens_min: int
    tokens_max: int
    latency_ms: float
    ms_per_image: float
    peak_memory_bytes: int | None
    flops: dict = field(default_factory=dict)
    flops_ratio: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def image_processor_for(model, processor=None):
    """The model's image processor, or CLIP preprocessing at the tower's size (what a LLaVA-1.5
    processor does) for a model without one, such as a random model of a published shape."""
    if processor is not None:
        return getattr(processor, "image_processor", processor)
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ..models.llava import pair

    height, width = pair(model.config.vision_config.image_size)  # InternViT gives (height, width)
    return CLIPImageProcessorPil(
        size={"shortest_edge": min(height, width)}, crop_size={"height": height, "width": width},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )


def scene_pixels(model, count: int, processor=None, seed: int = 0, split: str = "test") -> torch.Tensor:
    """(count, 3, H, W) pixel values of testbed scenes, on the model's device and dtype."""
    from ..testbed.scenes import make_samples

    images = [sample.image for sample in make_samples(count, seed=seed, split=split)]
    pixels = image_processor_for(model, processor)(images=images, return_tensors="pt")["pixel_values"]
    weight = next(adapter_for(model).vision.parameters())  # the tower's device and dtype
    return pixels.to(device=weight.device, dtype=weight.dtype)


def calibrate_specs(model, runs: list[list[str]], images: int, out_dir: str | Path, processor=None,
                    batch_size: int = 16) -> tuple[list[list[str]], list[dict]]:
    """Give every dymu spec without thresholds a file calibrated here for its target, on `images`
    training-split testbed scenes. Returns the runs with `thresholds=FILE` added and, per file
    made, what was done."""
    from ..methods.dymu import calibrate_dymu, calibration_scenes

    made: dict[int, dict] = {}
    resolved = []
    for specs in runs:
        out = []
        for spec in specs:
            name, options = parse_spec(spec)
            if name == "dymu" and options.get("thresholds") in (None, ""):
                target = options.get("target")
                if target is None:
                    raise SlimVLMError(f"{spec!r}: calibrating here needs a target; use a preset (dymu-low/mid/high) or target=N")
                if target not in made:
                    pixels = image_processor_for(model, processor)(images=calibration_scenes(images), return_tensors="pt")["pixel_values"]
                    thresholds = calibrate_dymu(model, list(pixels), target, batch_size=batch_size, progress=False)
                    path = thresholds.save(Path(out_dir) / f"dymu_target{target}_thresholds.json")
                    made[target] = {
                        "spec": spec, "target": target, "calibrated_in_this_run": True,
                        "images": f"{thresholds.images} testbed scenes (train split, seed 0)", "batch_size": batch_size,
                        "file": str(path), "schedule": thresholds.schedule, "thresholds": thresholds.thresholds,
                    }
                spec = f"{spec}{',' if ':' in spec else ':'}thresholds={made[target]['file']}"
            out.append(spec)
        resolved.append(out)
    return resolved, list(made.values())


def vision_stage(model, specs: list[str]):
    """(adapter, the stage-1 method or None) for a run; refuses a method acting after the projector,
    whose cost this timing would leave out."""
    methods = [build(spec) for spec in specs]
    check_compatible(methods)
    adapter = adapter_for(model)
    for method in methods:
        later = sorted(stage.name.lower() for stage in method.stages - {Stage.ENCODE})
        if later:
            hint = " (dymu: add vtu=false)" if method.name == "dymu" else ""
            raise SlimVLMError(
                f"vision-only timing runs the encoder and projector; {method.name!r} also acts at {', '.join(later)}, "
                f"which it would leave out: give stage-1 methods only{hint}"
            )
        adapter.check_method(method)
        method.check_identity(model)
    return adapter, next((m for m in methods if m.stages), None)


def vision_flops(model, vision_trace, projected: list[int]) -> dict:
    v, t = flops_mod.shapes(model.config)
    images = len(projected)
    encoder = images * flops_mod.patch_embedding_flops(v) + sum(
        flops_mod.vision_layer_flops(v, int(n)) for layer in vision_trace for n in layer.tolist()
    )
    projector = sum(flops_mod.projector_flops(v, t, n) for n in projected)
    return {"vision": encoder, "projector": projector, "total": encoder + projector}


def bench_vision(model, runs: list[list[str]], pixels: torch.Tensor, batch_sizes: list[int],
                 warmup: int = 3, repeats: int = 10) -> list[VisionResult]:
    """Per run (stage-1 specs, [] or ['none'] for the untouched tower) and batch size (the first
    images of `pixels`): median time of encoder + projector, tokens out per image, FLOPs."""
    device = pixels.device
    results = []
    for batch_size in batch_sizes:
        if batch_size > pixels.shape[0]:
            raise SlimVLMError(f"batch size {batch_size} needs {batch_size} images; {pixels.shape[0]} were given")
        batch = pixels[:batch_size]
        reference = None
        for specs in runs:
            adapter, method = vision_stage(model, specs)

            def forward():
                tokens, trace = adapter.encode(batch, method)
                return adapter.project(tokens, keep_cls=method is not None and method.feeds_cls), trace

            with torch.inference_mode():
                tokens, trace = forward()
                latency = median_ms(forward, device, warmup, repeats)
                peak = peak_memory_bytes(forward, device)
            counts = tokens.counts.tolist()
            counted = vision_flops(model, trace, counts)
            result = VisionResult(
                method="+".join(specs) or "none", batch_size=batch_size, tokens_mean=statistics.mean(counts),
                tokens_min=min(counts), tokens_max=max(counts), latency_ms=latency, ms_per_image=latency / batch_size,
                peak_memory_bytes=peak, flops=counted,
            )
            reference = reference or counted["total"]
            result.flops_ratio = counted["total"] / reference
            results.append(result)
    return results


def format_table(results: list[VisionResult]) -> str:
    header = ["batch", "method", "tokens mean", "min", "max", "ms", "ms/image", "GFLOPs", "ratio", "peak MB"]
    rows = [[
        str(r.batch_size), r.method.split(",thresholds=")[0].split(":thresholds=")[0], f"{r.tokens_mean:.1f}",
        str(r.tokens_min), str(r.tokens_max), f"{r.latency_ms:.2f}", f"{r.ms_per_image:.3f}",
        f"{r.flops['total'] / 1e9:.1f}", f"{r.flops_ratio:.3f}",
        "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f}",
    ] for r in results]
    return text_table(header, rows)
