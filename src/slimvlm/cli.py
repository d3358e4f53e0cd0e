"""The command line: slimvlm bench | bench-generate | bench-vision | bench-layer | bench-train | eval | export-testbed-task | demo
| calibrate | train | methods | make-tiny."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from .errors import SlimVLMError, exit_code


KEEP_POSITIONS_HELP = (
    "visual tokens keep the rotary positions of the patches they cover, instead of the shorter "
    "sequence being renumbered (the papers' default)"
)

# the default runs, for LLaVA-1.5 (other families leave out what they refuse: _method_runs)
BENCH_METHODS = "none,tome:r=8,fastv:k=2,ratio=0.5,visionzip,divprune:budget=64"
GENERATE_METHODS = "none,visionzip-64,divprune-64,tome:r=16,llava-mini:budget=1"


def _method_runs(model, text: str, default: str) -> list[list[str]]:
    """The runs --methods names. The default list is for LLaVA-1.5: on another family the runs it refuses are left
    out, and said; a list the user gave is taken whole (a run the model refuses is an error)."""
    from .bench.run import parse_methods
    from .registry import check_runs

    runs = parse_methods(text)
    if text != default:
        return runs
    kept, refused = [], []
    for run in runs:
        try:
            check_runs(model, [run])
            kept.append(run)
        except SlimVLMError as error:
            refused.append(f"{'+'.join(run)} ({str(error).split(';')[0]})")
    if refused:
        print(f"left out of the default --methods, refused by this model: {'; '.join(refused)}")
    return kept


def _bench(args: argparse.Namespace) -> None:
    from .bench.run import format_table, run_bench
    from .models.loading import load_model, resolve_device

    device = resolve_device(args.device)
    model, _ = load_model(args.model, device, args.dtype)
    results = run_bench(
        model,
        _method_runs(model, args.methods, BENCH_METHODS),
        batch_size=args.batch_size,
        text_tokens=args.text_tokens,
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
        video_frames=args.video_frames,
    )
    print(format_table(results))
    if args.json:
        _write_json(args.json, {
            "model": args.model, "device": _device_name(device), "dtype": args.dtype, "batch_size": args.batch_size,
            "text_tokens": args.text_tokens, "video_frames": args.video_frames, "command": _command(args),
            "results": [r.as_dict() for r in results],
        })


def _bench_generate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .bench.generate import PATHS, bench_generate, format_table
    from .bench.run import synthetic_inputs
    from .bench.vision import calibrate_specs
    from .models.loading import load_model, resolve_device

    device = resolve_device(args.device)
    model, processor = load_model(args.model, device, args.dtype)
    batch_sizes = _batch_sizes(args.batch_sizes)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or set(paths) - set(PATHS):
        raise SlimVLMError(f"--paths {args.paths!r}: give a comma-separated subset of {', '.join(PATHS)}")
    out_dir = (Path(args.json).parent if args.json else Path(".")) / "thresholds"
    runs, calibrations = calibrate_specs(model, _method_runs(model, args.methods, GENERATE_METHODS),
                                         args.calibration_images, out_dir, processor)

    def save(results, quiet: bool = True) -> None:
        _write_json(args.json, {
            "model": args.model, "device": _device_name(device), "dtype": args.dtype, "text_tokens": args.text_tokens,
            "video_frames": args.video_frames, "new_tokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats, "versions": _versions(),
            "timed": "model.generate, greedy, exactly new_tokens new tokens; TTFT = when the first new token reaches "
                     "the host, in the same calls; medians of the repeats after warmup; first_call_ms = the first "
                     "call's whole time (compiling, graph captures); paths: eager = dynamic cache, static = "
                     "cache_implementation='static' (compiled decode)",
            "calibration": calibrations, "command": _command(args), "results": [r.as_dict() for r in results],
        }, quiet)

    results = bench_generate(
        model, runs,
        lambda b: synthetic_inputs(model, b, args.text_tokens, video_frames=args.video_frames),
        batch_sizes,
        paths, args.new_tokens, warmup=args.warmup, repeats=args.repeats, on_result=save if args.json else None,
        ideal=args.ideal,
    )
    print(format_table(results))
    if args.json:
        save(results, quiet=False)


def _command(args: argparse.Namespace) -> str:
    """The command as it was run, also when main() was called from Python with its own argv."""
    return "slimvlm " + shlex.join(args.argv)


def _versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _write_json(path: str, payload: dict, quiet: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    if not quiet:
        print(f"wrote {path}")


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SlimVLMError(f"{text!r} is not a comma-separated list of whole numbers, e.g. 1,32") from None


def _batch_sizes(text: str) -> list[int]:
    sizes = _int_list(text)
    if not sizes or min(sizes) < 1:
        raise SlimVLMError(f"--batch-sizes {text!r}: give batch sizes >= 1, e.g. 1,16,64")
    return sizes


def _bench_vision(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .bench.run import parse_methods
    from .bench.vision import bench_vision, calibrate_specs, format_table, scene_pixels
    from .models.loading import load_model, resolve_device

    device = resolve_device(args.device)
    model, processor = load_model(args.model, device, args.dtype)
    batch_sizes = _batch_sizes(args.batch_sizes)
    out_dir = (Path(args.json).parent if args.json else Path(".")) / "thresholds"
    runs, calibrations = calibrate_specs(model, parse_methods(args.methods), args.calibration_images, out_dir, processor)
    pixels = scene_pixels(model, max(batch_sizes), processor)
    results = bench_vision(model, runs, pixels, batch_sizes, warmup=args.warmup, repeats=args.repeats)
    print(format_table(results))
    if args.json:
        _write_json(args.json, {
            "model": args.model, "device": _device_name(device), "dtype": args.dtype,
            "timed": "vision tower (to its feature layer, stage-1 method included) + projector; test-split testbed scenes",
            "warmup": args.warmup, "repeats": args.repeats, "calibration": calibrations,
            "command": _command(args), "results": [r.as_dict() for r in results],
        })


def _bench_layer(args: argparse.Namespace) -> None:
    from .bench.layer import bench_layer, format_table
    from .models.loading import load_model, resolve_device

    device = resolve_device(args.device)
    model, _ = load_model(args.model, device, args.dtype)
    results = []
    for batch_size in _batch_sizes(args.batch_sizes):
        results += bench_layer(model, args.merge, batch_size, args.text_tokens, args.layer, args.warmup, args.repeats)
    print(format_table(results))
    if args.json:
        _write_json(args.json, {
            "model": args.model, "device": _device_name(device), "dtype": args.dtype, "text_tokens": args.text_tokens,
            "timed": f"LLM decoder layer {args.layer} alone, prefill, no KV cache", "warmup": args.warmup,
            "repeats": args.repeats, "command": _command(args), "results": [r.as_dict() for r in results],
        })


def _bench_train(args: argparse.Namespace) -> None:
    from .bench.train import bench_train, format_table, make_trainable, training_batch
    from .train.compiled import compile_llm_layers
    from .models.loading import load_model, resolve_device

    if args.compile and args.warmup < 1:
        raise SlimVLMError("--compile needs --warmup 1 or more: the first round compiles each recipe's shapes")
    device = resolve_device(args.device)
    model, _ = load_model(args.model, device, args.dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    make_trainable(model, args.lora)
    if args.compile:
        compile_llm_layers(model)
    batch = training_batch(model, args.batch_size, args.text_tokens, args.answer_tokens)
    results = bench_train(model, batch, args.p, args.slow_prob, args.steps, args.warmup, args.repeats, seed=args.seed)
    print(format_table(results))
    if args.json:
        _write_json(args.json, {
            "model": args.model, "device": _device_name(device), "dtype": args.dtype, "batch_size": args.batch_size,
            "text_tokens": args.text_tokens, "answer_tokens": args.answer_tokens, "lora": args.lora,
            "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile, "versions": _versions(),
            "timed": "one training step (DualSpeed.loss on the direct forward, backward, AdamW) under bf16 autocast on a "
                     "GPU: step_ms = median of --repeats rounds after --warmup, each round one step of every recipe and mode in turn (CUDA events); run_s = --steps steps in "
                     "the recipe's mode order, wall-clock between device synchronisations; expected speed-up = untouched "
                     "step / ((1 - r) fast + r slow)",
            "command": _command(args), "results": [r.as_dict() for r in results],
        })


def _eval(args: argparse.Namespace) -> None:
    from .bench.evaluate import evaluate, format_table, from_sample, load_jsonl, write_json
    from .bench.run import parse_methods
    from .models.loading import load_model, resolve_device
    from .registry import check_runs

    model, processor = load_model(args.model, resolve_device(args.device), args.dtype)
    if processor is None:
        raise SlimVLMError(f"{args.model} has no processor; eval needs a model folder with its processor")
    if args.data:
        items = load_jsonl(args.data)
    else:
        from .testbed.scenes import make_samples

        items = [from_sample(s) for s in make_samples(args.samples, seed=args.seed, split="test")]
    runs = parse_methods(args.methods)
    check_runs(model, runs)  # refuse a bad spec before spending time on the others
    if ["none"] in runs:
        runs = [["none"]] + [r for r in runs if r != ["none"]]
    results = [
        evaluate(model, processor, items, specs, batch_size=args.batch_size, keep_positions=args.keep_positions)
        for specs in runs
    ]
    print(format_table(results))
    if args.json:
        write_json(args.json, results, {"model": args.model, "data": args.data or "testbed", "command": _command(args)})
        print(f"wrote {args.json}")


def _export_testbed_task(args: argparse.Namespace) -> None:
    from .integrations.testbed_task import TASK, export_task

    if args.samples < 1:
        raise SlimVLMError(f"--samples {args.samples}: give at least 1 scene")
    path = export_task(args.out, args.samples, args.seed)
    print(f"wrote {path} and its {args.samples} scenes; run it with\n  python -m lmms_eval --include_path {args.out} "
          f"--tasks {TASK} --model slimvlm --model_args pretrained=testbed,methods=none")


def _demo(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .demo import demo_dtype, run_demo
    from .models.loading import load_model, resolve_device

    device = resolve_device(args.device)
    model, processor = load_model(args.model, device, demo_dtype(device) if args.dtype == "auto" else args.dtype)
    run_demo(model, processor, args.samples, Path(args.out), batch_size=args.batch_size, keep_positions=args.keep_positions)


def _calibrate(args: argparse.Namespace) -> None:
    from .methods.dymu import ImageFolder, calibrate_dymu, calibration_scenes, summary, token_counts
    from .models.loading import load_model, resolve_device

    if args.method != "dymu":
        raise SlimVLMError(
            f"calibrate makes thresholds for --method dymu only; {args.method!r} needs no calibration (give its options directly)"
        )
    for flag, value in (("--num-images", args.num_images), ("--batch-size", args.batch_size)):
        if value < 1:
            raise SlimVLMError(f"{flag}={value} must be at least 1")
    model, processor = load_model(args.model, resolve_device(args.device), args.dtype)
    if processor is None:
        raise SlimVLMError(f"{args.model} has no image processor; calibrate needs a model folder with its processor, or 'testbed'")
    images = calibration_scenes(args.num_images) if args.images == "testbed" else ImageFolder(args.images, args.num_images)
    thresholds = calibrate_dymu(model, images, args.target, batch_size=args.batch_size, processor=processor)
    if isinstance(images, ImageFolder) and images.skipped:
        print(f"skipped {images.skipped} files PIL cannot read")
    thresholds.save(args.out)
    print(f"dymu thresholds for target {args.target} patch tokens per image from {thresholds.images} images "
          f"(r per layer: {thresholds.schedule}):")
    print("  " + " ".join(f"{t:.4f}" for t in thresholds.thresholds))
    if args.check:
        counts = token_counts(model, thresholds, images, batch_size=args.batch_size, processor=processor)
        print(f"on these images they keep {summary(counts)} patch tokens per image")
    print(f"wrote {args.out}; use it with 'dymu:thresholds={args.out}'")


def _train(args: argparse.Namespace) -> None:
    from pathlib import Path

    import copy

    from .models.loading import load_model, resolve_device
    from .train import DualSpeed, dualspeed_trainer, llava_mini_trainer
    from .train.data import SceneCollator, training_scenes
    from .train.dualspeed import VARIANTS, variant
    from .train.recipe import freeze_vision, training_arguments

    device = resolve_device(args.device)
    model, processor = load_model(args.model, device, "float32")
    if processor is None:
        raise SlimVLMError(f"{args.model} has no processor; training on testbed scenes needs one")
    if args.method not in (*VARIANTS, "llava-mini"):
        raise SlimVLMError(f"slimvlm train knows {', '.join(VARIANTS)} and 'llava-mini', not {args.method!r}")
    if args.freeze_vision:
        freeze_vision(model)
    model.train()
    out = Path(args.out)
    saving = dict(save_strategy="steps", save_steps=args.save_steps, save_total_limit=2) if args.save_steps else {}
    training = training_arguments(out / "trainer", args.steps, args.batch_size, args.lr, args.seed, device, **saving)
    resume = last_checkpoint(out / "trainer") if args.resume else None
    data, collator = training_scenes(args.samples, args.seed), SceneCollator(processor, normalize_on_device=True)
    if args.method in VARIANTS:  # dualspeed, and the paper's baseline and naive pruning as its settings
        options = dict(pruner=args.pruner, r=args.r, isolator_length=args.isolator_length, lam=args.lam, tau=args.tau, seed=args.seed)
        dual = DualSpeed(model, **variant(args.method, **options))
        trainer = dualspeed_trainer(dual, training, data, collator, prepare_batch=collator.on_device)
        trainer.train(resume_from_checkpoint=resume)
        if dual.isolator is not None and trainer.is_world_process_zero():
            dual.save(out)
    elif args.method == "llava-mini":
        from .methods.llava_mini import LlavaMini

        method = LlavaMini(budget=args.budget, layers=args.layers)
        teacher = copy.deepcopy(model).eval() if args.distill else None  # the untouched model, before training
        trainer = llava_mini_trainer(method, model, training, data, collator, train_llm=not args.freeze_llm,
                                     teacher=teacher, prepare_batch=collator.on_device)
        trainer.train(resume_from_checkpoint=resume)
        if trainer.is_world_process_zero():
            method.save(out)
    if trainer.is_world_process_zero():  # under torchrun / accelerate launch, one rank writes
        model.save_pretrained(out)
        processor.save_pretrained(out)
        print(f"wrote {out}")


def last_checkpoint(folder) -> str:
    """The newest `checkpoint-<step>` in a training run's folder, for --resume."""
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if found is None:
        raise SlimVLMError(f"--resume: no checkpoint-<step> folder in {folder}; the first run needs --save-steps N")
    return found


def _methods(_args: argparse.Namespace) -> None:
    from .registry import PRESETS, families_taking, methods

    for name, info in methods().items():
        stages = ",".join(info["stages"]) or "-"
        print(f"{name:<10} [{stages}] {info['description']}")
        if info["options"]:
            print(" " * 11 + "options: " + ", ".join(f"{k}={v}" for k, v in info["options"].items()))
        taking, refusing = families_taking(name)
        print(" " * 11 + "families: " + ", ".join(taking) + (f" (refused: {', '.join(refusing)})" if refusing else ""))
    print("\npresets: " + ", ".join(f"{k} ({v})" for k, v in PRESETS.items()))
    print("\nfamilies as each method's defaults or first preset run; what each does there: docs/models.md")


def _make_tiny(args: argparse.Namespace) -> None:
    from .testbed.build import make_tiny

    print(f"saved a tiny random LLaVA model to {make_tiny(args.folder, seed=args.seed)}")


def _timing_options(command: argparse.ArgumentParser, warmup: int, repeats: int, json_help: str) -> None:
    """The options every timing command shares: warm-up and timed repeats, device, dtype, JSON output."""
    command.add_argument("--warmup", type=int, default=warmup)
    command.add_argument("--repeats", type=int, default=repeats)
    command.add_argument("--device", default="auto")
    command.add_argument("--dtype", default="float32")
    command.add_argument("--json", help=json_help)


VIDEO_FRAMES_HELP = ("each prompt holds a video of this many random frames in place of its image (LLaVA-NeXT-Video, "
                     "LLaVA-OneVision, Qwen2-VL, Qwen3-VL: even counts); 0: an image")
SHAPE_MODEL_HELP = ("local folder, 'testbed', or 'shape:llava-1.5-7b' | 'shape:llava-next-7b' | 'shape:llava-next-video-7b' "
                    "| 'shape:llava-onevision-7b' | 'shape:qwen2.5-vl-7b' | 'shape:qwen3-vl-8b' | 'shape:internvl3-8b' "
                    "| 'shape:gemma-3-12b' (random weights)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="slimvlm", description="Spend fewer visual tokens in VLMs, and measure it.")
    sub = root.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="tokens, FLOPs, KV-cache bytes and latency per method")
    bench.add_argument("--model", default="testbed", help=SHAPE_MODEL_HELP)
    bench.add_argument("--methods", default=BENCH_METHODS,
                       help="comma-separated specs; key=value continues the previous spec; '+' composes")
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--text-tokens", type=int, default=64)
    bench.add_argument("--new-tokens", type=int, default=8, help="decoded tokens for the per-token decode time (0: skip)")
    bench.add_argument("--video-frames", type=int, default=0, help=VIDEO_FRAMES_HELP)
    _timing_options(bench, warmup=2, repeats=5, json_help="write the results here")
    bench.set_defaults(run=_bench)

    generate = sub.add_parser("bench-generate", help="whole generate() time, TTFT, decode ms/token, tokens/s, peak memory "
                              "per method beside the untouched model, eager and static cache + compiled decode")
    generate.add_argument("--model", default="testbed", help=SHAPE_MODEL_HELP)
    generate.add_argument("--methods", default=GENERATE_METHODS,
                          help="comma-separated specs; '+' composes methods of different stages")
    generate.add_argument("--batch-sizes", default="1,16,64")
    generate.add_argument("--paths", default="eager,static", help="eager (dynamic cache) and/or static "
                          "(cache_implementation='static', decode compiled on a GPU)")
    generate.add_argument("--new-tokens", type=int, default=128)
    generate.add_argument("--text-tokens", type=int, default=64)
    generate.add_argument("--video-frames", type=int, default=0, help=VIDEO_FRAMES_HELP)
    generate.add_argument("--ideal", action="store_true",
                          help="also time each method's token-ideal: the untouched LLM fed its visual tokens as text, "
                               "no vision, no method, plus the untouched vision stages (ideal / measured in the table)")
    generate.add_argument("--calibration-images", type=int, default=32,
                          help="train-split testbed scenes for a dymu spec without thresholds=, calibrated here")
    _timing_options(generate, 1, 3, "write the results here (and calibrated thresholds beside it)")
    generate.set_defaults(run=_bench_generate)

    vision = sub.add_parser("bench-vision", help="time the vision tower + projector alone per stage-1 method (tokens out, FLOPs)")
    vision.add_argument("--model", default="testbed", help="local folder, 'testbed', or 'shape:llava-1.5-7b' (random weights)")
    vision.add_argument("--methods", default="none,tome:r=16,dymu-mid:vtu=false",
                        help="stage-1 specs as for bench; a dymu spec without thresholds= is calibrated here")
    vision.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes of test-split testbed scenes")
    vision.add_argument("--calibration-images", type=int, default=32, help="train-split scenes for a dymu calibration")
    _timing_options(vision, warmup=3, repeats=10, json_help="write the results here (and calibrated thresholds beside it)")
    vision.set_defaults(run=_bench_vision)

    layer = sub.add_parser("bench-layer", help="time one LLM layer: full sequence, merged sequence, merged + VTU")
    layer.add_argument("--model", default="testbed", help="local folder, 'testbed', or 'shape:llava-1.5-7b' (random weights)")
    layer.add_argument("--merge", default="tome:r=16", help="the stage-1 spec that merges the sequence")
    layer.add_argument("--layer", type=int, default=2, help="the decoder layer timed")
    layer.add_argument("--batch-sizes", default="1,16")
    layer.add_argument("--text-tokens", type=int, default=64)
    _timing_options(layer, warmup=3, repeats=10, json_help="write the results here")
    layer.set_defaults(run=_bench_layer)

    bench_train = sub.add_parser("bench-train", help="training-step time of the untouched recipe, NaivePrune and "
                                 "DualSpeed side by side (steps/s, samples/s, speed-up, peak memory)")
    bench_train.add_argument("--model", default="testbed", help=SHAPE_MODEL_HELP)
    bench_train.add_argument("--batch-size", type=int, default=16)
    bench_train.add_argument("--text-tokens", type=int, default=128, help="text tokens per sample around the image")
    bench_train.add_argument("--answer-tokens", type=int, default=64, help="the last text tokens, labelled")
    bench_train.add_argument("--p", type=float, default=0.9, help="pruning ratio of the fast mode (DivPrune)")
    bench_train.add_argument("--slow-prob", type=float, default=0.1, help="DualSpeed's slow-mode probability r")
    bench_train.add_argument("--lora", type=int, default=0, help="LoRA rank of the LLM's projections (peft); 0: train it in full")
    bench_train.add_argument("--gradient-checkpointing", action="store_true", help="as LLaVA's training recipes run")
    bench_train.add_argument("--compile", action="store_true",
                             help="torch.compile the parts of each LM decoder layer (attention, MLP, norms; "
                             "slimvlm.train.compile_llm_layers): fewer launches a step; needs --warmup >= 1")
    bench_train.add_argument("--steps", type=int, default=20, help="steps of each recipe's whole run")
    bench_train.add_argument("--seed", type=int, default=0)
    _timing_options(bench_train, warmup=2, repeats=5, json_help="write the results here")
    bench_train.set_defaults(run=_bench_train)

    evaluation = sub.add_parser("eval", help="accuracy and retention per method on testbed scenes or your own VQA JSONL")
    evaluation.add_argument("--model", default="testbed", help="'testbed' or a local model folder with its processor")
    evaluation.add_argument("--methods", default="none,tome:r=8,fastv:k=2,ratio=0.5,visionzip,divprune:budget=64")
    evaluation.add_argument("--samples", type=int, default=200, help="held-out testbed scenes (ignored with --data)")
    evaluation.add_argument("--data", help='a JSONL file of {"image": path, "question", "answer"} per line')
    evaluation.add_argument("--batch-size", type=int, default=16)
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--device", default="auto")
    evaluation.add_argument("--dtype", default="float32")
    evaluation.add_argument("--json", help="write the summary and one record per sample here")
    evaluation.add_argument("--keep-positions", action="store_true", default=None, help=KEEP_POSITIONS_HELP)
    evaluation.set_defaults(run=_eval)

    export = sub.add_parser("export-testbed-task", help="write the held-out testbed scenes as an lmms-eval task "
                            "(scenes file + task YAML) that runs offline")
    export.add_argument("out", help="the task folder to write (give it to lmms-eval's --include_path)")
    export.add_argument("--samples", type=int, default=200, help="held-out scenes, as slimvlm eval --samples")
    export.add_argument("--seed", type=int, default=0, help="as slimvlm eval --seed")
    export.set_defaults(run=_export_testbed_task)

    demo = sub.add_parser("demo", help="the main job: every method at two budgets on the testbed, table and plots")
    demo.add_argument("--model", default="testbed")
    demo.add_argument("--samples", type=int, default=200)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--out", default="reports/demo")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--keep-positions", action="store_true", help=KEEP_POSITIONS_HELP)
    demo.add_argument("--dtype", default="auto",
                      help="auto: bfloat16 on a CPU whose oneDNN runs it natively (AVX-512, AMX: 106 s against 155 s in "
                           "float32 on 2 cores), else float32; bfloat16's accuracies are within 4 points of float32's")
    demo.set_defaults(run=_demo)

    calibrate = sub.add_parser("calibrate", help="find DyMU's per-layer merge thresholds for a target token count")
    calibrate.add_argument("--model", default="testbed", help="local model folder (with its processor) or 'testbed'")
    calibrate.add_argument("--method", default="dymu", help="the method to calibrate (only dymu needs it)")
    calibrate.add_argument("--target", type=int, required=True,
                           help="average patch tokens per image after the encoder (CLS excluded), e.g. 89, 195, 394")
    calibrate.add_argument("--images", default="testbed", help="a folder of images (any PIL-readable files) or 'testbed'")
    calibrate.add_argument("--num-images", type=int, default=256, help="use at most this many images")
    calibrate.add_argument("--batch-size", type=int, default=16, help="images whose merges are ranked together")
    calibrate.add_argument("--out", required=True, help="the JSON file to write")
    calibrate.add_argument("--check", action="store_true", help="then report the tokens the thresholds keep on the same images")
    calibrate.add_argument("--device", default="auto")
    calibrate.add_argument("--dtype", default="float32")
    calibrate.set_defaults(run=_calibrate)

    train = sub.add_parser("train", help="train with fewer tokens on testbed scenes: dualspeed or llava-mini")
    train.add_argument("--method", required=True,
                       help="'dualspeed', 'llava-mini', or DualSpeed's comparison runs: 'baseline' (all tokens, plain CE: "
                            "r=1, lam=0, no isolator) and 'naive-pruning' (always the pruner's tokens: r=0, no isolator)")
    train.add_argument("--model", default="testbed")
    train.add_argument("--out", required=True, help="folder for the model, processor and the method's weights")
    train.add_argument("--samples", type=int, default=2000, help="training scenes (train split)")
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument("--pruner", default="divprune:ratio=0.1", help="dualspeed: the fast mode's pruner")
    train.add_argument("--r", "--slow-prob", dest="r", type=float, default=0.1,
                       help="dualspeed: probability of a slow step (spell it --slow-prob after torchrun, whose parser takes --r for its own)")
    train.add_argument("--isolator-length", type=int, default=4, help="dualspeed: mode-isolator tokens (0: none)")
    train.add_argument("--lam", type=float, default=1.0)
    train.add_argument("--tau", type=float, default=1.0)
    train.add_argument("--budget", type=int, default=64, help="llava-mini: visual tokens per image")
    train.add_argument("--layers", type=int, default=4, help="llava-mini: pre-fusion layers")
    train.add_argument("--freeze-llm", action="store_true", help="llava-mini: train only its modules")
    train.add_argument("--distill", action="store_true",
                       help="llava-mini: add KL from the untouched model on the answer (off: it trailed on the testbed)")
    train.add_argument("--freeze-vision", action="store_true", help="freeze the vision encoder (as LLaVA instruction tuning)")
    train.add_argument("--save-steps", type=int, default=0,
                       help="write a checkpoint (safetensors + JSON) to OUT/trainer/checkpoint-<step> every N steps (0: none)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in OUT/trainer, with the same settings")
    train.set_defaults(run=_train)

    listing = sub.add_parser("methods", help="list methods, their stages and options")
    listing.set_defaults(run=_methods)

    tiny = sub.add_parser("make-tiny", help="save a tiny random LLaVA model (for tests and trying the CLI)")
    tiny.add_argument("folder")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_make_tiny)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return exit_code(lambda: args.run(args), "slimvlm")


if __name__ == "__main__":
    raise SystemExit(main())
