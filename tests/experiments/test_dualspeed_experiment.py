"""The DualSpeed experiment (baseline / naive pruning / DualSpeed) on the tiny model."""

import json

import pytest

from experiments.dualspeed import main


def test_experiment_writes_three_comparable_runs(tiny_dir, tmp_path):
    out = tmp_path / "exp"
    steps, warmup = 4, 1
    argv = ["--model", str(tiny_dir), "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--samples", "4",
            "--warmup", str(warmup), "--eval-samples", "4", "--eval-batch-size", "4", "--pruner", "divprune:ratio=0.1",
            "--device", "cpu"]
    assert main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["command"].startswith("python -m experiments.dualspeed ") and "--steps 4" in payload["command"]
    runs = {run["run"]: run for run in payload["runs"]}
    assert [run["run"] for run in payload["runs"]] == ["baseline", "naive-pruning", "dualspeed"]
    assert payload["settings"]["distinct_batches"] == 2 and payload["settings"]["train_vision"] is False
    for run in runs.values():
        assert run["timed_steps"] == steps - warmup
        assert 0 < run["train_wall_s"] <= run["train_wall_all_steps_s"]
        assert run["steps_per_s"] == pytest.approx(run["timed_steps"] / run["train_wall_s"])
        assert run["slow_steps"] + run["fast_steps"] == steps
        assert 0.0 <= run["full_acc"] <= 1.0 and 0.0 <= run["pruned_acc"] <= 1.0
        assert run["visual_tokens_full"] == 576
        assert run["speedup"] == pytest.approx(runs["baseline"]["train_wall_s"] / run["train_wall_s"])
        assert run["first_logged_loss"] is not None and run["last_logged_loss"] is not None
    assert runs["baseline"]["slow_steps"] == steps and runs["naive-pruning"]["fast_steps"] == steps
    assert runs["baseline"]["speedup"] == 1.0
    # DivPrune at 10% keeps 58 of 576; DualSpeed's pruned inference adds its 4 isolator tokens
    assert runs["baseline"]["visual_tokens_pruned"] == runs["naive-pruning"]["visual_tokens_pruned"] == 58
    assert runs["dualspeed"]["visual_tokens_pruned"] == 62 and runs["dualspeed"]["pruned_method"].startswith("dualspeed-isolator")
    assert runs["dualspeed"]["pruned_acc_no_isolator"] is not None and runs["naive-pruning"]["pruned_acc_no_isolator"] is None
    assert runs["dualspeed"]["trainable_parameters"] == runs["baseline"]["trainable_parameters"] + 4 * 64
    # on a CPU the step is compute-bound: a tenth of the visual tokens must train faster
    assert runs["naive-pruning"]["speedup"] > 1.0
    assert (out / "dualspeed" / "dualspeed_isolator.safetensors").exists()
    assert not (out / "baseline").exists() and not (out / "naive-pruning").exists()
    table = (out / "results.md").read_text()
    assert payload["command"] in table and table.count("\n| ") == 5  # header, rule, three runs
    assert set(payload["answers"]) == {"naive pruning loses full-token accuracy",
                                       "DualSpeed keeps >= 99% of baseline at >= 2x training speed"}
