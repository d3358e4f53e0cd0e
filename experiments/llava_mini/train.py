"""LLaVA-Mini at several budgets on the testbed, trained side by side on the same batches (issue 26).

    python -m experiments.llava_mini.train --out OUT --students c1,c1:frozen,c16,c64:frozen --samples 600000

Each student is a copy of the testbed model with LLaVA-Mini's modules at one budget C (`cC`), or at several that
share the model (`c1+c16`: one projector and LLM trained for both, the losses summed, each budget its own
modules), the vision tower frozen (the paper's instruction tuning), and either the projector and LLM trained with
the modules (default) or the modules alone (`:frozen`: the student then runs on the untouched model); `:distill`
adds the distillation from the untouched model (CE + KL(teacher || student) on the answer, the teacher being the
model the students start from). Every student starts as `pool:budget=C` exactly (methods/llava_mini.py, init), or,
with `--continue-shipped`, from the LLaVA-Mini the model folder ships (its modules at the student's budgets and the
model they were trained with): a second stage at a lower rate.

Speed: the batches come from a pool of scenes rendered once onto the device (experiments/scene_pool.py); the
frozen vision tower and the teacher run once per batch for all students; each student's step is the direct
forward of slimvlm/train/spans.py (no host reads) under bf16 autocast, with fused AdamW. `--alone-steps N`
first times N steps of one C=1 student alone, data included: the samples/s one budget trains at.

Learning curves: every `--eval-every` samples, each student's teacher-forced accuracy on the first answer token
of `--eval-samples` held-out scenes, per question type. At the end each student is scored as users run it:
`slimvlm.apply` + `generate()` on the same held-out scenes (slimvlm.bench.evaluate), and on 4-frame clips.
Writes OUT/results.json, OUT/curves.png and each student's weights to OUT/<name>/ (modules; the model's
trained parts too when the LLM trained).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments.runner import command, common_options, entry
from experiments.scene_pool import render_pool
from experiments.testbed.optimizer import lr_factor
from slimvlm.bench.evaluate import evaluate, from_sample
from slimvlm.bench.timing import synchronize
from slimvlm.methods.llava_mini import LlavaMini, shipped_model, shipped_weights
from slimvlm.models import adapter_for
from slimvlm.models.loading import load_model, resolve_device
from slimvlm.sequence import IGNORE_INDEX
from slimvlm.testbed.clips import make_clip_samples
from slimvlm.testbed.scenes import QUESTION_TYPES, make_samples
from slimvlm.testbed.batches import PixelNormalizer
from slimvlm.tokens import VisualTokens
from slimvlm.train.data import SceneCollator
from slimvlm.train.distillation import answer_weights, distillation_kl
from slimvlm.train.spans import causal_lm_loss, lm_logits


@dataclass
class Student:
    name: str
    budgets: list[int]
    train_llm: bool
    distill: bool
    init: str
    continued_from: str | None = None  # --continue-shipped: the model folder whose LLaVA-Mini it starts from
    model: torch.nn.Module = None
    methods: list[LlavaMini] = field(default_factory=list)
    optimizer: torch.optim.Optimizer = None
    step_ms: list = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)


def parse_students(text: str) -> list[Student]:
    """'c1,c1+c16,c1:frozen,c16:distill,c4:init=lm' -> students."""
    students = []
    for spec in filter(None, (part.strip() for part in text.split(","))):
        head, *flags = spec.split(":")
        budgets = head.split("+")
        if not all(b.startswith("c") and b[1:].isdigit() for b in budgets):
            raise SystemExit(f"--students: {spec!r} must start with c<budget>[+c<budget>...]")
        options = dict(flag.split("=", 1) if "=" in flag else (flag, True) for flag in flags)
        unknown = set(options) - {"frozen", "distill", "init"}
        if unknown:
            raise SystemExit(f"--students: {spec!r} has unknown flags {sorted(unknown)}")
        students.append(Student(spec, [int(b[1:]) for b in budgets], "frozen" not in options, "distill" in options,
                                options.get("init", "lm-silenced")))
    return students


def build_student(student: Student, base: torch.nn.Module, args, shipped: dict[int, Path] | None = None) -> None:
    """The student's model and modules; with `shipped` (--continue-shipped: the model folder's trained LLaVA-Mini, by
    budget) they start from those weights and the model they were trained with, `base` (the start otherwise)."""
    student.model = copy.deepcopy(base).train().requires_grad_(True)  # the untouched base is frozen: it teaches
    adapter_for(student.model).vision.requires_grad_(False)  # the paper keeps the CLIP encoder frozen
    if not student.train_llm:
        student.model.requires_grad_(False)
    student.methods = [LlavaMini(budget=budget, layers=args.layers, seed=args.seed, init=student.init)
                       for budget in student.budgets]
    groups = []
    for method in student.methods:
        groups.append({"params": list(method.build(student.model).parameters()), "lr": args.lr})
        if shipped is not None:
            if method.budget not in shipped:
                raise SystemExit(f"--continue-shipped: {args.model} ships no LLaVA-Mini modules for C = {method.budget} "
                                 f"(it ships C = {sorted(shipped)})")
            method.load(shipped[method.budget])
        method.trained_here = True
    if student.train_llm:
        groups.append({"params": [p for p in student.model.parameters() if p.requires_grad], "lr": args.llm_lr})
    student.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.0,
                                          fused=next(base.parameters()).is_cuda)
    student.rates = [group["lr"] for group in groups]


def shared_inputs(teacher, pixel_values: torch.Tensor, batch: dict, span, distilling: bool):
    """What every student's step reads: the frozen vision tower's tokens (once), and the teacher's logits of the
    text after the image (the answer's distribution), or None when no student distils."""
    adapter = adapter_for(teacher)
    with torch.no_grad():
        encoded, _ = adapter.encode(pixel_values, None)
        if not distilling:
            return encoded, None
        full = adapter.project(encoded).x[batch["image_index"]]
        rows = span.splice(adapter.embed(batch["input_ids"]), full)
        return encoded, lm_logits(teacher, rows)[:, span.start + span.length :]


def student_logits(student: Student, method: LlavaMini, encoded: VisualTokens, batch: dict,
                   span) -> tuple[torch.Tensor, torch.Tensor]:
    adapter = adapter_for(student.model)
    projected = adapter.project(encoded)
    full = VisualTokens.from_patches(projected.x[batch["image_index"]], projected.grid, has_cls=False)
    rows = method.train_rows(full, span, adapter.embed(batch["input_ids"]), batch["labels"])
    return lm_logits(student.model, rows), span.splice_labels(batch["labels"], method.budget)


def student_loss(student: Student, encoded, taught, batch: dict, span, tau: float) -> torch.Tensor:
    """The sum over the student's budgets of CE (+ the distillation, where it distils)."""
    total = 0.0
    for method in student.methods:
        logits, labels = student_logits(student, method, encoded, batch, span)
        total = total + causal_lm_loss(logits, labels)
        if student.distill and taught is not None:
            after = span.start + method.budget
            total = total + tau**2 * distillation_kl(taught[:, :-1], logits[:, after:-1], tau, answer_weights(labels[:, after:]))
    return total


def train_step(students: list[Student], teacher, normalizer, batch: dict, span, factor: float, args, timed: bool) -> None:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device_type == "cuda")
    with autocast:
        encoded, taught = shared_inputs(teacher, normalizer(batch["pixels"]), batch, span,
                                        any(s.distill for s in students))
    for student in students:
        start = end = None
        if timed and args.device_type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for group, lr in zip(student.optimizer.param_groups, student.rates):
            group["lr"] = lr * factor
        with autocast:
            loss = student_loss(student, encoded, taught, batch, span, args.tau)
        loss.backward()
        params = [p for group in student.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        student.optimizer.step()
        student.optimizer.zero_grad(set_to_none=True)
        if start is not None:
            end.record()
            student.step_ms.append((start, end))


@torch.no_grad()
def teacher_forced_accuracy(student: Student, method: LlavaMini, rows: dict, types: torch.Tensor, span, autocast) -> dict:
    """Accuracy of the first answer token given the prompt, overall and per question type (one read)."""
    student.model.eval()
    with autocast:
        encoded, _ = adapter_for(student.model).encode(rows["pixel_values"], None)
        batch = {**rows, "image_index": torch.arange(len(types), device=types.device)}
        logits, labels = student_logits(student, method, encoded, batch, span)
    student.model.train()
    first = (labels != IGNORE_INDEX).int().argmax(dim=1)  # the first answer token's column
    predicted = logits.gather(1, (first - 1)[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0].argmax(dim=-1)
    hit = (predicted == labels.gather(1, first[:, None])[:, 0]).float()
    per_type = torch.zeros(len(QUESTION_TYPES), device=hit.device).index_add_(0, types, hit)
    counts = torch.bincount(types, minlength=len(QUESTION_TYPES)).clamp_min(1)
    values = torch.cat([hit.mean()[None], per_type / counts]).tolist()
    return {"budget": method.budget, "accuracy": values[0], "per_type": dict(zip(QUESTION_TYPES, values[1:]))}


def eval_rows(processor, samples: int, seed: int, device) -> tuple[dict, torch.Tensor, list]:
    items = make_samples(samples, seed=seed, split="test")
    rows = SceneCollator(processor)(items)
    rows = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in rows.items()}
    types = torch.tensor([QUESTION_TYPES.index(s.question_type) for s in items], device=device)
    return rows, types, items


def time_alone(base, processor, pool, span, normalizer, args) -> dict:
    """samples/s of one C=1 student trained alone for --alone-steps steps (after 10 warm-up steps), batches
    from the pool; the student is thrown away."""
    student = parse_students("c1")[0]
    build_student(student, base, args)
    batches = pool.batches(args.scenes_per_batch, seed=args.seed + 1)
    teacher = base
    for step in range(10 + args.alone_steps):
        if step == 10:
            synchronize(torch.device(args.device_type))
            started = time.perf_counter()
        train_step([student], teacher, normalizer, next(batches), span, 1.0, args, timed=False)
    synchronize(torch.device(args.device_type))
    seconds = time.perf_counter() - started
    samples = args.alone_steps * args.scenes_per_batch * pool.questions_per_scene
    return {"steps": args.alone_steps, "samples": samples, "seconds": round(seconds, 2),
            "samples_per_s": round(samples / seconds, 1)}


def run(args) -> dict:
    device = resolve_device(args.device)
    args.device_type = device.type
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    base, processor = load_model(args.model, device, "float32")
    base.eval().requires_grad_(False)
    normalizer = PixelNormalizer(processor, device)
    pool = render_pool(processor, args.scenes, device, seed=args.seed, workers=args.workers)
    span = pool.span
    rendered = time.perf_counter() - started
    print(f"pool: {pool.scenes} scenes x {pool.questions_per_scene} questions in {rendered:.1f} s", flush=True)
    alone = time_alone(base, processor, pool, span, normalizer, args) if args.alone_steps else None
    if alone:
        print(f"one C=1 student alone: {alone['samples_per_s']} samples/s", flush=True)
    students = parse_students(args.students)
    shipped = shipped_weights(base.name_or_path) if args.continue_shipped else None
    start = shipped_model(base.name_or_path, device).eval().requires_grad_(False) if args.continue_shipped else base
    for student in students:
        if args.continue_shipped:
            student.continued_from = base.name_or_path
        build_student(student, start, args, shipped)
    rows, types, items = eval_rows(processor, args.eval_samples, args.seed, device)
    rows["pixel_values"] = normalizer(rows.pop("pixels")) if "pixels" in rows else rows["pixel_values"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    per_step = args.scenes_per_batch * pool.questions_per_scene
    steps = args.samples // per_step
    eval_every = max(1, args.eval_every // per_step)
    batches = pool.batches(args.scenes_per_batch, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def record(step: int) -> None:
        shown = []
        for student in students:
            for method in student.methods:
                point = {"step": step, "samples": step * per_step,
                         **teacher_forced_accuracy(student, method, rows, types, span, autocast)}
                student.curve.append(point)
                shown.append(f"{student.name} c{method.budget} {100 * point['accuracy']:.1f}")
        print(f"step {step} ({step * per_step} samples): " + ", ".join(shown), flush=True)

    record(0)
    train_started = time.perf_counter()
    for step in range(steps):
        progress = max(step / steps, (time.perf_counter() - train_started) / args.max_train_seconds)
        train_step(students, base, normalizer, next(batches), span, lr_factor(step, progress, args.warmup), args,
                   timed=step >= 10)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            record(step + 1)
        if time.perf_counter() - train_started > args.max_train_seconds:
            print(f"stopped at step {step + 1}: --max-train-seconds {args.max_train_seconds}", flush=True)
            if students[0].curve[-1]["step"] != step + 1:
                record(step + 1)
            break
    synchronize(torch.device(args.device_type))
    train_seconds = time.perf_counter() - train_started
    results = {"students": [], "settings": {**{k: v for k, v in vars(args).items() if k != "argv"},
                                            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                            "command": command("experiments.llava_mini.train", args),
                                            "pool_seconds": round(rendered, 1), "train_seconds": round(train_seconds, 1)},
               "alone": alone}
    eval_items = [from_sample(s) for s in items]
    clips = [from_sample(s) for s in make_clip_samples(args.clip_samples, seed=args.seed, split="test", frames=4)] \
        if args.clip_samples else []
    reference = evaluate(base, processor, eval_items, "none", batch_size=args.eval_batch_size)
    clip_reference = evaluate(base, processor, clips, "none", batch_size=args.eval_batch_size // 4) if clips else None
    results["untouched"] = {"accuracy": reference.accuracy, "per_type": reference.accuracy_by_type(),
                            "clips": clip_reference.accuracy if clip_reference else None}
    for student in students:
        student.model.eval()
        times = [start.elapsed_time(end) for start, end in student.step_ms]
        folder = out / student.name.replace(":", "-").replace("=", "-").replace("+", "-")
        if student.train_llm:
            from safetensors.torch import save_file

            trained = {name: p.detach().to(torch.bfloat16).cpu().contiguous()
                       for name, p in student.model.state_dict().items() if "vision_tower" not in name}
            folder.mkdir(parents=True, exist_ok=True)
            save_file(trained, str(folder / "model_trained_parts.safetensors"))
        for method in student.methods:
            method.save(folder / f"c{method.budget}", torch.bfloat16)  # before scoring: a cut call keeps them
        for method in student.methods:
            scored = evaluate(student.model, processor, eval_items, method, batch_size=args.eval_batch_size)
            clip_score = evaluate(student.model, processor, clips, method,
                                  batch_size=args.eval_batch_size // 4) if clips else None
            curve = [point for point in student.curve if point["budget"] == method.budget]
            results["students"].append({
                "name": student.name, "budget": method.budget, "train_llm": student.train_llm, "distill": student.distill,
                "init": student.init, "continued_from": student.continued_from, "shared_with": [b for b in student.budgets if b != method.budget],
                "steps": curve[-1]["step"], "samples": curve[-1]["samples"],
                "step_ms_median": sorted(times)[len(times) // 2] if times else None,
                "accuracy": scored.accuracy, "per_type": scored.accuracy_by_type(),
                "clips": clip_score.accuracy if clip_score else None, "curve": curve,
            })
            print(f"{student.name} c{method.budget}: generate() accuracy {100 * scored.accuracy:.1f}"
                  + (f", clips {100 * clip_score.accuracy:.1f}" if clip_score else ""), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # after each: a cut call keeps them
    results["settings"]["total_seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return results


def parser() -> argparse.ArgumentParser:
    p = common_options(argparse.ArgumentParser(prog="python -m experiments.llava_mini.train", description=__doc__.split("\n\n")[0]),
                       scenes=40_000)
    p.add_argument("--students", default="c1+c16")
    p.add_argument("--samples", type=int, default=600_000, help="training samples per student")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4, help="LLaVA-Mini's modules")
    p.add_argument("--llm-lr", type=float, default=1e-4, help="projector and LLM, where they train")
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=50_000, help="samples between learning-curve points")
    p.add_argument("--clip-samples", type=int, default=100)
    p.add_argument("--alone-steps", type=int, default=0)
    p.add_argument("--max-train-seconds", type=float, default=float("inf"),
                   help="stop training after this long; the learning rate's cosine then follows the time too")
    p.add_argument("--continue-shipped", action="store_true",
                   help="start every student from the LLaVA-Mini the model folder ships (its modules at the student's "
                        "budgets and the model they were trained with) instead of pool init: a second, lower-rate stage")
    return p


def main(argv: list[str] | None = None) -> int:
    return entry(parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
