"""The table and plot of a DualSpeed testbed run (experiments/dualspeed/testbed.py's results.json): per run its
training time and speed-up against the baseline at the same samples, its held-out accuracy with all tokens (and
that as a share of the baseline's: what DualSpeed keeps, target >= 99%) and with pruned tokens; and speed-up
against full-token retention, one point per run (the p x r sweep with the paper's three runs).

    python -m experiments.dualspeed.report --results OUT/results.json --out DIR

Writes DIR/results.md and DIR/speedup_vs_retention.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.figures import pct, plt, save


def rows(results: dict) -> list[dict]:
    """Per run: name, steps (fast / slow), samples, train_s, samples/s, speed-up and full-token retention against
    the first run (the baseline), full-token and pruned accuracy."""
    runs = results["runs"]
    if not runs or runs[0]["run"] != "baseline":
        raise ValueError("the results hold no baseline run first: speed-up and retention are measured against it")
    base = runs[0]
    return [{
        "run": run["run"], "fast_steps": run["fast_steps"], "slow_steps": run["slow_steps"], "samples": run["samples"],
        "train_s": run["train_s"], "samples_per_s": run["samples_per_s"],
        "speedup": base["train_s"] / run["train_s"] * run["samples"] / base["samples"],
        "retention": run["full"] / base["full"], "full": run["full"], "pruned": run["pruned"],
    } for run in runs]


def table(results: dict) -> str:
    settings = results["settings"]
    lines = [f"DualSpeed on the testbed ({settings['device']}): `{settings['command']}`", "",
             "| run | fast / slow steps | samples | train s | samples/s | speed-up | full-token % | retention % | pruned % |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows(results):
        lines.append(f"| {row['run']} | {row['fast_steps']} / {row['slow_steps']} | {row['samples']} | {row['train_s']:.2f} "
                     f"| {row['samples_per_s']:.0f} | {row['speedup']:.2f}x | {pct(row['full'])} | {pct(row['retention'])} "
                     f"| {pct(row['pruned'])} |")
    lines += ["", "Speed-up: the baseline's training time over the run's, at the same samples. Retention: full-token "
              "accuracy over the baseline's. Pruned: the run's fast mode at inference (pruner + isolator for DualSpeed, "
              "the pruner alone for the others; the baseline has no pruner, so its two scores are one)."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows(results):
        ax.scatter(row["speedup"], 100 * row["retention"], marker="s" if row["run"] == "baseline" else "o")
        ax.annotate(row["run"], (row["speedup"], 100 * row["retention"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.axhline(99, color="black", linestyle="--", label="99% of the baseline's full-token accuracy")
    ax.axvline(2.0, color="gray", linestyle=":", label="2.0x")
    ax.set_xlabel("training speed-up against the baseline (same samples)")
    ax.set_ylabel("full-token accuracy, % of the baseline's")
    return save(fig, ax, path, legend_size=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.dualspeed.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="a results.json of experiments.dualspeed.testbed")
    parser.add_argument("--out", required=True, help="folder for results.md and speedup_vs_retention.png")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table(results))
    plot(results, out / "speedup_vs_retention.png")
    print(f"wrote {out / 'results.md'} and {out / 'speedup_vs_retention.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
