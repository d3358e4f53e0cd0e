"""Put trained LLaVA-Mini weights into a model folder as slimvlm ships them, score them there, write their cards.

    python -m experiments.llava_mini.ship --folder src/slimvlm/testbed/weights --model MODEL.safetensors \
        --modules 1=C1.safetensors 16=C16.safetensors --run RESULTS.json

--model: the projector and LLM trained with the modules (the runner's model_trained_parts.safetensors), which
becomes llava_mini/model.safetensors; --modules: each budget's modules (llava_mini.safetensors), saved again
into llava_mini/c<C>/ with their identity and the signature of the projector they were trained with. Each
budget is then scored as the demo scores it (slimvlm.methods.llava_mini.shipped_model + slimvlm.apply +
generate(), on held-out scenes and 4-frame clips) and gets a card, llava_mini/c<C>/README.md, with those
numbers, the training record from --run and the commands.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from slimvlm.bench.evaluate import evaluate, from_sample
from slimvlm.methods.llava_mini import SHIPPED, SHIPPED_MODEL, LlavaMini, shipped_model
from slimvlm.models.loading import load_model
from slimvlm.testbed.clips import make_clip_samples
from slimvlm.testbed.scenes import QUESTION_TYPES, make_samples


def install(folder: Path, model_file: Path | None, modules: dict[int, Path], layers: int) -> dict[int, Path]:
    root = folder / SHIPPED
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if model_file is not None:
        shutil.copyfile(model_file, root / SHIPPED_MODEL)
    model = shipped_model(folder)
    placed = {}
    for budget, path in sorted(modules.items()):
        method = LlavaMini(budget=budget, layers=layers, init="random")
        built = method.build(model)
        built.load_state_dict({k: v.to(torch.float32) for k, v in load_file(str(path)).items()})
        placed[budget] = method.save(root / f"c{budget}", torch.bfloat16)
    return placed


def card(budget: int, scored, clips, untouched, clip_untouched, run: dict | None, command: str) -> str:
    rows = [f"| {t} | {100 * untouched.accuracy_by_type()[t]:.1f} | {100 * scored.accuracy_by_type()[t]:.1f} |"
            for t in QUESTION_TYPES if t in scored.accuracy_by_type()]
    trained = next((s for s in (run or {}).get("students", []) if s["budget"] == budget), None)
    lines = [f"# LLaVA-Mini modules, C = {budget}, for the testbed model", "",
             f"A compressor of {budget} learnable quer{'y' if budget == 1 else 'ies'} over the projected visual tokens "
             "and 4 modality pre-fusion layers (slimvlm/methods/llava_mini.py). They run on the testbed model with "
             f"`../{SHIPPED_MODEL}` over it: the projector and LLM trained with them (the vision tower frozen).", "",
             "```python", "from slimvlm.methods.llava_mini import shipped_model",
             "model = shipped_model(TESTBED_FOLDER)", 'slimvlm.apply(model, "llava-mini:weights=THIS_FOLDER")', "```", "",
             "`slimvlm demo` runs it beside the other methods.", ""]
    if trained:
        settings = run["settings"]
        together = [trained["budget"], *trained.get("shared_with", [])]
        lines += ["## Training", "",
                  f"- {trained['samples']:,} train-split samples ({trained['steps']} steps of {settings['scenes_per_batch']} "
                  f"scenes x 3 questions) in {settings['train_seconds']} s on {settings['device']}"
                  + (f", one model for C = {', '.join(map(str, sorted(together)))} (their losses summed)" if len(together) > 1 else "")
                  + ".", f"- AdamW, lr {settings['lr']} (modules) / {settings['llm_lr']} (projector and LLM), warm-up "
                  f"{settings['warmup']} steps then cosine to 10%; bf16 autocast; distillation "
                  f"{'on' if trained['distill'] else 'off'}; started as `pool:budget={budget}` (init lm-silenced).",
                  f"- Command: `{settings['command']}`", ""]
    lines += [f"## Held-out accuracy ({len(scored.records)} test-split scenes, seed 0; generate(), weights as shipped)", "",
              "| question type | untouched (576 tokens) % | C = " + str(budget) + " % |", "| --- | ---: | ---: |", *rows,
              f"| **overall** | {100 * untouched.accuracy:.1f} | **{100 * scored.accuracy:.1f}** "
              + (f"(retention {100 * scored.accuracy / untouched.accuracy:.1f}) |" if untouched.accuracy else "|"), ""]
    if clips is not None:
        lines += [f"Clips of 4 frames ({len(clips.records)}): {100 * clips.accuracy:.1f}% with {budget} token(s) per frame, "
                  f"the untouched model {100 * clip_untouched.accuracy:.1f}% on the same clips.", ""]
    lines += [f"Scored by: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.llava_mini.ship")
    parser.add_argument("--folder", default="src/slimvlm/testbed/weights")
    parser.add_argument("--model", help="the projector and LLM trained with the modules (none: the folder's own)")
    parser.add_argument("--modules", nargs="+", required=True, help="BUDGET=FILE.safetensors ...")
    parser.add_argument("--run", help="the runner's results.json, for the cards' training record")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--eval-samples", type=int, default=400)
    parser.add_argument("--clip-samples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    command = "python -m experiments.llava_mini.ship " + shlex.join(sys.argv[1:] if argv is None else argv)
    folder = Path(args.folder)
    modules = {int(b): Path(p) for b, p in (item.split("=", 1) for item in args.modules)}
    placed = install(folder, Path(args.model) if args.model else None, modules, args.layers)
    run = json.loads(Path(args.run).read_text()) if args.run else None
    base, processor = load_model(str(folder), torch.device("cpu"))
    own = shipped_model(folder)
    items = [from_sample(s) for s in make_samples(args.eval_samples, seed=0, split="test")]
    clips = [from_sample(s) for s in make_clip_samples(args.clip_samples, seed=0, split="test", frames=4)] if args.clip_samples else []
    untouched = evaluate(base, processor, items, "none", batch_size=args.batch_size)
    clip_untouched = evaluate(base, processor, clips, "none", batch_size=max(1, args.batch_size // 4)) if clips else None
    summary = {"untouched": untouched.accuracy, "clips_untouched": clip_untouched.accuracy if clips else None}
    for budget, path in placed.items():
        scored = evaluate(own, processor, items, f"llava-mini:weights={path}", batch_size=args.batch_size)
        clip_scored = evaluate(own, processor, clips, f"llava-mini:weights={path}",
                               batch_size=max(1, args.batch_size // 4)) if clips else None
        (path / "README.md").write_text(card(budget, scored, clip_scored, untouched, clip_untouched, run, command))
        summary[f"c{budget}"] = {"accuracy": scored.accuracy, "per_type": scored.accuracy_by_type(),
                                 "clips": clip_scored.accuracy if clip_scored else None}
        print(f"C={budget}: {100 * scored.accuracy:.1f}% (untouched {100 * untouched.accuracy:.1f}%)", flush=True)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
