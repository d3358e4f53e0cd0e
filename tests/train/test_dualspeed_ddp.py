"""DualSpeed under data parallelism: two CPU processes (gloo) stay in step and end with equal weights.

The same code runs on GPUs with `torchrun --nproc_per_node=N your_train.py` (NCCL backend)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slimvlm.testbed.build import format_prompt, load
from slimvlm.train import DualSpeed, DualSpeedModule


def _batch(processor, image_token_id, rank):
    from conftest import images

    prompts = [format_prompt("what color is the circle ?") + " red", format_prompt("is there a square ?") + " yes"]
    inputs = processor(images=images(2, seed=rank), text=prompts, return_tensors="pt", padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == image_token_id, -100)
    inputs["labels"] = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    return dict(inputs)


def _worker(rank, folder, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model, processor = load(folder)
    model.train()
    dual = DualSpeed(model, pruner="divprune:budget=16", r=0.5, seed=3)
    module = torch.nn.parallel.DistributedDataParallel(DualSpeedModule(dual), find_unused_parameters=True)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    batch = _batch(processor, model.config.image_token_id, rank)  # each rank its own data
    modes = []
    for step in range(4):
        modes.append(dual.step_mode(step))
        loss = module(step, **batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum()
    gathered = [torch.zeros_like(checksum) for _ in range(2)]
    dist.all_gather(gathered, checksum)
    results[rank] = (modes, [float(g) for g in gathered], float(dual.isolator.detach().abs().sum()))
    dist.destroy_process_group()


def test_two_processes_stay_in_step(tiny_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(str(tiny_dir), port, results), nprocs=2, join=True)
    (modes0, sums0, iso0), (modes1, sums1, iso1) = results[0], results[1]
    assert modes0 == modes1 and set(modes0) == {"fast", "slow"}  # same mode per step on both ranks
    assert sums0 == sums1 and sums0[0] == sums0[1]  # identical weights after 4 steps on different data
    assert iso0 == iso1
