"""One LLaVA-Mini training step on the testbed, taken apart: is a step held by the host or by the
data? (results/README.md, LLaVA-Mini "Training speed": the GPU sat at 20-70% while training.)

    PYTHONPATH=src python3 -m experiments.profiling.profile_llava_mini_step --device cuda --batch-size 64 --workers 14
    PYTHONPATH=src python3 -m experiments.profiling.profile_llava_mini_step --device cuda --batch-size 64 --clip-frames 4
    PYTHONPATH=src python3 -m experiments.profiling.profile_llava_mini_step --device cpu --batch-size 4 --steps 2 --workers 2

Prints, for the experiment's setting (modules + projector + LLM trained, tower frozen, bf16
autocast on CUDA): the host reads of device values in one forward + backward (slimvlm.device_reads.HostReads:
each a device sync on a GPU; the optimizer's step counters live on the CPU and are left out) by place in
slimvlm or transformers, the top ops by self CPU time of a whole step; the median step time with the
batch already on the device (model, method and optimizer only); and the DataLoader alone (workers
drawing and collating batches as the experiment does) in batches per second. A step slower than
the loader's batches is the host's doing, not the data's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from slimvlm.device_reads import HostReads
from slimvlm.methods.llava_mini import LlavaMini
from slimvlm.models.loading import load_model, resolve_device
from slimvlm.train.data import ClipDataset, SceneCollator, SceneDataset
from slimvlm.train.llava_mini import LlavaMiniModule

def dataset(args, length: int):
    return ClipDataset(length, frames=args.clip_frames) if args.clip_frames else SceneDataset(length)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--budget", type=int, default=1)
    p.add_argument("--clip-frames", type=int, default=0, help="batches of clips of this many frames (0: scenes)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--workers", type=int, default=14)
    args = p.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    model, processor = load_model("testbed", device, "float32")
    model.train()
    for param in model.model.vision_tower.parameters():
        param.requires_grad_(False)
    module = LlavaMiniModule(LlavaMini(budget=args.budget, layers=4), model)
    optimizer = torch.optim.AdamW([q for q in module.parameters() if q.requires_grad], lr=1e-5)
    collator = SceneCollator(processor, normalize_on_device=True)
    data = dataset(args, args.batch_size)
    batch = collator.on_device({k: v.to(device) for k, v in collator([data[i] for i in range(len(data))]).items()})

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = module(**batch)
        loss.backward()

    def step() -> None:
        forward_backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    with HostReads() as reads:
        forward_backward()
    optimizer.zero_grad(set_to_none=True)
    print(f"host reads in one forward + backward: {reads.total}")
    for place, count in reads.where.most_common():
        print(f"  {count:4d}  {place}")
    times = []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"step, batch on the device: median {1000 * median:.1f} ms ({1 / median:.1f} steps/s) over {args.steps}")
    loader = torch.utils.data.DataLoader(dataset(args, args.batch_size * (args.steps + 2)), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=collator, pin_memory=cuda)
    batches = iter(loader)
    next(batches)  # workers started
    start = time.perf_counter()
    count = sum(1 for _ in batches)
    seconds = time.perf_counter() - start
    print(f"DataLoader alone, {args.workers} workers: {count / seconds:.1f} batches/s ({count} batches in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
