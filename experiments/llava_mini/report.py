"""Tables, plots and model cards from LLaVA-Mini runs (experiments/llava_mini/train.py) and the training-free
methods' scores at the same budgets (`slimvlm eval --json`).

    python -m experiments.llava_mini.report --runs RUN.json [RUN.json ...] --baselines BASELINES.json --out DIR

Writes DIR/results.md (every student's held-out accuracy by question type, samples and time), DIR/curves.png
(held-out accuracy against samples seen, per student and budget) and DIR/accuracy_vs_tokens.png (accuracy against
visual tokens per image at 1, 4, 16, 64: llava-mini beside the training-free methods, the untouched model a line).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from experiments.figures import pct, plt, save
from slimvlm.testbed.scenes import QUESTION_TYPES

BUDGETS = (1, 4, 16, 64)
FAMILIES = ("divprune", "visionzip", "pool", "random")


def baseline_points(baselines: dict) -> tuple[float, dict[str, list[tuple[float, float]]]]:
    """(the untouched accuracy, per training-free family its (tokens per image, accuracy) points)."""
    points: dict[str, list[tuple[float, float]]] = {name: [] for name in FAMILIES}
    untouched = None
    for row in baselines["summary"]:
        name = row["method"].split(":")[0]
        if name == "none":
            untouched = row["accuracy"]
        elif name in points:
            points[name].append((row["visual_tokens_mean"], row["accuracy"]))
    return untouched, {name: sorted(values) for name, values in points.items()}


def student_rows(runs: list[dict]) -> list[dict]:
    return [{**student, "run": run["settings"]["command"]} for run in runs for student in run["students"]]


def untouched_row(baselines: dict) -> dict:
    row = next(r for r in baselines["summary"] if r["method"] == "none")
    return {"accuracy": row["accuracy"], "per_type": row["accuracy_by_type"]}


def scored(row: dict) -> tuple[float, dict, str]:
    """(accuracy, per type, how): the generate() score where the run reached it, else its last learning-curve
    point (teacher-forced first answer token, overall only)."""
    if row.get("accuracy") is not None:
        return row["accuracy"], row.get("per_type") or {}, "generate()"
    return row["curve"][-1]["accuracy"], {}, "teacher-forced"


def table(runs: list[dict], untouched: dict) -> str:
    types = [t for t in QUESTION_TYPES if t in untouched["per_type"]]
    lines = ["| student | C | trained | samples | " + " | ".join(types) + " | overall % | scored by | clips % |",
             "| --- | ---: | --- | ---: | " + " | ".join("---:" for _ in types) + " | ---: | --- | ---: |",
             "| untouched | 576 | - | - | " + " | ".join(pct(untouched["per_type"][t]) for t in types)
             + f" | {pct(untouched['accuracy'])} | generate() | {pct(untouched.get('clips'))} |"]
    for row in student_rows(runs):
        trained = ("modules + projector + LLM" if row["train_llm"] else "modules") + (" + distillation" if row["distill"] else "")
        if row.get("shared_with"):
            trained += f" (one model for C = {', '.join(map(str, sorted([row['budget'], *row['shared_with']])))})"
        accuracy, per_type, how = scored(row)
        lines.append(f"| {row['name']} | {row['budget']} | {trained} | {row['samples']:,} | "
                     + " | ".join(pct(per_type.get(t)) for t in types)
                     + f" | **{pct(accuracy)}** | {how} | {pct(row.get('clips'))} |")
    return "\n".join(lines)


def plot_curves(runs: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, run in enumerate(runs):
        for student in run["students"]:
            points = [(p["samples"], 100 * p["accuracy"]) for p in student["curve"]]
            ax.plot(*zip(*points), marker="o", markersize=3,
                    label=f"run {index + 1}: {student['name']} C={student['budget']}")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("held-out accuracy % (first answer token, teacher-forced)")
    return save(fig, ax, path, legend_size=7)


def plot_tokens(runs: list[dict], baselines: dict, path: Path) -> Path:
    untouched, points = baseline_points(baselines)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in points.items():
        if values:
            ax.plot([t for t, _ in values], [100 * a for _, a in values], marker="s", label=name)
    best: dict[int, float] = {}
    for row in student_rows(runs):
        best[row["budget"]] = max(best.get(row["budget"], 0.0), scored(row)[0])
    ax.plot(sorted(best), [100 * best[b] for b in sorted(best)], marker="o", linewidth=2.5, label="llava-mini (best student)")
    ax.axhline(100 * untouched, color="black", linestyle="--", label=f"untouched, 576 tokens ({100 * untouched:.1f}%)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
    ax.set_xlabel("visual tokens per image")
    ax.set_ylabel("held-out accuracy % (400 scenes)")
    return save(fig, ax, path, legend_size=8)


def curve_from_log(text: str) -> list[dict]:
    """The learning-curve points a runner's log prints ('step S (N samples): name cC 12.3, ...'), for runs whose
    results.json was not written."""
    points = []
    for step, samples, rest in re.findall(r"^step (\d+) \((\d+) samples\): (.*)$", text, flags=re.M):
        for name, budget, accuracy in re.findall(r"(\S+?)(?: c(\d+))? ([\d.]+)(?:, |$)", rest):
            points.append({"step": int(step), "samples": int(samples), "name": name, "accuracy": float(accuracy) / 100})
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.llava_mini.report")
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--baselines", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    baselines = json.loads(Path(args.baselines).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    untouched = {**untouched_row(baselines), "clips": next((r["untouched"]["clips"] for r in runs if r.get("untouched")), None)}
    plot_curves(runs, out / "curves.png")
    plot_tokens(runs, baselines, out / "accuracy_vs_tokens.png")
    (out / "results.md").write_text(table(runs, untouched) + "\n")
    print(table(runs, untouched))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
