"""Ops dispatched, host reads and host time of one batch-1 prefill, the launches of a static-cache prefill with
CUDA graphs, and ops and reads per eager decode step, per method, beside the untouched model, on the CPU.

A batch-1 prefill on a GPU is paid in kernel launches (one per op) and in host syncs (each read of a device
value waits for the queue to drain): this counts both without a GPU, on a LLaVA-1.5-7B of the real depths
(24 CLIP layers at 336 px: 576 patches; 32 LM layers) but narrow widths, random weights, where a prefill's
time is mostly host time (Python, dispatch): its median over --repeats runs, in ms. "static launches" are the
ops and reads of a static-cache prefill with slimvlm's CUDA graphs as a GPU
runs them: each replay one launch (the function runs on the CPU, its ops uncounted; it must read nothing), of a
prefill on a StaticCache as generate(cache_implementation="static") hands one over. A
decode step's ops and reads are those of generate(10 new tokens) less generate(2), over the 8 steps between.

    PYTHONPATH=src OMP_NUM_THREADS=1 python3 scripts/host_reads.py [--methods none,mustdrop-64] [--where]
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="none,visionzip-64,divprune-64,tome:r=16,fastv,mustdrop-64")
    parser.add_argument("--where", action="store_true", help="list each method's reads by the line that made them")
    parser.add_argument("--repeats", type=int, default=15, help="timed prefills per method (after one warm-up)")
    args = parser.parse_args()
    model = narrow_llava_15_7b()
    inputs = synthetic_inputs(model, 1, 64)
    print(f"{'method':16} {'ops':>6} {'reads':>6} {'host ms':>8} | static launches: {'ops':>6} {'reads':>5} "
          f"| per decode step: {'ops':>7} {'reads':>5}")
    for spec in ["untouched"] + args.methods.split(","):
        handle = None if spec == "untouched" else slimvlm.apply(model, spec)
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)
            with HostReads() as reads:
                model(**inputs, use_cache=True, logits_to_keep=1)
            times = []
            for _ in range(args.repeats):
                begin = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                times.append((time.perf_counter() - begin) * 1000)
            room = inputs["input_ids"].shape[1] + 8
            cache = StaticCache(config=model.config.text_config, max_cache_len=room)
            model(**inputs, use_cache=True, logits_to_keep=1, **{cache_kwarg(model.forward): cache})
            cache = StaticCache(config=model.config.text_config, max_cache_len=room)
            with HostReads() as static, graphs_replayed_as_launches(static):
                model(**inputs, use_cache=True, logits_to_keep=1, **{cache_kwarg(model.forward): cache})
            steps = []
            for new_tokens in (2, 10):
                with HostReads() as counted:
                    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                steps.append(counted)
        step_ops, step_reads = ((b - a) / 8 for a, b in ((steps[0].ops, steps[1].ops), (steps[0].total, steps[1].total)))
        print(f"{spec:16} {reads.ops:6d} {reads.total:6d} {statistics.median(times):8.1f} |"
              f"                  {static.ops:6d} {static.total:5d} |"
              f"                  {step_ops:7.1f} {step_reads:5.2f}")
        if args.where:
            for place, count in reads.where.most_common():
                print(f"{'':16} {count:6d} {place}")
        if handle:
            handle.remove()


if __name__ == "__main__":
    main()
