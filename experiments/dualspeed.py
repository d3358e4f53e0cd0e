"""The DualSpeed paper's experiment on the testbed: baseline fine-tuning, naive pruning and DualSpeed.

    python -m experiments.dualspeed --model models/tb --out results/dualspeed --device cuda

Three runs start from the same checkpoint and train the same number of steps on the same batches,
in the same order, with the same seeds, learning rate and batch size; they differ only in their
DualSpeed settings (`dualspeed.VARIANTS`, one code path, the one `slimvlm train` uses):

* baseline: every step on all visual tokens, plain cross-entropy (r=1, lam=0, no pruner, no isolator);
* naive-pruning: every step on the pruner's tokens (DivPrune keeping 10%: 58 of 576), no isolator (r=0);
* dualspeed: fast steps on the pruned tokens with the mode isolator, slow steps (probability r)
  on all tokens with self-distillation from the fast mode.

Each run is then scored on held-out (test-split) scenes twice: with all tokens (the untouched
model; DualSpeed's slow mode has no isolator) and with pruned tokens (the pruner alone; for
DualSpeed the pruner + isolator, its fast mode, as the paper infers; the pruner alone is reported
too). Writes results.json and results.md.

Timing: the training batches are built once before any run (scenes drawn and collated; on a GPU
they stay on the device), so the clock sees the training step (forward, backward, optimizer) and
the Trainer's own loop, not data generation, model loading or evaluation. The first `--warmup`
steps of every run (allocator, kernel selection) are outside the timed window; wall time is taken
after a device synchronisation at both ends.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from slimvlm.errors import SlimVLMError
from slimvlm.train.dualspeed import VARIANTS, DualSpeed, dualspeed_trainer, variant
from slimvlm.train.recipe import freeze_vision, training_arguments

RUNS = ("baseline", "naive-pruning", "dualspeed")


class BatchList(torch.utils.data.Dataset):
    """Ready training batches as a Trainer dataset of one 'sample' per batch: give the Trainer
    per_device_train_batch_size=1 and `collate=BatchList.collate`."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index]

    @staticmethod
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if len(items) != 1:
            raise SlimVLMError("BatchList holds whole batches: use per_device_train_batch_size=1")
        return items[0]


def prepare_batches(processor, samples: int, batch_size: int, seed: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """`samples` train-split scenes collated into batches of `batch_size` (the last partial batch
    dropped), moved to `device`."""
    from slimvlm.train.data import SceneCollator, training_scenes

    if samples < batch_size:
        raise SlimVLMError(f"--samples {samples} is less than one batch of {batch_size}")
    scenes = training_scenes(samples, seed)
    collator = SceneCollator(processor)
    batches = []
    for start in range(0, samples - batch_size + 1, batch_size):
        batch = collator(scenes[start : start + batch_size])
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_timer(device: torch.device, warmup: int):
    """A TrainerCallback that times the steps after the first `warmup` ones (and all of them)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.warmup = warmup
            self.start_all = self.start = self.end = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                _sync(device)
                self.start_all = time.perf_counter()
            if state.global_step == self.warmup:
                _sync(device)
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == state.max_steps:
                _sync(device)
                self.end = time.perf_counter()

    return StepTimer()


def train_run(
    name: str, model_spec: str, batches: list, device: torch.device, steps: int, lr: float, seed: int,
    warmup: int, train_vision: bool, out: Path, dual_options: dict[str, Any],
):
    """Load the checkpoint, train one run, return (model, processor, dual, timing and loss record)."""
    from slimvlm.models.loading import load_model

    model, processor = load_model(model_spec, device, "float32")
    if not train_vision:
        freeze_vision(model)
    model.train()
    dual = DualSpeed(model, **variant(name, seed=seed, **dual_options))
    timer = step_timer(device, warmup)
    args = training_arguments(
        out / "trainer", steps, 1, lr, seed, device, dataloader_pin_memory=False, logging_nan_inf_filter=False,
        disable_tqdm=True,
    )
    trainer = dualspeed_trainer(dual, args, BatchList(batches), BatchList.collate, callbacks=[timer])
    trainer.train()
    model.eval()
    if timer.end is None or timer.start is None:
        raise RuntimeError(f"{name}: the step timer did not see the run's steps")
    timed_steps = steps - warmup
    wall = timer.end - timer.start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    modes = [dual.step_mode(step) for step in range(steps)]
    record = {
        "run": name,
        "dualspeed_options": variant(name, seed=seed, **dual_options),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad) + sum(p.numel() for p in dual.parameters()),
        "train_wall_s": wall,
        "train_wall_all_steps_s": timer.end - timer.start_all,
        "timed_steps": timed_steps,
        "steps_per_s": timed_steps / wall,
        "slow_steps": sum(m == "slow" for m in modes),  # baseline (r=1): all; naive pruning (r=0): none
        "fast_steps": sum(m == "fast" for m in modes),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
    }
    if dual.isolator is not None:
        dual.save(out / name)
    return model, processor, dual, record


def evaluate_run(model, processor, dual: DualSpeed, items: list, pruner: str, batch_size: int) -> dict[str, Any]:
    """Held-out accuracy with all tokens and with pruned tokens (+ the isolator where the run has one)."""
    from slimvlm.bench.evaluate import evaluate

    full = evaluate(model, processor, items, "none", batch_size=batch_size, progress=False)
    pruned = evaluate(model, processor, items, dual.inference_method() if dual.isolator is not None else pruner,
                      batch_size=batch_size, progress=False)
    result = {
        "full_acc": full.accuracy,
        "pruned_acc": pruned.accuracy,
        "pruned_method": pruned.method,
        "visual_tokens_full": full.visual_tokens_mean,
        "visual_tokens_pruned": pruned.visual_tokens_mean,
        "pruned_acc_no_isolator": None,
    }
    if dual.isolator is not None:
        result["pruned_acc_no_isolator"] = evaluate(model, processor, items, pruner, batch_size=batch_size, progress=False).accuracy
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = [
        "# DualSpeed on the testbed: baseline vs naive pruning vs DualSpeed",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Device: {payload['device_name']}. Model: `{s['model']}` (fine-tuning starts from this trained checkpoint; "
        f"vision encoder {'trained' if s['train_vision'] else 'frozen, as in LLaVA instruction tuning: projector and LLM train'}). "
        f"{s['steps']} steps x batch {s['batch_size']} per run ({s['distinct_batches']} distinct batches of train-split scenes, "
        f"same order in every run), lr {s['lr']}, seed {s['seed']}; pruner `{s['pruner']}`; DualSpeed r={s['r']}, "
        f"isolator {s['isolator_length']}, lambda {s['lam']}, tau {s['tau']}. "
        f"Eval: {s['eval_samples']} held-out (test-split) scenes, greedy; pruned inference = `{s['pruner']}` "
        "(DualSpeed: + its isolator, the fast mode). Train wall = the last "
        f"{payload['runs'][0]['timed_steps']} steps (the first {s['warmup']} are warm-up), after device synchronisation; "
        "data built beforehand, model loading and evaluation excluded.",
        "",
        "| run | train wall s | speed-up | steps/s | full-token acc % | pruned acc % | full retention % | pruned retention % | pruned acc, no isolator % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in payload["runs"]:
        lines.append(
            f"| {run['run']} | {run['train_wall_s']:.2f} | {run['speedup']:.2f}x | {run['steps_per_s']:.1f} | "
            f"{_pct(run['full_acc'])} | {_pct(run['pruned_acc'])} | {_pct(run['retention_full'])} | "
            f"{_pct(run['retention_pruned'])} | {_pct(run['pruned_acc_no_isolator'])} |"
        )
    lines += ["", "Retention is against the baseline's full-token accuracy.", ""]
    lines += [f"- {q}: {a}" for q, a in payload["answers"].items()]
    return "\n".join(lines) + "\n"


def _answers(runs: dict[str, dict[str, Any]]) -> dict[str, str]:
    base, naive, dual = runs["baseline"], runs["naive-pruning"], runs["dualspeed"]
    drop = base["full_acc"] - naive["full_acc"]
    keeps = dual["retention_full"] is not None and dual["retention_full"] >= 0.99
    fast = dual["speedup"] >= 2.0
    return {
        "naive pruning loses full-token accuracy": (
            f"{'yes' if drop > 0 else 'no'} ({_pct(naive['full_acc'])}% vs baseline {_pct(base['full_acc'])}%, "
            f"{100 * drop:+.1f} points lost)"
        ),
        "DualSpeed keeps >= 99% of baseline at >= 2x training speed": (
            f"{'yes' if keeps and fast else 'no'} (retention {_pct(dual['retention_full'])}% full-token, "
            f"{_pct(dual['retention_pruned'])}% pruned; speed-up {dual['speedup']:.2f}x)"
        ),
    }


def run_experiment(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from slimvlm.bench.evaluate import from_sample
    from slimvlm.models.loading import load_model, resolve_device
    from slimvlm.testbed.scenes import make_samples

    device = resolve_device(args.device)
    for flag in ("steps", "batch_size", "samples", "eval_samples"):
        if getattr(args, flag) < 1:
            raise SlimVLMError(f"--{flag.replace('_', '-')} must be at least 1")
    warmup = min(args.warmup, args.steps // 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    _, processor = load_model(args.model, torch.device("cpu"), "float32")
    if processor is None:
        raise SlimVLMError(f"{args.model} has no processor; the experiment trains on testbed scenes")
    batches = prepare_batches(processor, args.samples, args.batch_size, args.seed, device)
    items = [from_sample(s) for s in make_samples(args.eval_samples, seed=args.eval_seed, split="test")]
    prep_s = time.perf_counter() - started

    dual_options = dict(pruner=args.pruner, r=args.r, isolator_length=args.isolator_length, lam=args.lam, tau=args.tau)
    runs: dict[str, dict[str, Any]] = {}
    for name in args.runs:
        t0 = time.perf_counter()
        model, processor, dual, record = train_run(
            name, args.model, batches, device, args.steps, args.lr, args.seed, warmup, args.train_vision, out, dual_options
        )
        t1 = time.perf_counter()
        record.update(evaluate_run(model, processor, dual, items, args.pruner, args.eval_batch_size))
        record["setup_and_train_s"] = t1 - t0
        record["eval_s"] = time.perf_counter() - t1
        runs[name] = record
        print(f"{name}: {record['train_wall_s']:.2f} s for {record['timed_steps']} timed steps, "
              f"full {_pct(record['full_acc'])}%, pruned {_pct(record['pruned_acc'])}%", flush=True)
        del model, dual
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = runs.get("baseline")
    for record in runs.values():
        record["speedup"] = base["train_wall_s"] / record["train_wall_s"] if base else None
        ok = base is not None and base["full_acc"] > 0
        record["retention_full"] = record["full_acc"] / base["full_acc"] if ok else None
        record["retention_pruned"] = record["pruned_acc"] / base["full_acc"] if ok else None

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    payload = {
        "command": command,
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "settings": {
            "model": args.model, "steps": args.steps, "batch_size": args.batch_size, "samples": args.samples,
            "distinct_batches": len(batches), "lr": args.lr, "seed": args.seed, "warmup": warmup,
            "train_vision": args.train_vision, "eval_samples": args.eval_samples, "eval_seed": args.eval_seed,
            "eval_batch_size": args.eval_batch_size, **dual_options,
            "variants": {name: VARIANTS[name] for name in args.runs},
        },
        "data_prep_s": prep_s,
        "total_s": time.perf_counter() - started,
        "runs": [runs[name] for name in args.runs],
    }
    if set(RUNS) <= set(runs):
        payload["answers"] = _answers(runs)
    else:
        payload["answers"] = {}
    (out / "results.json").write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(format_markdown(payload), encoding="utf-8")
    return payload


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.dualspeed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="testbed", help="'testbed' or a model folder with its processor (the starting checkpoint)")
    p.add_argument("--out", required=True, help="folder for results.json, results.md (and DualSpeed's isolator)")
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=2048, help="distinct train-split scenes (cycled in the same order by every run)")
    p.add_argument("--lr", type=float, default=2e-4, help="as slimvlm train (the testbed was trained at peak 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=10, help="steps of each run left out of the timing")
    p.add_argument("--train-vision", action="store_true", help="train the vision encoder too (default: frozen, as LLaVA SFT)")
    p.add_argument("--pruner", default="divprune:ratio=0.1", help="naive pruning's and DualSpeed's pruner; also the pruned inference")
    p.add_argument("--r", type=float, default=0.1, help="DualSpeed: probability of a slow step")
    p.add_argument("--isolator-length", type=int, default=4)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--eval-samples", type=int, default=400, help="held-out test-split scenes")
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)} (baseline first)")
    p.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.runs = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = [name for name in args.runs if name not in RUNS]
    if unknown or not args.runs:
        print(f"error: --runs takes {', '.join(RUNS)}, not {unknown or 'nothing'}", file=sys.stderr)
        return 2
    command = "python -m experiments.dualspeed " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        payload = run_experiment(args, command)
    except SlimVLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
