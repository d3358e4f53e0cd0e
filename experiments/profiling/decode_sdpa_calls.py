"""What each eager decode step hands SDPA, per method, beside the untouched model, on the CPU: the query's and keys'
shapes and strides, the mask (dtype, shape, strides; None lets a GPU take the flash kernel) and is_causal. Two runs
that hand SDPA the same calls pick the same GPU kernels: a decode-time gap between them is elsewhere.

    PYTHONPATH=src:. OMP_NUM_THREADS=1 python3 -m experiments.profiling.decode_sdpa_calls --batch-size 16 \
        --methods none,divprune:budget=64,visionzip-64

A LLaVA-1.5-7B of the real depths and narrow widths (host_reads.narrow_llava_15_7b), synthetic unpadded prompts as
slimvlm bench-generate makes them.
"""

from __future__ import annotations

import argparse
import collections
from unittest import mock

import torch
import torch.nn.functional as F

import slimvlm
from experiments.profiling.host_reads import narrow_llava_15_7b
from slimvlm.bench.run import parse_methods, synthetic_inputs


def decode_calls(model, inputs: dict, specs: list[str] | None, new_tokens: int) -> collections.Counter:
    """The SDPA calls of generate()'s decode steps (one query token), counted by what they hand SDPA."""
    sdpa, calls = F.scaled_dot_product_attention, collections.Counter()

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if q.shape[2] == 1:
            mask = None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape), attn_mask.stride())
            calls[(tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), mask, is_causal)] += 1
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    with torch.inference_mode(), mock.patch.object(F, "scaled_dot_product_attention", recording):
        if specs is None:
            model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        else:
            with slimvlm.apply(model, specs):
                model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="none,divprune:budget=64,visionzip-64")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=3)
    args = parser.parse_args()
    model = narrow_llava_15_7b()
    inputs = synthetic_inputs(model, args.batch_size, 32)
    for name, specs in [("untouched", None)] + [("+".join(s), s) for s in parse_methods(args.methods)]:
        print(f"{name}:")
        for call, count in sorted(decode_calls(model, inputs, specs, args.new_tokens).items(), key=lambda item: -item[1]):
            q, q_stride, k, k_stride, mask, causal = call
            print(f"  {count:3d} x q {q} {q_stride}, k {k} {k_stride}, mask {mask}, is_causal {causal}")


if __name__ == "__main__":
    main()
