"""The training loop: steps until the wall-clock budget is spent, a log line every ``--log-every``
steps, a held-out evaluation every ``--eval-every`` steps.

Budget: training stops when the progress fraction ``f = elapsed training time / time available``
(or ``step / --steps`` if that is larger) reaches 1. The time available is ``--minutes`` from the
start of :func:`~.train.train` minus a reserve for the final evaluation and saving (2x the measured
time of the step-0 evaluation + 5 s), so the whole run, workers' start-up and final evaluation
included, takes about ``--minutes``.

``--compile`` compiles the training loss function (vision tower, projector, decoder, heads, forward
and backward) with ``torch.compile``; the model object itself stays eager, so evaluation's
``generate`` never runs compiled code. Batches have one shape (a fixed number of scenes, always; a
fixed padded width under ``--compile``), so it compiles once (three times with token dropout: three
span lengths). If compilation fails, the run goes on eagerly (noted in the log, card and eval.json).

The log also records the teacher-forced accuracy of the first answer token on the training batches,
per question type (``train_acc_per_type``), so learning shows before any evaluation.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from slimvlm.testbed import scenes
from slimvlm.testbed.batches import PixelNormalizer

from .config import TrainConfig
from .curriculum import curriculum_cap
from .losses import AUX_WEIGHT, AuxHeads, forward_losses
from .optimizer import lr_factor


@dataclass
class Budget:
    """The progress fraction that drives the schedule and ends training."""

    start: float  # time.perf_counter() when training began
    span: float  # seconds available for training
    steps: int | None  # --steps, if given

    def progress(self, now: float, step: int) -> float:
        frac = (now - self.start) / self.span
        if self.steps is not None:
            frac = max(frac, step / self.steps)
        return frac


@dataclass
class LoopResult:
    steps: int
    train_s: float
    complexity_cap: float  # the curriculum's cap at the last step
    compile_error: str | None
    first_step_s: float | None  # the first step's time under --compile, compilation included


class IntervalStats:
    """What one log interval adds up. Losses and per-type hits stay on the device, so a log line
    costs one device sync."""

    def __init__(self, device: torch.device, now: float) -> None:
        self.losses = torch.zeros(3, device=device)  # loss, lm loss, aux loss
        self.type_hits = torch.zeros(len(scenes.QUESTION_TYPES), 2, device=device)  # (correct, asked) per type
        self.reset(now, 0)

    def reset(self, now: float, step: int) -> None:
        self.losses.zero_()
        self.type_hits.zero_()
        self.steps = 0
        self.wait_s = 0.0
        self.complexity_sum, self.scenes = 0.0, 0
        self.since_t, self.since_step = now, step

    def summary(self, now: float, step: int, lr: float, cap: float, batch_size: int) -> dict[str, Any]:
        mean = (self.losses / self.steps).tolist()
        hits = self.type_hits.tolist()
        elapsed = max(now - self.since_t, 1e-9)
        return {
            "loss": mean[0],
            "lm_loss": mean[1],
            "aux_loss": mean[2],
            "lr": lr,
            "samples": step * batch_size,
            "samples_per_s": round((step - self.since_step) * batch_size / elapsed, 1),
            "data_wait_frac": round(self.wait_s / elapsed, 3),
            "complexity_cap": round(cap, 4),
            "scene_complexity": round(self.complexity_sum / max(self.scenes, 1), 4),
            # teacher-forced first-answer-token accuracy on this span's training batches (curriculum scenes)
            "train_acc": round(sum(h[0] for h in hits) / max(sum(h[1] for h in hits), 1), 4),
            "train_acc_per_type": {t: round(h[0] / h[1], 3) for t, h in zip(scenes.QUESTION_TYPES, hits) if h[1]},
        }


def train_steps(
    config: TrainConfig,
    model: torch.nn.Module,
    head: AuxHeads,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[dict[str, torch.Tensor]],
    processor,
    *,
    evaluate: Callable[[], dict[str, Any]],
    log: Callable[[dict[str, Any]], None],
    t0: float,
    reserve_s: float,
    prior_steps: int,
    curriculum_offset: int,
) -> LoopResult:
    """Train until the budget is spent (at least one step). ``evaluate`` scores the held-out set;
    ``log`` writes one train_log.jsonl record; ``t0`` is when the run started."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    warmup_steps = config.resolved_warmup()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    normalizer = PixelNormalizer(processor, device)
    # --compile compiles this training-loss function only: `model` itself stays uncompiled, so
    # evaluate()'s model.generate never runs compiled code. Batches have one shape (fixed scene
    # count, padded width), hence dynamic=False: a single compilation.
    loss_fn = torch.compile(forward_losses, dynamic=False) if config.compile else forward_losses
    compile_error: str | None = None

    t_train = time.perf_counter()
    budget = Budget(t_train, max(t0 + config.minutes * 60.0 - reserve_s - t_train, 1e-6), config.steps)
    stats = IntervalStats(device, t_train)
    cap = curriculum_cap(curriculum_offset, config.curriculum_steps)
    first_step_s: float | None = None
    step = 0
    last_eval: dict[str, Any] | None = None
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, unit="step", dynamic_ncols=True, desc=f"train {config.size}")

    def forward_backward(fn, batch, pixel_values):
        with amp:
            lm_loss, aux_loss, correct = fn(model, head, batch, pixel_values)
            loss = lm_loss + AUX_WEIGHT * aux_loss
        loss.backward()
        stats.type_hits.index_add_(0, batch["question_type"], torch.stack([correct, torch.ones_like(correct)], -1))
        return loss, lm_loss, aux_loss

    last = False
    while not last:  # at least one step; stop once the progress fraction reaches 1
        lr = config.lr * lr_factor(step, budget.progress(time.perf_counter(), step), warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr

        t_wait = time.perf_counter()
        batch = next(batches)
        stats.wait_s += time.perf_counter() - t_wait
        complexity = batch.pop("complexity")  # CPU-side statistics, never sent to the device
        stats.complexity_sum += float(complexity.sum())
        stats.scenes += complexity.numel()
        cap = float(batch.pop("complexity_cap"))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        pixel_values = normalizer(batch["pixels"])
        if step == 0 and loss_fn is not forward_losses:
            t_first = time.perf_counter()
            try:  # compilation happens here; should it fail, train eagerly instead of losing the run
                loss, lm_loss, aux_loss = forward_backward(loss_fn, batch, pixel_values)
            except Exception as error:  # noqa: BLE001
                compile_error = f"{type(error).__name__}: {str(error)[:500]}"
                print(f"warning: --compile failed, training without it: {compile_error}", file=sys.stderr)
                optimizer.zero_grad(set_to_none=True)
                loss_fn = forward_losses
                loss, lm_loss, aux_loss = forward_backward(loss_fn, batch, pixel_values)
            if cuda:
                torch.cuda.synchronize()
            first_step_s = time.perf_counter() - t_first
        else:
            loss, lm_loss, aux_loss = forward_backward(loss_fn, batch, pixel_values)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats.losses += torch.stack([loss.detach(), lm_loss.detach(), aux_loss.detach()]).float()
        stats.steps += 1
        step += 1

        last = budget.progress(time.perf_counter(), step) >= 1.0
        do_eval = step % config.eval_every == 0 and not last  # the final evaluation happens after saving
        if step % config.log_every == 0 or do_eval or last:
            now = time.perf_counter()
            record = {"step": step, "chain_step": prior_steps + step, "elapsed_s": round(now - t0, 2),
                      **stats.summary(now, step, lr, cap, config.batch_size)}  # fmt: skip
            if first_step_s is not None and stats.since_step == 0:
                record["first_step_s"] = round(first_step_s, 2)  # includes the compilation
            mean = [record["loss"], record["lm_loss"], record["aux_loss"]]
            if not all(math.isfinite(x) for x in mean):
                log(record)
                raise RuntimeError(f"non-finite loss at step {step}: {mean}")
            if do_eval:
                t_eval = time.perf_counter()
                last_eval = evaluate()
                record.update(eval_s=round(time.perf_counter() - t_eval, 2), **last_eval)
            log(record)
            if bar is not None:
                postfix = {"loss": f"{mean[0]:.3f}", "lm": f"{mean[1]:.3f}", "lr": f"{lr:.2e}",
                           "smp/s": f"{record['samples_per_s']:.0f}"}  # fmt: skip
                if last_eval is not None:
                    postfix["acc"] = f"{last_eval['accuracy']:.3f}"
                bar.set_postfix(postfix, refresh=False)
            stats.reset(time.perf_counter(), step)
        if bar is not None:
            bar.update(1)

    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t_train
    if bar is not None:
        bar.close()
    return LoopResult(step, train_s, cap, compile_error, first_step_s)
