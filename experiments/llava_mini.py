"""LLaVA-Mini at several budgets on the testbed: train, save, evaluate, compare (issue 6, item 5).

    python -m experiments.llava_mini --model models/tb --out reports/llava_mini \
        --budgets 1,4,16,64 --steps 400 --batch-size 32 --eval-samples 400 --device cuda

For each budget C: a fresh copy of the model; LLaVA-Mini's compressor (C queries) and pre-fusion
layers are built and trained together with the projector and the language model, the vision
tower frozen - the paper's instruction-tuning stage (Zhang et al. 2025, sec. 4: "the compression
and modality pre-fusion modules are trained with the LLM"; the CLIP encoder stays frozen).
`--freeze-llm` trains the modules alone. Training runs through `llava_mini_trainer`
(transformers.Trainer) on train-split scenes drawn by DataLoader workers; the modules are saved
as safetensors + JSON (`llava-mini:weights=DIR`) and, when the LLM was trained, the model beside
them (`DIR/model`). Each is then evaluated on the same held-out scenes through
`slimvlm.apply(model, "llava-mini:weights=DIR")` + `generate()` (slimvlm.bench.evaluate), with the
untouched model ("none") and training-free methods at the same budgets as references.

Written to --out: results.json (every row, the settings, the command) and results.md (a table).
Per row: budget, train wall seconds, accuracy and retention (accuracy / untouched accuracy),
visual tokens per image, prefill FLOPs ratio to the untouched model on this model, KV-cache bytes
per image (bf16) on this model and on the LLaVA-1.5-7B shape.

FLOPs: slimvlm.bench.flops counts the vision encoder, projector, LLaVA-Mini's pre-fusion layers
(the run's stats: per layer, per sample, its visual tokens uncompressed + its text tokens, each an
LLM layer's prefill) and the LLM prefill. The compressor's cross-attention
(C queries over 576 keys: 2 C 576 D x 2 plus the 4 D^2 projections) is below 0.1% and not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from slimvlm.bench import flops as flops_mod
from slimvlm.bench.evaluate import MethodResult, evaluate, from_sample
from slimvlm.bench.shapes import shape_config
from slimvlm.errors import SlimVLMError, exit_code

SHAPE_7B = "llava-1.5-7b"
KV_BYTES = 2  # bf16 cache, as served


def parse_budgets(text: str) -> list[int]:
    try:
        budgets = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise SlimVLMError(f"--budgets must be comma-separated whole numbers, not {text!r}") from error
    if not budgets or any(b < 1 for b in budgets):
        raise SlimVLMError(f"--budgets needs at least one budget, each at least 1 token: {text!r}")
    return budgets


def baseline_specs(budgets: list[int], names: list[str]) -> list[str]:
    """Training-free methods at the budgets: divprune at any budget; visionzip at budgets of 16 or
    more (its dominant/contextual split as the authors' 54/10 at 64: contextual = C * 10 // 64)."""
    specs = []
    for name in names:
        for budget in budgets:
            if name == "divprune":
                specs.append(f"divprune:budget={budget}")
            elif name == "visionzip":
                if budget >= 16:
                    contextual = max(1, budget * 10 // 64)
                    specs.append(f"visionzip:dominant={budget - contextual},contextual={contextual}")
            elif name in ("pool", "uniform", "random"):
                specs.append(f"{name}:budget={budget}")
            else:
                raise SlimVLMError(f"unknown baseline {name!r}; use divprune, visionzip, pool, uniform or random")
    return specs


# ------------------------------------------------------------------------------- measures


def kv_per_image(result: MethodResult, config, images_per_sample: int = 1) -> float:
    """Visual KV-cache bytes per image (bf16), from the run's per-layer cache entries."""
    entries = [sum(layers) for stats in result.stats for layers in stats.kv_visual_entries]
    return flops_mod.kv_bytes(config, sum(entries), KV_BYTES) / (len(entries) * images_per_sample)


def shape_7b(tokens_per_image: float, prefusion_layers: int, text_tokens: int = 64) -> tuple[float, float]:
    """(prefill FLOPs ratio to the untouched model, visual KV bytes per image) on the LLaVA-1.5-7B
    shape for one image and `text_tokens` of text, a stage-2 method keeping `tokens_per_image`
    tokens in every LLM layer (plus `prefusion_layers` over the full sequence for LLaVA-Mini)."""
    config = shape_config(SHAPE_7B)
    vision, llm = flops_mod.shapes(config)
    patches = vision.patches
    encoder = flops_mod.patch_embedding_flops(vision) + sum(
        flops_mod.vision_layer_flops(vision, patches + 1) for _ in range(config.vision_config.num_hidden_layers - 1)
    )  # LLaVA runs the tower up to the second-to-last layer
    projector = flops_mod.projector_flops(vision, llm, patches)

    def prefill(n: float, fused: int) -> float:
        n = int(round(n))
        body = llm.layers * flops_mod.llm_layer_prefill_flops(llm, n + text_tokens)
        return encoder + projector + body + fused * flops_mod.llm_layer_prefill_flops(llm, patches + text_tokens)

    ratio = prefill(tokens_per_image, prefusion_layers) / prefill(patches, 0)
    kv = flops_mod.kv_bytes(config, tokens_per_image * llm.layers, KV_BYTES)
    return ratio, kv


def row(result: MethodResult, baseline: MethodResult | None, config, *, budget,
        prefusion_layers: int = 0, train: dict | None = None, images_per_sample: int = 1) -> dict:
    flops = result.prefill_flops or 0
    base = baseline.prefill_flops if baseline is not None else None
    ratio_7b, kv_7b = shape_7b(result.visual_tokens_mean / images_per_sample, prefusion_layers)
    return {
        "method": result.method,
        "budget": budget,
        "trained": train is not None,
        **(train or {"train_s": None, "steps": None, "final_loss": None}),
        "accuracy": result.accuracy,
        "accuracy_by_type": result.accuracy_by_type(),
        "retention": result.retention(baseline),
        "visual_tokens_mean": result.visual_tokens_mean,
        "prefill_flops": flops,
        "flops_ratio": flops / base if base else None,
        "kv_bytes_per_image": kv_per_image(result, config, images_per_sample),
        "flops_ratio_7b": ratio_7b,
        "kv_bytes_per_image_7b": kv_7b,
        "samples": len(result.records),
    }


# ------------------------------------------------------------------------------- training


class TimeLimit:
    """A Trainer callback that stops training once `seconds` have passed (None: no limit)."""

    def __new__(cls, seconds: float | None):
        from transformers import TrainerCallback

        class _TimeLimit(TrainerCallback):
            def __init__(self) -> None:
                self.start = None

            def on_train_begin(self, args, state, control, **kwargs):
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if seconds is not None and time.perf_counter() - self.start > seconds:
                    control.should_training_stop = True
                return control

        return _TimeLimit()


class WallClockCosine:
    """LambdaLR factor: linear warm-up over `warmup` steps, then a cosine to zero over whichever
    runs out first, `steps` or `seconds` of training (timed from the first step; None: steps
    only). With --max-train-seconds a run stopped by the clock has still annealed its learning
    rate, instead of stopping at the peak of a schedule laid out for more steps."""

    def __init__(self, steps: int, seconds: float | None, warmup: int, clock=time.perf_counter) -> None:
        self.steps, self.seconds, self.warmup, self.clock = steps, seconds, max(1, warmup), clock
        self.start: float | None = None

    def progress(self, step: int) -> float:
        """How far the cosine is (1: done): steps after the warm-up, or the time since the first step."""
        by_steps = (step - self.warmup) / max(1, self.steps - self.warmup)
        if self.seconds is None:
            return by_steps
        return max(by_steps, (self.clock() - self.start) / self.seconds)

    def __call__(self, step: int) -> float:
        if self.start is None and step > 0:
            self.start = self.clock()
        if step < self.warmup:
            return step / self.warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, self.progress(step))))


def start_model(args) -> Path:
    """The model training starts from: --model, or with --init the model the modules were trained
    with (the init folder's model/, when the LLM was trained with them)."""
    if args.init is not None and (Path(args.init) / "model" / "config.json").is_file():
        return Path(args.init) / "model"
    return Path(args.model)


def train_budget(args, budget: int, device: torch.device, folder: Path) -> tuple[torch.nn.Module, dict]:
    """Train LLaVA-Mini at `budget` on a fresh copy of the model; save the modules (and the model
    when the LLM was trained) to `folder`; return the trained model and the training record."""
    from transformers import TrainingArguments

    from slimvlm.methods.llava_mini import LlavaMini
    from slimvlm.models.loading import load_model
    from slimvlm.train.data import ClipDataset, OneKindBatches, SceneCollator, SceneDataset
    from slimvlm.train.llava_mini import llava_mini_trainer

    model, processor = load_model(str(start_model(args)), device, "float32")
    model.train()
    for param in model.model.vision_tower.parameters():  # the paper keeps the CLIP encoder frozen
        param.requires_grad_(False)
    method = LlavaMini(budget=budget, layers=args.layers, seed=args.seed, weights=args.init)
    modules = method.build(model)
    mine = {id(p) for p in modules.parameters()}
    groups = [{"params": list(modules.parameters()), "lr": args.lr}]
    if not args.freeze_llm:
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in mine]
        groups.append({"params": rest, "lr": args.llm_lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, min(args.steps // 20, 100))  # 5% of the steps, at most 100
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WallClockCosine(args.steps, args.max_train_seconds, warmup))
    cuda = device.type == "cuda"
    training = TrainingArguments(
        output_dir=str(folder / "trainer"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        max_grad_norm=1.0,
        report_to=[], remove_unused_columns=False, save_strategy="no", logging_steps=max(1, min(args.steps // 10, 100)),
        use_cpu=not cuda, bf16=cuda, dataloader_num_workers=args.workers, seed=args.seed,
        disable_tqdm=not args.progress,
    )
    total = args.steps * args.batch_size
    n_clips = round(args.steps * args.train_clip_fraction) * args.batch_size  # whole batches of clips
    seed = args.seed * 1_000_003 + budget
    dataset, sampler = SceneDataset(total - n_clips, seed=seed), None
    if n_clips:  # batches of scenes and batches of clips, shuffled together
        dataset = torch.utils.data.ConcatDataset([dataset, ClipDataset(n_clips, seed=seed, frames=args.clip_frames)])
        sampler = OneKindBatches([total - n_clips, n_clips], args.batch_size, seed=seed)
    collator = SceneCollator(processor, normalize_on_device=True)
    trainer = llava_mini_trainer(method, model, training, dataset, collator, train_llm=not args.freeze_llm,
                                 prepare_batch=collator.on_device, optimizers=(optimizer, schedule),
                                 callbacks=[TimeLimit(args.max_train_seconds)], train_sampler=sampler)
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    output = trainer.train()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    save_dtype = getattr(torch, args.save_dtype)
    method.save(folder, save_dtype)
    if not args.freeze_llm:  # saved in save_dtype and read back, so that the evaluation sees what was saved
        model.to(save_dtype).save_pretrained(folder / "model")
        model.float()
        processor.save_pretrained(folder / "model")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    record = {
        "train_s": round(seconds, 2),
        "steps": int(output.global_step),
        "final_loss": losses[-1] if losses else float(output.training_loss),
        "first_loss": losses[0] if losses else None,
        "weights": str(folder),
        "model": str(folder / "model") if not args.freeze_llm else args.model,
    }
    return model, record


# --------------------------------------------------------------------------------- report


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_markdown(rows: list[dict], settings: dict) -> str:
    lines = [
        "# LLaVA-Mini on the testbed: accuracy, FLOPs and KV cache per budget",
        "",
        f"Model `{settings['model']}`; {settings['eval_samples']} held-out scenes (test split, seed {settings['seed']}); "
        f"training {settings['steps']} steps x batch {settings['batch_size']} per budget "
        f"({'modules only' if settings['freeze_llm'] else 'modules + projector + LLM, vision tower frozen'}), "
        f"lr {settings['lr']:g} (modules) / {settings['llm_lr']:g} (model), {settings['layers']} pre-fusion layers; "
        f"device {settings['device']}."
        + (f" Continued from `{settings['init']}` (its modules and model)." if settings.get("init") else ""),
        "",
        "| method | C | train s | steps | acc % | retain % | tokens/img | FLOPs % | KV KB/img | 7B FLOPs % | 7B KV MB/img |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget'] if r['budget'] is not None else '-'} | "
            f"{_seconds(r['train_s'])} | {r['steps'] or '-'} | "
            f"{_pct(r['accuracy'])} | {_pct(r['retention'])} | {r['visual_tokens_mean']:.1f} | {_pct(r['flops_ratio'])} | "
            f"{r['kv_bytes_per_image'] / 1024:.1f} | {_pct(r['flops_ratio_7b'])} | {r['kv_bytes_per_image_7b'] / 2**20:.2f} |"
        )
    lines += [
        "",
        "FLOPs %: prefill FLOPs (vision encoder + projector + LLM prefill, plus LLaVA-Mini's pre-fusion layers) "
        "relative to the untouched model, on this model and on the LLaVA-1.5-7B shape (one image, 64 text tokens). "
        "KV: visual KV-cache bytes per image (frame) in bf16. Retention: accuracy / untouched accuracy. "
        "Clip rows: tokens are per clip (all its frames), retention against the untouched model on the same clips.",
        "",
        f"Command: `{settings['command']}`",
        "",
    ]
    return "\n".join(lines)


def format_card(budget: int, rows: list[dict], settings: dict, args) -> str:
    """The model card of one budget's weights folder: what it is, how it was trained, what it scores."""
    mine = [r for r in rows if r["trained"] and r["budget"] == budget]
    scenes, clips = mine[0], mine[1] if len(mine) > 1 else None
    none = rows[0]
    types = sorted(scenes["accuracy_by_type"])
    model_dir = "the base model" if args.freeze_llm else "`model/` beside the modules (projector and LLM trained with them)"
    lines = [
        f"# LLaVA-Mini modules, C = {budget}, for `{settings['model']}`",
        "",
        f"A compressor of {budget} learnable {'query' if budget == 1 else 'queries'} (cross-attention over the projected visual tokens, 2D "
        f"position encodings) and {settings['layers']} modality pre-fusion layers, trained with {model_dir}. Use:",
        "",
        "```",
        f"slimvlm eval --model {'MODEL' if args.freeze_llm else 'THIS_FOLDER/model'} --methods none,llava-mini:weights=THIS_FOLDER",
        "```",
        "",
        "## Training",
        "",
        f"- {scenes['steps']} steps x batch {settings['batch_size']} ({scenes['train_s']} s on {settings['device']}), "
        f"of {settings['steps']} planned{' (stopped by --max-train-seconds)' if scenes['steps'] < settings['steps'] else ''}; "
        "loss " + " -> ".join("-" if v is None else f"{v:.3f}" for v in (scenes["first_loss"], scenes["final_loss"])) + "."
        + (f" Continued from `{settings['init']}` (its modules and model)." if settings.get("init") else ""),
        f"- AdamW, lr {settings['lr']:g} (modules) / {settings['llm_lr']:g} (projector and LLM), cosine with warm-up"
        + (f" over {settings['max_train_seconds']:g} s of training (or the steps, whichever ends first)" if settings["max_train_seconds"] else "")
        + f"; weights saved in {settings['save_dtype']} (the accuracy below is theirs); "
        "vision tower frozen; train-split testbed scenes"
        + (f", a share {args.train_clip_fraction:g} of the batches clips of {args.clip_frames} frames." if args.train_clip_fraction else "."),
        "",
        f"## Held-out accuracy ({scenes['samples']} test-split scenes, seed {settings['seed']})",
        "",
        "| question type | untouched (576 tokens) % | C = " + str(budget) + " % |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {t} | {_pct(none['accuracy_by_type'].get(t))} | {_pct(scenes['accuracy_by_type'][t])} |" for t in types]
    lines += [
        f"| **overall** | {_pct(none['accuracy'])} | **{_pct(scenes['accuracy'])}** (retention {_pct(scenes['retention'])}) |",
        "",
    ]
    if clips is not None:
        lines += [f"Clips of {args.clip_frames} frames ({clips['samples']}): {_pct(clips['accuracy'])}%, retention "
                  f"{_pct(clips['retention'])}% of the untouched model on the same clips, with {budget} token{'' if budget == 1 else 's'} per frame.", ""]
    lines += [
        f"Cost: {_pct(scenes['flops_ratio'])}% of the untouched prefill FLOPs on this model and "
        f"{_pct(scenes['flops_ratio_7b'])}% on the LLaVA-1.5-7B shape (pre-fusion included); visual KV cache "
        f"{scenes['kv_bytes_per_image'] / 1024:.1f} KB per image (7B shape: {scenes['kv_bytes_per_image_7b'] / 2**20:.2f} MB).",
        "",
        f"Command: `{settings['command']}`",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main


def run(args) -> dict:
    from slimvlm.models.loading import load_model, resolve_device
    from slimvlm.testbed.scenes import make_samples

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    budgets = parse_budgets(args.budgets)
    if args.init is not None:  # refused before any run: several budgets, or weights of another budget / depth
        if len(budgets) != 1:
            raise SlimVLMError(f"--init continues one budget's weights; give that budget alone in --budgets, not {args.budgets!r}")
        from slimvlm.methods.llava_mini import LlavaMini

        LlavaMini(budget=budgets[0], layers=args.layers, weights=args.init)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    items = [from_sample(s) for s in make_samples(args.eval_samples, seed=args.seed, split="test")]
    model, processor = load_model(args.model, device, "float32")
    if processor is None:
        raise SlimVLMError(f"{args.model} has no processor; the experiment needs a model folder with its processor")
    config = model.config

    def evaluate_spec(m, spec) -> MethodResult:
        return evaluate(m, processor, items, spec, batch_size=args.eval_batch_size, progress=args.progress)

    baseline = evaluate_spec(model, "none")
    rows = [row(baseline, baseline, config, budget=None)]
    timings = {"eval_none_s": round(time.perf_counter() - started, 2)}
    for spec in baseline_specs(budgets, [b for b in args.baselines.split(",") if b]):
        t = time.perf_counter()
        result = evaluate_spec(model, spec)
        budget = result.visual_tokens_mean
        rows.append(row(result, baseline, config, budget=int(round(budget))))
        timings[f"eval {spec}"] = round(time.perf_counter() - t, 2)
        print(f"{spec}: accuracy {result.accuracy:.3f}", flush=True)
    clip_items, clip_baseline = [], None
    if args.clip_samples:
        from slimvlm.testbed.clips import make_clip_samples

        clip_items = [from_sample(s) for s in make_clip_samples(args.clip_samples, seed=args.seed, split="test", frames=args.clip_frames)]
        clip_baseline = evaluate(model, processor, clip_items, "none", batch_size=max(1, args.eval_batch_size // args.clip_frames),
                                 progress=args.progress)
        clip_baseline.method = f"none (clips of {args.clip_frames} frames)"
        rows.append(row(clip_baseline, clip_baseline, config, budget=None, images_per_sample=args.clip_frames))
    del model
    for budget in budgets:
        folder = out / f"c{budget}"
        trained, record = train_budget(args, budget, device, folder)
        t = time.perf_counter()
        result = evaluate_spec(trained, f"llava-mini:weights={folder}")
        timings[f"eval llava-mini c{budget}"] = round(time.perf_counter() - t, 2)
        result.method = f"llava-mini:budget={budget},layers={args.layers}"
        rows.append(row(result, baseline, config, budget=budget, prefusion_layers=args.layers, train=record))
        print(f"llava-mini C={budget}: {record['steps']} steps in {record['train_s']} s, loss {record['first_loss']} -> "
              f"{record['final_loss']}, accuracy {result.accuracy:.3f}", flush=True)
        if clip_items:
            result = evaluate(trained, processor, clip_items, f"llava-mini:weights={folder}",
                              batch_size=max(1, args.eval_batch_size // args.clip_frames), progress=args.progress)
            result.method = f"llava-mini:budget={budget},layers={args.layers} (clips of {args.clip_frames} frames)"
            rows.append(row(result, clip_baseline, config, budget=budget, prefusion_layers=args.layers,
                            train=record, images_per_sample=args.clip_frames))
        del trained
        if device.type == "cuda":
            torch.cuda.empty_cache()
    settings = {
        "model": args.model, "budgets": budgets, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "llm_lr": args.llm_lr, "layers": args.layers, "freeze_llm": args.freeze_llm, "eval_samples": args.eval_samples,
        "seed": args.seed, "max_train_seconds": args.max_train_seconds, "save_dtype": args.save_dtype, "init": args.init,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": "python -m experiments.llava_mini " + shlex.join(args.argv),
        "total_s": round(time.perf_counter() - started, 2),
        "timings": timings,
    }
    for budget in budgets:
        (out / f"c{budget}" / "README.md").write_text(format_card(budget, rows, settings, args))
    payload = {"settings": settings, "rows": rows}
    (out / "results.json").write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(format_markdown(rows, settings))
    print(format_markdown(rows, settings))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'} in {settings['total_s']} s")
    return payload


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.llava_mini", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a local LLaVA model folder with its processor (e.g. models/tb)")
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the weights (c<C>/)")
    p.add_argument("--budgets", default="1,4,16,64")
    p.add_argument("--steps", type=int, default=400, help="training steps per budget")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the LLaVA-Mini modules")
    p.add_argument("--llm-lr", type=float, default=1e-4, help="peak learning rate of the projector and LLM")
    p.add_argument("--layers", type=int, default=4, help="pre-fusion layers")
    p.add_argument("--freeze-llm", action="store_true", help="train the LLaVA-Mini modules only")
    p.add_argument("--max-train-seconds", type=float, default=None,
                   help="stop a budget's training after this long; the cosine learning-rate schedule then follows the clock")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the saved weights (modules and trained model); evaluation uses the saved values")
    p.add_argument("--init", default=None,
                   help="continue training from a weights folder this experiment wrote (c<C>/: the modules and, in model/, "
                        "the model trained with them); one budget, the folder's")
    p.add_argument("--eval-samples", type=int, default=400)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--baselines", default="divprune,visionzip", help="training-free methods at the same budgets ('' for none)")
    p.add_argument("--clip-samples", type=int, default=0, help="also evaluate on this many held-out clips (0: none)")
    p.add_argument("--clip-frames", type=int, default=8, help="frames per clip")
    p.add_argument("--train-clip-fraction", type=float, default=0.0,
                   help="share of the training batches made of train-split clips of --clip-frames frames (0: scenes only); a batch holds one kind")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers drawing training scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", action="store_true", help="progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # for the command recorded in the results
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--eval-samples", args.eval_samples),
                        ("--eval-batch-size", args.eval_batch_size), ("--clip-frames", args.clip_frames),
                        ("--clip-samples", args.clip_samples + 1)):
        if value < 1:
            print(f"error: {flag}={value} must be at least 1", file=sys.stderr)
            return 2
    if not (args.lr > 0 and math.isfinite(args.lr) and args.llm_lr > 0 and math.isfinite(args.llm_lr)):
        print("error: --lr and --llm-lr must be positive", file=sys.stderr)
        return 2
    if not 0.0 <= args.train_clip_fraction < 1.0:
        print(f"error: --train-clip-fraction={args.train_clip_fraction} must be in [0, 1)", file=sys.stderr)
        return 2
    return exit_code(lambda: run(args), "experiments.llava_mini")


if __name__ == "__main__":
    raise SystemExit(main())
