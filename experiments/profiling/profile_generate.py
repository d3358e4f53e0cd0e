"""Where a prefill and a decode step spend their time, per method, beside the untouched model (batch 1 unless
--batch-size says otherwise: issue 31's eager batch-16 decode, where `none` and DivPrune were slower).

For each method: the prefill's median time (CUDA events), then torch.profiler over one prefill and
over the decode steps of one generate() call: kernel launches, host syncs, GPU busy time, and the
ops with the most host time. Launch-bound batch-1 inference is paid in launches and host time.

    PYTHONPATH=src python3 -m experiments.profiling.profile_generate --device cuda [--methods none,visionzip-64] [--batch-size 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import shutil
from pathlib import Path

import torch

import slimvlm
from slimvlm.bench.run import synthetic_inputs
from slimvlm.bench.timing import median_ms
from slimvlm.models.loading import load_model

SYNCS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def profile(fn) -> tuple[dict, str]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in events if e.key in SYNCS)
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    table = events.table(sort_by="self_cpu_time_total", row_limit=14)
    return {"launches": launches, "syncs": syncs, "gpu_ms": gpu_us / 1000}, table


@contextlib.contextmanager
def labelled_steps(model):
    """Label the prefill's steps (vision, projection, rebuild, LLM, statistics, logits) in the trace."""
    from slimvlm.models.llava import LlavaAdapter
    from slimvlm.runtime import core, prefill
    from slimvlm.runtime.outputs import Outputs

    targets = [(LlavaAdapter, "encode"), (LlavaAdapter, "project"), (LlavaAdapter, "run_llm"), (core, "rebuild"),
               (core, "recorded"), (Outputs, "from_hidden"), (core, "refuse_unsupported"),
               (prefill, "tokens_per_layer"), (type(model.model.vision_tower), "forward"),
               (type(model.model.language_model), "forward")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets]
    for owner, name, original in saved:
        def labelled(*args, _original=original, _name=name, **kwargs):
            with torch.profiler.record_function(f"step:{_name}"):
                return _original(*args, **kwargs)
        setattr(owner, name, labelled)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def trace(fn, path: Path) -> None:
    """A chrome trace of fn(), gzipped."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    raw = path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shape:llava-1.5-7b")
    parser.add_argument("--methods", default="none,visionzip-64,divprune-64,tome:r=16,llava-mini:budget=1")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for the full profiler tables")
    parser.add_argument("--trace", default=None, help="folder for gzipped chrome traces of one prefill per method")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, _ = load_model(args.model, device, args.dtype)
    inputs = synthetic_inputs(model, args.batch_size, 64)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in ["untouched"] + args.methods.split(","):
        handle = None if spec == "untouched" else slimvlm.apply(model, spec)
        with torch.inference_mode():
            prefill = lambda: model(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731
            generate = lambda n: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
            ms = median_ms(prefill, device, 3, 10)
            pre, pre_table = profile(prefill)
            generate(args.steps + 1)
            one, _ = profile(lambda: generate(1))
            many, decode_table = profile(lambda: generate(args.steps + 1))
            if args.trace:
                Path(args.trace).mkdir(parents=True, exist_ok=True)
                with labelled_steps(model):
                    prefill()
                    trace(prefill, Path(args.trace) / f"prefill_{spec.replace(':', '_')}.json.gz")
        step = {k: (many[k] - one[k]) / args.steps for k in many}
        rows.append((spec, ms, pre, step))
        if out:
            (out / f"prefill_{spec.replace(':', '_')}.txt").write_text(pre_table)
            (out / f"decode_{spec.replace(':', '_')}.txt").write_text(decode_table)
        if handle:
            handle.remove()
    print(f"{'method':24} {'prefill ms':>10} {'launches':>9} {'syncs':>6} {'gpu ms':>7} | per decode step: {'launches':>9} {'syncs':>6} {'gpu ms':>7}")
    for spec, ms, pre, step in rows:
        print(f"{spec:24} {ms:10.2f} {pre['launches']:9d} {pre['syncs']:6d} {pre['gpu_ms']:7.2f} |"
              f"                  {step['launches']:9.1f} {step['syncs']:6.1f} {step['gpu_ms']:7.2f}")


if __name__ == "__main__":
    main()
