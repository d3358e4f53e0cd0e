"""`slimvlm bench-train`: training-step time of the untouched recipe, NaivePrune and DualSpeed side by side.

Each recipe trains the same model on the same synthetic batch (random weights of a published shape are enough:
time does not depend on content): the vision tower frozen, the projector trained, the LLM trained in full or
through LoRA adapters (`peft`, as LLaVA's LoRA recipe). A step is DualSpeed.loss on the direct forward
(train/spans.py), backward and an AdamW step, under bf16 autocast on a GPU. Per recipe: the median time of a fast
and of a slow step (CUDA events after warm-up), the whole run of `steps` steps in the recipe's own mode order
(wall-clock, a device synchronisation at both ends), steps/s and samples/s of that run, the speed-up it implies
for a whole training run from the mode mix, (1 - r) * fast + r * slow against the untouched step, and peak memory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial

import torch

from ..errors import SlimVLMError
from ..models import adapter_for
from ..sequence import IGNORE_INDEX
from ..train.dualspeed import DualSpeed, variant
from .run import synthetic_inputs
from .table import text_table
from .timing import interleaved_medians_ms, peak_memory_bytes, synchronize


@dataclass
class TrainResult:
    recipe: str
    options: dict
    batch_size: int
    visual_tokens: dict  # fast / slow mode: visual tokens per image the LLM trains on
    step_ms: dict  # fast / slow mode: median ms of one step
    run_steps: int
    run_s: float
    steps_per_s: float
    samples_per_s: float
    expected_speedup: float | None  # against the untouched recipe, from the mode mix
    measured_speedup: float | None  # the whole runs' wall-clock, against the untouched recipe's
    peak_memory_bytes: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def training_batch(model, batch_size: int, text_tokens: int, answer_tokens: int, seed: int = 0) -> dict:
    """A synthetic batch (bench.run.synthetic_inputs) with the last `answer_tokens` labelled, and where its image
    span sits (the direct forward takes it)."""
    if not 0 < answer_tokens < text_tokens:
        raise SlimVLMError(f"--answer-tokens {answer_tokens} must be between 1 and the {text_tokens} text tokens")
    inputs = synthetic_inputs(model, batch_size, text_tokens, seed=seed)
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -answer_tokens:] = ids[:, -answer_tokens:]
    span = (ids[0] == model.config.image_token_id).nonzero()[:, 0].tolist()  # one read, before any timing
    return {**inputs, "labels": labels, "image_start": span[0], "image_tokens": len(span)}


def make_trainable(model, lora_rank: int) -> torch.nn.Module:
    """The vision tower frozen, the projector trained, the LLM in full (lora_rank 0: its head included) or through
    LoRA adapters on its attention and MLP projections (peft; alpha = 2 * rank, as LLaVA's LoRA recipe; the LLM's
    own weights and head frozen). Returns the model."""
    adapter = adapter_for(model)
    model.requires_grad_(True)
    adapter.vision.requires_grad_(False)
    if lora_rank:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise SlimVLMError("--lora needs peft: pip install peft (or slimvlm[train]); --lora 0 trains the LLM in full") from None
        adapter.language_model.requires_grad_(False)
        adapter.lm_head.requires_grad_(False)  # the LLM's own weights stay: its adapters train
        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        inject_adapter_in_model(config, adapter.language_model)
        for name, param in adapter.language_model.named_parameters():
            param.requires_grad_("lora_" in name)
    return model


def _step(dual: DualSpeed, optimizer, batch: dict, step: int, autocast) -> None:
    with autocast:
        loss, _ = dual.loss(batch, step, details=False)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


RECIPES = ("baseline", "naive-pruning", "dualspeed")


def bench_train(model, batch: dict, p: float, r: float, steps: int, warmup: int, repeats: int,
                isolator_length: int = 4, seed: int = 0) -> list[TrainResult]:
    """Time the three recipes on `batch` (training_batch), the model made trainable already (make_trainable).

    The step medians interleave the recipes and modes (each round times one step of each in turn), so that a drift
    of the machine over the run cannot pass for a difference between them; one optimizer serves all three (the
    isolator's state stays empty in the steps that do not use it), so peak memory counts one optimizer's state."""
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    params = [param for param in model.parameters() if param.requires_grad]
    batch_size, length = batch["input_ids"].shape
    options = {recipe: variant(recipe, pruner=f"divprune:ratio={round(1 - p, 4)}", r=r, isolator_length=isolator_length,
                               seed=seed) for recipe in RECIPES}
    duals = {recipe: DualSpeed(model, **options[recipe]) for recipe in RECIPES}
    optimizer = torch.optim.AdamW([*params, *(q for dual in duals.values() for q in dual.parameters())], lr=1e-6,
                                  fused=device.type == "cuda")
    step_fns, tokens = {}, {recipe: {} for recipe in RECIPES}
    for recipe, dual in duals.items():
        for mode in ("fast", "slow"):
            step = next((s for s in range(10_000) if dual.step_mode(s) == mode), None)
            if step is None:  # the recipe never runs this mode
                continue
            step_fns[recipe, mode] = partial(_step, dual, optimizer, batch, step, autocast)
            with torch.no_grad(), autocast:  # the visual tokens the LLM trains on in this mode
                _, logits, _ = dual.fast_forward(batch) if mode == "fast" else dual.slow_forward(batch)
            tokens[recipe][mode] = logits.shape[1] - (length - batch["image_tokens"])
    medians = interleaved_medians_ms(step_fns, device, warmup, repeats)
    results: list[TrainResult] = []
    for recipe, dual in duals.items():
        run_s = []

        def whole_run() -> None:
            synchronize(device)
            began = time.perf_counter()
            for step in range(steps):
                _step(dual, optimizer, batch, step, autocast)
            synchronize(device)
            run_s.append(time.perf_counter() - began)

        peak = peak_memory_bytes(whole_run, device)
        step_ms = {mode: round(medians[key, mode], 2) for key, mode in medians if key == recipe}
        results.append(TrainResult(
            recipe=recipe, options=options[recipe], batch_size=batch_size, visual_tokens=tokens[recipe],
            step_ms=step_ms, run_steps=steps, run_s=round(run_s[0], 3), steps_per_s=round(steps / run_s[0], 3),
            samples_per_s=round(steps * batch_size / run_s[0], 2), expected_speedup=None, measured_speedup=None,
            peak_memory_bytes=peak,
        ))
    untouched = results[0]
    for result in results:
        mix = (1 - result.options["r"]) * result.step_ms.get("fast", 0.0) + result.options["r"] * result.step_ms.get("slow", 0.0)
        result.expected_speedup = round(untouched.step_ms["slow"] / mix, 3)
        result.measured_speedup = round(untouched.run_s / result.run_s, 3)
    return results


def format_table(results: list[TrainResult]) -> str:
    rows = [[r.recipe, str(r.visual_tokens.get("fast", "-")), str(r.visual_tokens.get("slow", "-")),
             str(r.step_ms.get("fast", "-")), str(r.step_ms.get("slow", "-")), f"{r.steps_per_s:.2f}",
             f"{r.samples_per_s:.1f}", f"{r.expected_speedup:.2f}x", f"{r.measured_speedup:.2f}x",
             "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**30:.1f}"] for r in results]
    header = ["recipe", "fast tokens", "slow tokens", "fast ms", "slow ms", "steps/s", "samples/s",
              "expected speed-up", "measured speed-up", "peak GiB"]
    return text_table(header, rows)
