"""DualSpeed on the testbed where tokens are the cost: baseline, NaivePrune and DualSpeed on the same batches,
and a sweep of the pruning ratio p and the slow-mode probability r (issue 27, item 3).

    python -m experiments.dualspeed.testbed --out OUT --samples 500000

Every run starts from the testbed model and fine-tunes its projector and LLM (the vision tower frozen, as
LLaVA's instruction tuning), on the same batches in the same order: a pool of scenes rendered once onto the
device (experiments/scene_pool.py), so that a run's wall-clock is its training steps, not the CPU drawing
scenes. A step is `DualSpeed.loss` on the direct forward (slimvlm/train/spans.py: no host reads), bf16
autocast, fused AdamW. Runs: `baseline` (every step on all 576 tokens), `naive` (every step on DivPrune's
(1 - p) * 576 tokens, no isolator), `dualspeed` (fast steps on the pruned tokens with the mode isolator, slow
steps with probability r on all tokens with self-distillation from the fast mode), at --p/--r, then the sweep
(--sweep-p x --sweep-r). Each run is timed alone, a device synchronisation at both ends, and then scored on
held-out scenes with all tokens and with pruned tokens (its fast mode: pruner + isolator; the pruner alone
for the others), through slimvlm.apply + generate() (slimvlm.bench.evaluate).

`--compile` (every run alike, as the testbed trainer's own --compile): each run's LM layer parts compiled
(slimvlm.train.compile_llm_layers), and before its timer starts one step of each mode it will run, on batches
of another seed, with no optimizer step (the gradients dropped): compiling is not charged to the run, and the
run trains exactly as it would eagerly. Scoring runs them eagerly (eager_llm_layers); a graph per run's token
count is kept across runs, so the limit on a function's compiled versions is raised to fit the sweep.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from experiments.runner import command, common_options, entry
from experiments.scene_pool import render_pool
from experiments.testbed.optimizer import lr_factor
from slimvlm.bench.evaluate import evaluate, from_sample
from slimvlm.bench.timing import synchronize
from slimvlm.models import adapter_for
from slimvlm.models.loading import load_model, resolve_device
from slimvlm.testbed.scenes import make_samples
from slimvlm.testbed.batches import PixelNormalizer
from slimvlm.train import compile_llm_layers, eager_llm_layers
from slimvlm.train.dualspeed import DualSpeed, variant


def runs(args) -> list[tuple[str, dict]]:
    """(name, DualSpeed options) of every run: the three of the paper at --p/--r, then the sweep."""
    def options(name: str, p: float, r: float) -> dict:
        return variant(name, pruner=f"divprune:ratio={round(1 - p, 4)}", r=r, seed=args.seed)

    main = [("baseline", options("baseline", args.p, args.r)), (f"naive p={args.p}", options("naive-pruning", args.p, 0.0)),
            (f"dualspeed p={args.p} r={args.r}", options("dualspeed", args.p, args.r))]
    sweep = [(f"dualspeed p={p} r={r}", options("dualspeed", p, r)) for p in args.sweep_p for r in args.sweep_r
             if (p, r) != (args.p, args.r)]
    return main + sweep


def train_run(name: str, options: dict, base, pool, normalizer, args, device) -> tuple[torch.nn.Module, DualSpeed, dict]:
    model = copy.deepcopy(base).train().requires_grad_(True)  # the base is frozen: it scores and stays
    adapter_for(model).vision.requires_grad_(False)
    dual = DualSpeed(model, **options)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": args.lr}] + ([{"params": dual.parameters(), "lr": args.isolator_lr}] if dual.parameters() else [])
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.0, fused=device.type == "cuda")
    rates = [group["lr"] for group in optimizer.param_groups]
    per_step = args.scenes_per_batch * pool.questions_per_scene
    steps = args.samples // per_step
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if args.compile:
        compile_llm_layers(model)
        warm_compiled(dual, pool, normalizer, args, steps, autocast, optimizer)
    batches = pool.batches(args.scenes_per_batch, seed=args.seed)  # the same batches, in the same order, for every run
    modes = {"fast": 0, "slow": 0}
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for step in range(steps):
        batch = next(batches)
        batch = {**batch, "pixel_values": normalizer(batch.pop("pixels"))}
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate * lr_factor(step, step / steps, args.warmup)
        with autocast:
            loss, info = dual.loss(batch, step, details=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in groups for p in group["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        modes[info["mode"]] += 1
    synchronize(device)
    seconds = time.perf_counter() - started
    record = {"run": name, "options": options, "steps": steps, "samples": steps * per_step, "train_s": round(seconds, 2),
              "samples_per_s": round(steps * per_step / seconds, 1), "fast_steps": modes["fast"], "slow_steps": modes["slow"],
              "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}
    if args.compile:
        eager_llm_layers(model)  # scoring's generate() would recompile the training graphs for its lengths
    model.eval()
    return model, dual, record


def warm_compiled(dual: DualSpeed, pool, normalizer, args, steps: int, autocast, optimizer) -> None:
    """One forward and backward of each mode the run's steps will take, on batches of another seed, the gradients
    dropped with no optimizer step: the compiled parts are built before the timer starts, the training unchanged."""
    batches = pool.batches(args.scenes_per_batch, seed=args.seed + 1)
    first_of_mode = {}
    for step in range(steps):
        first_of_mode.setdefault(dual.step_mode(step), step)
    for step in first_of_mode.values():
        batch = next(batches)
        batch = {**batch, "pixel_values": normalizer(batch.pop("pixels"))}
        with autocast:
            loss, _ = dual.loss(batch, step, details=False)
        loss.backward()
        optimizer.zero_grad(set_to_none=True)


def score(model, dual: DualSpeed, processor, items, batch_size: int) -> dict:
    """Held-out accuracy with all tokens, and with pruned tokens (its fast mode, and the pruner alone)."""
    out = {"full": evaluate(model, processor, items, "none", batch_size=batch_size).accuracy}
    pruner = dual.inference_method(isolator=False)
    out["pruned"] = evaluate(model, processor, items, dual.inference_method(), batch_size=batch_size).accuracy
    if dual.isolator is not None and pruner.stages:
        out["pruner_alone"] = evaluate(model, processor, items, pruner, batch_size=batch_size).accuracy
    return out


def run(args) -> dict:
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    base, processor = load_model(args.model, device, "float32")
    base.eval().requires_grad_(False)
    pool = render_pool(processor, args.scenes, device, seed=args.seed, workers=args.workers)
    normalizer = PixelNormalizer(processor, device)
    items = [from_sample(s) for s in make_samples(args.eval_samples, seed=args.seed, split="test")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"settings": {**{k: v for k, v in vars(args).items() if k != "argv"},
                            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                            "command": command("experiments.dualspeed.testbed", args)},
               "start": {"full": evaluate(base, processor, items, "none", batch_size=args.eval_batch_size).accuracy},
               "runs": []}
    if args.compile:  # a fast-mode graph per pruning ratio and isolator, the slow one, for every run of the sweep
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for name, options in runs(args)[: args.max_runs]:
        model, dual, record = train_run(name, options, base, pool, normalizer, args, device)
        record.update(score(model, dual, processor, items, args.eval_batch_size))
        results["runs"].append(record)
        print(json.dumps({k: record[k] for k in ("run", "train_s", "samples_per_s", "full", "pruned")}), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # after every run: a cut call keeps them
        del model, dual
    results["settings"]["total_s"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def parser() -> argparse.ArgumentParser:
    p = common_options(argparse.ArgumentParser(prog="python -m experiments.dualspeed.testbed", description=__doc__.split("\n\n")[0]),
                       scenes=40_000)
    p.add_argument("--samples", type=int, default=500_000, help="training samples per run")
    p.add_argument("--p", type=float, default=0.9, help="pruning ratio of the fast mode")
    p.add_argument("--r", type=float, default=0.1, help="probability of a slow step")
    p.add_argument("--sweep-p", type=lambda t: [float(x) for x in t.split(",")], default=[0.75, 0.9, 0.95])
    p.add_argument("--sweep-r", type=lambda t: [float(x) for x in t.split(",")], default=[0.05, 0.1, 0.2])
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (the main three first)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--isolator-lr", type=float, default=1e-3)
    p.add_argument("--compile", action="store_true",
                   help="compile every run's LM layer parts, built on one untimed step per mode before its timer")
    return p


def main(argv: list[str] | None = None) -> int:
    return entry(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
