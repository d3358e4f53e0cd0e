"""The benchmark: per method, visual tokens, FLOPs per stage, KV-cache bytes, latency and memory."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch

from ..api import apply
from ..models import adapter_for
from ..registry import check_runs
from . import flops as flops_mod
from .table import text_table
from .timing import median_ms, peak_memory_bytes


@dataclass
class BenchResult:
    method: str
    options: dict
    visual_tokens_mean: float
    visual_tokens_min: int
    visual_tokens_max: int
    prefill_flops: int
    flops_ratio: float
    kv_bytes_per_image: float
    latency_ms: float
    decode_ms_per_token: float | None
    peak_memory_bytes: int | None
    flops: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def parse_methods(text: str) -> list[list[str]]:
    """'none,tome:r=8,fastv:k=2,ratio=0.5,tome:r=4+fastv' -> [['none'], ['tome:r=8'],
    ['fastv:k=2,ratio=0.5'], ['tome:r=4', 'fastv']]: a bare key=value continues the previous
    method's options; '+' composes methods of different stages into one run."""
    runs: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" in part and ":" not in part and runs:
            runs[-1] += ("," if ":" in runs[-1] else ":") + part  # a preset's first option follows ':'
        else:
            runs.append(part)
    return [run.split("+") for run in runs]


def synthetic_inputs(model, batch_size: int, text_tokens: int, seed: int = 0, video_frames: int = 0) -> dict:
    """A batch of prompts of `text_tokens` random text tokens around one image placeholder span (a video's of
    `video_frames` frames, where given), with random pixels (and what the family's processor adds, e.g. Qwen's
    mm_token_type_ids): enough for FLOPs, memory and latency, which do not depend on content."""
    config = model.config
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(seed)
    low = 5 if config.text_config.vocab_size > 10 else 0
    text = torch.randint(low, config.text_config.vocab_size, (batch_size, text_tokens), generator=generator)
    for placeholder in (config.image_token_id, getattr(config, "video_token_id", None)):
        text[text == placeholder] = low
    if video_frames:
        images, span = adapter.synthetic_videos(batch_size, video_frames, generator)
    else:
        images, span = adapter.synthetic_images(batch_size, generator)
    before = min(5, text_tokens)
    image = torch.tensor(adapter.synthetic_span(span, video_frames)).expand(batch_size, -1)
    input_ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)
    device, dtype = model.device, model.dtype
    tensors = {**images, **adapter.text_inputs(input_ids)}
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        **{name: value.to(device, dtype) if value.is_floating_point() else value.to(device) for name, value in tensors.items()},
    }


def bench_method(model, specs: list[str], inputs: dict, new_tokens: int, warmup: int, repeats: int) -> BenchResult:
    device = model.device
    handle = apply(model, specs)
    try:
        with torch.inference_mode():
            prefill = lambda: model(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731
            prefill()
            stats = handle.stats
            counted = flops_mod.count(model.config, stats)
            latency = median_ms(prefill, device, warmup, repeats)
            peak = peak_memory_bytes(prefill, device)
            decode = None
            if new_tokens > 0:
                def generate(n: int):
                    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

                first = median_ms(lambda: generate(1), device, warmup, repeats)
                longer = median_ms(lambda: generate(1 + new_tokens), device, warmup, repeats)
                decode = (longer - first) / new_tokens
    finally:
        handle.remove()
    bytes_per_value = torch.finfo(model.dtype).bits // 8
    visual_entries = [sum(layers) for layers in stats.kv_visual_entries]
    images = len(stats.visual_tokens)
    tokens = stats.visual_tokens
    name = "+".join(specs)
    options = {m.name: m.options() for m in handle.methods}
    return BenchResult(
        method=name,
        options=options,
        visual_tokens_mean=statistics.mean(tokens),
        visual_tokens_min=min(tokens),
        visual_tokens_max=max(tokens),
        prefill_flops=counted.prefill,
        flops_ratio=1.0,
        kv_bytes_per_image=flops_mod.kv_bytes(model.config, sum(visual_entries), bytes_per_value) / images,
        latency_ms=latency,
        decode_ms_per_token=decode,
        peak_memory_bytes=peak,
        flops={
            "vision": counted.vision,
            "projector": counted.projector,
            "fusion": counted.fusion,
            "llm_prefill": counted.llm_prefill,
            "decode_per_token": counted.decode_per_token,
        },
    )


def run_bench(
    model,
    methods: list[list[str]],
    batch_size: int = 1,
    text_tokens: int = 64,
    new_tokens: int = 8,
    warmup: int = 2,
    repeats: int = 5,
    inputs: dict | None = None,
    progress: bool = True,
    video_frames: int = 0,
) -> list[BenchResult]:
    """Benchmark each method run (a list of specs composed together) on the same batch (of synthetic_inputs
    unless given: images, or videos of `video_frames` frames); the untouched model ('none') is always measured
    first, as the reference of flops_ratio."""
    from tqdm.auto import tqdm

    check_runs(model, methods)  # refuse a bad spec before spending time on the others
    if ["none"] not in methods:
        methods = [["none"]] + methods
    else:
        methods = [["none"]] + [m for m in methods if m != ["none"]]
    inputs = inputs or synthetic_inputs(model, batch_size, text_tokens, video_frames=video_frames)
    results = []
    for specs in tqdm(methods, desc="bench", disable=not progress):
        results.append(bench_method(model, specs, inputs, new_tokens, warmup, repeats))
    reference = results[0].prefill_flops
    for result in results:
        result.flops_ratio = result.prefill_flops / reference
    return results


def format_table(results: list[BenchResult]) -> str:
    header = ["method", "tokens mean", "min", "max", "prefill TFLOPs", "ratio", "KV MB/img", "prefill ms", "decode ms/tok", "peak MB"]
    rows = []
    for r in results:
        rows.append([
            r.method,
            f"{r.visual_tokens_mean:.1f}",
            str(r.visual_tokens_min),
            str(r.visual_tokens_max),
            f"{r.prefill_flops / 1e12:.4f}",
            f"{r.flops_ratio:.3f}",
            f"{r.kv_bytes_per_image / 2**20:.2f}",
            f"{r.latency_ms:.1f}",
            "-" if r.decode_ms_per_token is None else f"{r.decode_ms_per_token:.2f}",
            "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f}",
        ])
    return text_table(header, rows)
