"""Ops one batch-1 prefill dispatches (each a kernel launch on a GPU), per method beside the untouched model, and
the source lines where a method adds them: Qwen2.5-VL's tiny test config (tests/conftest.py) on a 16-frame 644-px
video (video_grid_thw 8 x 46 x 46: 16,928 patches, 4232 tokens), the grid of `bench-generate --video-frames 16`.

    PYTHONPATH=src OMP_NUM_THREADS=2 python3 -m experiments.profiling.prefill_op_sites --methods visionzip-64,divprune:budget=640
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import slimvlm

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from conftest import qwen_batch, qwen_model  # noqa: E402  (the tests' tiny configs of the real classes)


class OpSites(TorchDispatchMode):
    """Counts every op dispatched inside the block by the innermost slimvlm or modeling_* line that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for frame in reversed(traceback.extract_stack(limit=30)):
            if "slimvlm/" in frame.filename or "/modeling_" in frame.filename:
                self.sites[f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"] += 1
                break
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="visionzip-64,divprune:budget=640,fastv")
    parser.add_argument("--top", type=int, default=8, help="lines listed per method")
    args = parser.parse_args()
    model = qwen_model("qwen2_5_vl")
    inputs = qwen_batch(model.config, grids=[(8, 46, 46)], kind="video")
    counted = {}
    for spec in ["untouched"] + args.methods.split(","):
        handle = None if spec == "untouched" else slimvlm.apply(model, spec)
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up
            with OpSites() as ops:
                model(**inputs, use_cache=True, logits_to_keep=1)
        counted[spec] = ops.sites
        if handle:
            handle.remove()
    base = counted["untouched"]
    print(f"untouched: {sum(base.values())} ops")
    for spec, sites in list(counted.items())[1:]:
        added = Counter(sites)
        added.subtract(base)
        print(f"{spec}: {sum(sites.values())} ops ({sum(added.values()):+d})")
        for site, count in sorted(added.items(), key=lambda item: -abs(item[1]))[: args.top]:
            print(f"  {count:+6d} {site}")


if __name__ == "__main__":
    main()
