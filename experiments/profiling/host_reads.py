"""Ops dispatched and host reads of one batch-1 prefill and of each eager decode step, per method, beside the
untouched model, on the CPU: eagerly, and with slimvlm's CUDA graphs as a GPU launches them.

A batch-1 prefill on a GPU is paid in kernel launches (one per op) and in host syncs (each read of a device
value waits for the queue to drain): this counts both without a GPU, on a LLaVA-1.5-7B of the real depths
(24 CLIP layers at 336 px: 576 patches; 32 LM layers) but narrow widths, random weights, where a prefill's
time is mostly host time (Python, dispatch): its median over --repeats runs without graphs, in ms. "With CUDA
graphs": each replay counts as one launch (the function runs on the CPU, its ops uncounted; it must read
nothing), for a prefill on the dynamic cache (generate()'s default), on a StaticCache (as
generate(cache_implementation="static") hands one over), and per eager decode step (generate(10 new tokens)
less generate(2), over the 8 steps between).

    PYTHONPATH=src OMP_NUM_THREADS=1 python3 -m experiments.profiling.host_reads [--methods none,mustdrop-llava7b-64] [--where] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, StaticCache

import slimvlm
from slimvlm.bench.run import synthetic_inputs
from slimvlm.device_reads import HostReads, graphs_replayed_as_launches
from slimvlm.models.compat import cache_kwarg


def narrow_llava_15_7b() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4,
                                       image_size=336, patch_size=14, projection_dim=64),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=32064),
        image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config).eval()


def counted(run, graphs: bool) -> HostReads:
    """The ops and reads of run(), slimvlm's CUDA graphs replayed as a GPU launches them where `graphs`."""
    with torch.inference_mode(), HostReads() as reads, (graphs_replayed_as_launches(reads) if graphs else nullcontext()):
        run()
    return reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="none,visionzip-64,divprune-64,tome:r=16,fastv,mustdrop-llava7b-64")
    parser.add_argument("--where", action="store_true", help="list each method's reads by the line that made them")
    parser.add_argument("--repeats", type=int, default=15, help="timed prefills per method (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    model = narrow_llava_15_7b()
    inputs = synthetic_inputs(model, args.batch_size, 64)
    cache_name = cache_kwarg(model.forward)

    def prefill(cache: StaticCache | None = None) -> None:
        model(**inputs, use_cache=True, logits_to_keep=1, **({} if cache is None else {cache_name: cache}))

    def static_prefill():  # generate(cache_implementation="static") hands over a StaticCache made before
        cache = StaticCache(config=model.config.text_config, max_cache_len=inputs["input_ids"].shape[1] + 8)
        return lambda: prefill(cache)

    def generate(new_tokens: int) -> None:
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    print(f"{'':16} {'prefill, no graphs':>22} | {'with CUDA graphs: prefill, dynamic':>34} {'static':>12} "
          f"{'per decode step':>18}")
    print(f"{'method':16} {'ops':>6} {'reads':>6} {'host ms':>8} | {'ops':>28} {'reads':>5} {'ops':>6} {'reads':>5} "
          f"{'ops':>12} {'reads':>5}")
    for spec in ["untouched"] + args.methods.split(","):
        handle = None if spec == "untouched" else slimvlm.apply(model, spec)
        for graphs in (False, True):  # warm-up: captures, first-use allocations
            counted(prefill, graphs), counted(static_prefill(), graphs)
        reads = counted(prefill, graphs=False)
        times = []
        with torch.inference_mode():
            for _ in range(args.repeats):
                begin = time.perf_counter()
                prefill()
                times.append((time.perf_counter() - begin) * 1000)
        dynamic, static = counted(prefill, graphs=True), counted(static_prefill(), graphs=True)
        short, long = (counted(lambda: generate(new_tokens), graphs=True) for new_tokens in (2, 10))
        step_ops, step_reads = (long.ops - short.ops) / 8, (long.total - short.total) / 8
        print(f"{spec:16} {reads.ops:6d} {reads.total:6d} {statistics.median(times):8.1f} | {dynamic.ops:28d} "
              f"{dynamic.total:5d} {static.ops:6d} {static.total:5d} {step_ops:12.1f} {step_reads:5.2f}")
        if args.where:
            for place, count in reads.where.most_common():
                print(f"{'':16} {count:6d} {place}")
        if handle:
            handle.remove()


if __name__ == "__main__":
    main()
