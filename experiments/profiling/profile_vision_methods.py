"""Where the time of a stage-1 method goes: the vision tower + projector (what `slimvlm bench-vision`
times) at batch 1 per method, timed, then profiled for one forward each.

    PYTHONPATH=src python3 -m experiments.profiling.profile_vision_methods --device cuda            # H100, ~1 min
    PYTHONPATH=src python3 -m experiments.profiling.profile_vision_methods --device cpu --small     # smoke run

CLIP ViT-L/14-336 of LLaVA-1.5-7B (bench/shapes.py), random weights, bf16 on CUDA. The LLM is never
run here, so the model is built with one LLM layer (the projector keeps its shape); a dymu spec
without thresholds= is calibrated here as bench-vision does it (bench.vision.calibrate_specs).
Per method it prints the median of --repeats CUDA-event timings after --warmup, the top ops by
self device time and by self CPU time, and counts per forward: aten ops (all / top-level), host
syncs (aten::_local_scalar_dense = item()/bool()/int(), cudaStreamSynchronize, Memcpy DtoH,
nonzero) and kernel launches (the launch overhead that dominates batch 1), and how many different
per-layer token counts the timed calls ran with: torch picks cuDNN SDPA on Hopper, which builds a
graph (~50-70 ms) for every new sequence length, so a count that changes between calls (DToMe's
threshold merging can flip on bf16 noise, e.g. from scatter_add_'s CUDA atomics) costs a rebuild.
The encoder runs methods with `varying_lengths` (DToMe, MustDrop's merge) off cuDNN for that
reason (results/README.md); --sdpa restricts the other methods' attention to one backend, and
--deterministic removes the atomics' noise, to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import warnings
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from slimvlm.bench.run import parse_methods
from slimvlm.bench.shapes import SHAPES
from slimvlm.bench.timing import median_ms
from slimvlm.bench.vision import calibrate_specs, scene_pixels, vision_stage

# a CLIP tower of the ViT-L/336 token count (576 patches, 24 layers) but narrow, for a CPU
SMALL_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=24, num_attention_heads=4,
                    image_size=336, patch_size=14, projection_dim=256, hidden_act="quick_gelu")
SMALL_TEXT = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
SYNC_EVENTS = ("aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize",
               "cudaEventSynchronize")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def build_model(device: torch.device, dtype: torch.dtype, small: bool):
    """LLaVA-1.5-7B's vision tower and projector with random weights; the LLM cut to one layer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    spec = SHAPES["llava-1.5-7b"]
    vision = SMALL_VISION if small else spec["vision"]
    text = {**spec["text"], **(SMALL_TEXT if small else {}), "num_hidden_layers": 1}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text), image_token_id=spec["image_token_id"],
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def forward_fn(model, specs: list[str], pixels: torch.Tensor, traces: list):
    """The forward bench-vision times (adapter.encode + adapter.project); each call's layer trace
    (tokens into every layer, kept as tensors: no sync) is appended to `traces`."""
    adapter, method = vision_stage(model, specs)

    def forward():
        tokens, trace = adapter.encode(pixels, method)
        traces.append(trace)
        return adapter.project(tokens, keep_cls=method is not None and method.feeds_cls), trace

    return forward


def shape_report(traces: list) -> str:
    """How many different per-layer widths (max tokens over the batch) the calls ran with: every
    new width is a new attention shape, which the cuDNN SDPA backend builds a graph for."""
    widths = [tuple(int(c.max()) for c in trace) for trace in traces]
    distinct = sorted(set(widths))
    varied = [f"L{i}:{min(w[i] for w in distinct)}-{max(w[i] for w in distinct)}"
              for i in range(len(distinct[0])) if len({w[i] for w in distinct}) > 1]
    return f"{len(distinct)} distinct per-layer widths over {len(widths)} calls" + (f", varying {' '.join(varied)}" if varied else "")


def device_time(event) -> float:
    """Self device (CUDA) time in us, across torch versions."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def op_counts(events) -> dict[str, int]:
    """Per forward: aten ops (all, and those not called from another aten op), syncs, launches."""
    names = Counter(e.name for e in events)
    aten = [e for e in events if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    counts = {"aten": len(aten), "aten_top": len(top)}
    counts |= {name: names[name] for name in SYNC_EVENTS if names[name]}
    counts["memcpy_DtoH"] = sum(n for name, n in names.items() if "Memcpy DtoH" in name)
    counts["launches"] = sum(names[name] for name in LAUNCH_EVENTS)
    return counts


def print_top(averages, key, title: str, top: int, cuda: bool) -> None:
    rows = sorted(averages, key=key, reverse=True)[:top]
    print(f"  top {top} by {title}:  {'calls':>6} {'selfCPU ms':>10} {'CPU ms':>8}" + (f" {'selfCUDA ms':>11}" if cuda else ""))
    for e in rows:
        line = f"    {e.key[:48]:<48} {e.count:>6} {e.self_cpu_time_total / 1e3:>10.2f} {e.cpu_time_total / 1e3:>8.2f}"
        print(line + (f" {device_time(e) / 1e3:>11.2f}" if cuda else ""))


def profile_once(forward, cuda: bool, top: int) -> None:
    warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        forward()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    print("  per forward: " + ", ".join(f"{k}={v}" for k, v in op_counts(events).items()))
    averages = prof.key_averages()
    if cuda:
        print_top(averages, device_time, "self CUDA", top, cuda)
    print_top(averages, lambda e: e.self_cpu_time_total, "self CPU", top, cuda)


def run(specs: list[str], model, pixels, device, args) -> None:
    traces: list = []
    forward = forward_fn(model, specs, pixels, traces)
    with torch.inference_mode():
        tokens, trace = forward()
        begin = time.perf_counter()
        ms = median_ms(forward, device, args.warmup, args.repeats)
    label = "+".join(specs).split(",thresholds=")[0].split(":thresholds=")[0] or "none"
    layers = [int(c.max()) for c in trace]
    print(f"== {label}: batch {pixels.shape[0]}, median {ms:.2f} ms of {args.repeats} "
          f"({time.perf_counter() - begin:.1f} s with warm-up), tokens out {tokens.counts.tolist()}")
    print(f"  tokens into each layer (max over the batch, first call): {layers}")
    print(f"  {shape_report(traces)}")
    profile_once(forward, device.type == "cuda", args.top)


def attention_backend(name: str):
    """A context restricting SDPA to one backend ('default': torch's own choice)."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([backends[name], SDPBackend.MATH])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a narrow CLIP (hidden 256) of the same token count, for a CPU")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--methods", default="none,tome:r=16,dymu-mid:vtu=false")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--sdpa", default="default", choices=["default", "cudnn", "efficient", "flash", "math"],
                        help="restrict SDPA to this backend (plus math as a fallback)")
    parser.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms (warn only)")
    args = parser.parse_args(argv)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    started = time.perf_counter()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = build_model(device, dtype, args.small)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {dtype}, {'small' if args.small else 'ViT-L/14-336'}, "
          f"sdpa {args.sdpa}{', deterministic' if args.deterministic else ''}, built in {time.perf_counter() - started:.1f} s")
    with tempfile.TemporaryDirectory() as folder, attention_backend(args.sdpa):
        runs, made = calibrate_specs(model, parse_methods(args.methods), args.calibration_images, folder)
        for entry in made:
            print(f"calibrated {entry['spec']}: thresholds {[round(t, 3) for t in entry['thresholds']]}")
        pixels = scene_pixels(model, args.batch_size)
        for specs in runs:
            run(specs, model, pixels, device, args)
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
