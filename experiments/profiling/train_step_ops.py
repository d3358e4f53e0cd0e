"""Ops dispatched in one training step of each `slimvlm bench-train` recipe and mode, on the CPU, on a published
shape's real depths (its vision and LM layer counts, LoRA on the same projections) but narrow widths.

A training step on a GPU cannot finish before the host has issued its ops: where the GPU's work per op is small
(few tokens: DualSpeed's fast mode), the host's issue time is the step's floor. This counts the aten ops of a
step (every dispatch, nested ones included, and the top-level ones Python calls) for the untouched recipe,
NaivePrune's fast step and DualSpeed's fast and slow steps, so that two recipes' host work can be compared and
set beside their GPU step times (results/dualspeed_bench_train/).

    PYTHONPATH=src:. OMP_NUM_THREADS=1 python3 -m experiments.profiling.train_step_ops --model llava-next-7b --batch-size 4
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from slimvlm.bench import shapes
from slimvlm.bench.train import RECIPES, _step, make_trainable, training_batch
from slimvlm.train.dualspeed import DualSpeed, variant

NARROW_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=32)
NARROW_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


def narrow_model(name: str) -> torch.nn.Module:
    """The shape's model with its depths, token counts and vocabulary, its widths narrowed."""
    spec = shapes.SHAPES[name]
    narrowed = dict(spec, vision=dict(spec["vision"], **NARROW_VISION), text=dict(spec["text"], **NARROW_TEXT))
    original, shapes.SHAPES[name] = spec, narrowed
    try:
        return shapes.random_model(name, torch.device("cpu"), torch.float32)
    finally:
        shapes.SHAPES[name] = original


def step_ops(dual: DualSpeed, optimizer, batch: dict, step: int) -> tuple[int, int]:
    """(aten ops, top-level aten ops) of one step, after one step of warm-up."""
    no_autocast = torch.autocast("cpu", enabled=False)
    _step(dual, optimizer, batch, step, no_autocast)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(dual, optimizer, batch, step, no_autocast)
    events = [event for event in prof.events() if event.name.startswith("aten::")]
    return len(events), sum(event.cpu_parent is None for event in events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-next-7b", choices=sorted(shapes.SHAPES))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lora", type=int, default=8, help="LoRA rank (the op count does not depend on it)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = narrow_model(args.model)
    model.gradient_checkpointing_enable()
    model.train()
    make_trainable(model, args.lora)
    batch = training_batch(model, args.batch_size, text_tokens=128, answer_tokens=64)
    params = [param for param in model.parameters() if param.requires_grad]
    counts = collections.OrderedDict()
    for recipe in RECIPES:
        dual = DualSpeed(model, **variant(recipe, pruner="divprune:ratio=0.1", r=0.1, isolator_length=4, seed=0))
        optimizer = torch.optim.AdamW([*params, *dual.parameters()], lr=1e-6, foreach=True)
        for mode in ("fast", "slow"):
            step = next((s for s in range(1000) if dual.step_mode(s) == mode), None)
            if step is not None:
                counts[f"{recipe} {mode}"] = step_ops(dual, optimizer, batch, step)
    print(f"{args.model}, batch {args.batch_size}, LoRA on the LM's projections, gradient checkpointing, one step:")
    for name, (ops, top) in counts.items():
        print(f"  {name:20s} {ops:7d} aten ops ({top} top-level)")


if __name__ == "__main__":
    main()
