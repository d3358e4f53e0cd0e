"""Host time per eager decode step, untouched model beside slimvlm, on a tiny random LLaVA on the CPU, where
a step is host time (Python, dispatch): what batch-1 GPU decode is bound by. Medians of 7 generate() calls.

    PYTHONPATH=src python3 -m experiments.profiling.decode_host_time [--layers 4] [--methods none,fastv]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import slimvlm
from slimvlm.bench.run import synthetic_inputs


def tiny_model(layers: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=28, patch_size=14),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=128),
        image_token_id=100, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config).eval()


def median_ms(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--methods", default="none,fastv")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    model = tiny_model(args.layers)
    inputs = synthetic_inputs(model, 1, 16)
    steps = args.new_tokens

    def generate(count: int):
        return model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False)

    with torch.inference_mode():
        for spec in ["untouched"] + args.methods.split(","):
            handle = None if spec == "untouched" else slimvlm.apply(model, spec)
            generate(steps)
            generate(1)  # warm-up
            total, first = median_ms(lambda: generate(steps)), median_ms(lambda: generate(1))
            print(f"{spec:24} TTFT {first:7.2f} ms   decode {(total - first) / (steps - 1):6.3f} ms/step")
            if handle is not None:
                handle.remove()


if __name__ == "__main__":
    main()
