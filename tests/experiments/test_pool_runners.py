"""The runners that train on the device-held scene pool: DualSpeed's three runs and LLaVA-Mini's students, end to
end on the tiny model, and the shipping of what they train."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from experiments.dualspeed import testbed as dualspeed_runner
from experiments.llava_mini import ship
from experiments.llava_mini import train as llava_mini_runner
from experiments.scene_pool import render_pool
from slimvlm.methods.llava_mini import SHIPPED, SHIPPED_MODEL, shipped_weights
from slimvlm.testbed.build import load

SMALL = ["--device", "cpu", "--scenes", "8", "--scenes-per-batch", "4", "--samples", "24", "--eval-samples", "4",
         "--eval-batch-size", "4", "--workers", "0"]


def test_the_pool_holds_each_scene_with_its_questions(tiny_dir):
    import torch

    _, processor = load(tiny_dir)
    pool = render_pool(processor, 6, torch.device("cpu"), workers=0)
    assert pool.pixels.shape[0] == 6 and pool.input_ids.shape[0] == 18 and pool.span.length == 576
    first, second = next(pool.batches(2, seed=3)), next(pool.batches(2, seed=3))
    assert torch.equal(first["input_ids"], second["input_ids"])  # a seed gives every run the same batches
    assert first["image_index"].tolist() == [0, 0, 0, 1, 1, 1] and first["image_start"] == pool.span.start


def test_dualspeed_runs_the_three_recipes_on_the_same_batches(tiny_dir, tmp_path):
    assert dualspeed_runner.main(["--model", str(tiny_dir), "--out", str(tmp_path), "--max-runs", "3", *SMALL]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["run"] for r in runs] == ["baseline", "naive p=0.9", "dualspeed p=0.9 r=0.1"]
    baseline, naive, dual = runs
    assert baseline["slow_steps"] == baseline["steps"] == 2 and naive["fast_steps"] == 2
    assert dual["fast_steps"] + dual["slow_steps"] == 2 and "pruner_alone" in dual
    assert all(0 <= r["full"] <= 1 and 0 <= r["pruned"] <= 1 for r in runs)


def test_compiled_runs_warm_each_mode_off_the_clock_and_train_as_eager_ones(tiny_dir, tmp_path, monkeypatch):
    """--compile: every run's LM compiled (here recorded, not compiled) and warmed by one step of each mode it will
    take, on other batches, with no optimizer step: the runs train and score exactly as the eager ones."""
    compiled, warm_modes = [], []
    monkeypatch.setattr(dualspeed_runner, "compile_llm_layers", compiled.append)
    warm = dualspeed_runner.warm_compiled

    def recording_warm(dual, *args):
        before = {name: p.detach().clone() for name, p in dual.model.named_parameters()}
        loss = dual.loss
        dual.loss = lambda batch, step, details: (warm_modes.append(dual.step_mode(step)), loss(batch, step, details))[1]
        warm(dual, *args)
        del dual.loss
        assert all(torch.equal(p, before[name]) and p.grad is None for name, p in dual.model.named_parameters())

    monkeypatch.setattr(dualspeed_runner, "warm_compiled", recording_warm)
    small = [*SMALL, "--samples", "48", "--r", "0.5", "--max-runs", "3"]
    assert dualspeed_runner.main(["--model", str(tiny_dir), "--out", str(tmp_path / "eager"), *small]) == 0
    assert dualspeed_runner.main(["--model", str(tiny_dir), "--out", str(tmp_path / "compiled"), *small, "--compile"]) == 0
    eager, timed = ([{k: v for k, v in r.items() if k not in ("train_s", "samples_per_s", "peak_gb")} for r in
                     json.loads((tmp_path / name / "results.json").read_text())["runs"]] for name in ("eager", "compiled"))
    assert timed == eager and len(compiled) == 3
    dual = eager[2]
    taken = {mode for mode in ("fast", "slow") if dual[f"{mode}_steps"]}
    assert dual["fast_steps"] and dual["slow_steps"]  # r = 0.5 over 4 steps: both modes to warm
    assert warm_modes[:2] == ["slow", "fast"] and sorted(warm_modes[2:]) == sorted(taken)  # baseline, naive, dualspeed


def test_llava_mini_students_train_side_by_side_and_ship(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--model", str(tiny_dir), "--out", str(out), "--students", "c1+c4,c1:frozen", "--layers", "1",
            "--clip-samples", "0", "--eval-every", "12", *SMALL]
    assert llava_mini_runner.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(s["name"], s["budget"]) for s in results["students"]] == [("c1+c4", 1), ("c1+c4", 4), ("c1:frozen", 1)]
    shared = results["students"][0]
    assert shared["shared_with"] == [4] and [p["samples"] for p in shared["curve"]] == [0, 12, 24]
    assert (out / "c1-c4" / "model_trained_parts.safetensors").is_file()  # one model for both budgets
    assert not (out / "c1-frozen" / "model_trained_parts.safetensors").exists()  # the modules alone trained

    folder = tmp_path / "folder"
    shutil.copytree(tiny_dir, folder)
    assert ship.main(["--folder", str(folder), "--model", str(out / "c1-c4" / "model_trained_parts.safetensors"),
                      "--modules", f"1={out / 'c1-c4' / 'c1' / 'llava_mini.safetensors'}",
                      f"4={out / 'c1-c4' / 'c4' / 'llava_mini.safetensors'}", "--run", str(out / "results.json"),
                      "--layers", "1", "--eval-samples", "4", "--clip-samples", "0", "--batch-size", "4"]) == 0
    assert sorted(shipped_weights(folder)) == [1, 4] and (folder / SHIPPED / SHIPPED_MODEL).is_file()
    card = (folder / SHIPPED / "c4" / "README.md").read_text()
    assert "one model for C = 1, 4" in card and "| **overall** |" in card and "experiments.llava_mini.train" in card

    # a second stage starts from what the folder ships: its modules and the model they were trained with
    again = tmp_path / "again"
    common = ["--model", str(folder), "--out", str(again), "--layers", "1", "--clip-samples", "0", "--continue-shipped",
              *SMALL, "--samples", "0"]  # no step: the students are saved as they start
    assert llava_mini_runner.main([*common, "--students", "c1+c4"]) == 0
    for budget in (1, 4):
        shipped_file = load_file(str(folder / SHIPPED / f"c{budget}" / "llava_mini.safetensors"))
        started = load_file(str(again / "c1-c4" / f"c{budget}" / "llava_mini.safetensors"))
        assert shipped_file.keys() == started.keys() and all(torch.equal(shipped_file[k], started[k]) for k in started)
    trained = load_file(str(folder / SHIPPED / SHIPPED_MODEL))
    assert all(torch.equal(trained[k], t) for k, t in load_file(str(again / "c1-c4" / "model_trained_parts.safetensors")).items())
    assert json.loads((again / "results.json").read_text())["students"][0]["continued_from"] == str(folder)
    with pytest.raises(SystemExit, match=r"ships no LLaVA-Mini modules for C = 2 \(it ships C = \[1, 4\]\)"):
        llava_mini_runner.main([*common, "--students", "c2"])
