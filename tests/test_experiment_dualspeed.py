"""The DualSpeed experiment (baseline / naive pruning / DualSpeed) on the tiny model, and the two
comparison runs as DualSpeed settings."""

import json

import pytest
import torch

from conftest import images
from slimvlm.api import apply
from slimvlm.cli import main as cli_main
from slimvlm.errors import SlimVLMError
from slimvlm.testbed.build import format_prompt, load
from slimvlm.train.dualspeed import VARIANTS, DualSpeed, variant
from slimvlm.train.experiment_dualspeed import freeze_vision, main


def _labelled_batch(processor, image_token_id):
    prompts = [format_prompt("what color is the circle ?") + " red", format_prompt("is there a square ?") + " yes"]
    inputs = processor(images=images(2, seed=1), text=prompts, return_tensors="pt", padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == image_token_id, -100)
    inputs["labels"] = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    return dict(inputs)


def test_baseline_and_naive_pruning_are_exactly_the_plain_losses(tiny):
    model, processor = tiny
    batch = _labelled_batch(processor, model.config.image_token_id)
    options = dict(pruner="divprune:budget=16", r=0.1, isolator_length=4, lam=1.0, tau=1.0)
    with torch.no_grad():
        plain = model(**batch).loss
        handle = apply(model, "divprune:budget=16")
        try:
            pruned = model(**batch).loss
        finally:
            handle.remove()
        baseline = DualSpeed(model, **variant("baseline", **options))
        naive = DualSpeed(model, **variant("naive-pruning", **options))
        for step in range(20):  # every step of the run, not just one
            loss, info = baseline.loss(batch, step)
            assert info["mode"] == "slow" and info["kl"] == 0.0
            torch.testing.assert_close(loss, plain)
            loss, info = naive.loss(batch, step)
            assert info["mode"] == "fast"
            torch.testing.assert_close(loss, pruned)
    assert plain != pruned
    assert baseline.parameters() == [] and naive.parameters() == []  # no isolator: nothing new to train
    assert naive.inference_method() is naive.pruner and baseline.inference_method().name == "none"
    with pytest.raises(SlimVLMError, match="nothing to save"):
        naive.save("/nonexistent")
    with pytest.raises(SlimVLMError, match="unknown DualSpeed run"):
        variant("fast-only")
    with pytest.raises(SlimVLMError, match="stage 2"):
        DualSpeed(model, pruner="fastv", isolator_length=0)
    assert set(VARIANTS) == {"baseline", "naive-pruning", "dualspeed"}


def test_freeze_vision_leaves_projector_and_llm_trainable(tiny_dir):
    model, _ = load(tiny_dir)
    frozen = freeze_vision(model)
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert frozen == vision > 0
    assert all(not p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())


def test_train_cli_selects_naive_pruning(tiny_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--samples", "4", "--steps", "1", "--batch-size", "2", "--device", "cpu"]
    out = tmp_path / "naive"
    assert cli_main(["train", "--method", "naive-pruning", "--pruner", "divprune:budget=16", "--freeze-vision", "--out", str(out), *common]) == 0
    assert (out / "model.safetensors").exists() and not (out / "dualspeed_isolator.safetensors").exists()
    trained, _ = load(out)
    original, _ = load(tiny_dir)
    vision = [torch.equal(a, b) for a, b in zip(trained.model.vision_tower.parameters(), original.model.vision_tower.parameters())]
    projector = [torch.equal(a, b) for a, b in zip(trained.model.multi_modal_projector.parameters(), original.model.multi_modal_projector.parameters())]
    assert all(vision) and not all(projector)  # frozen encoder, trained projector


def test_experiment_writes_three_comparable_runs(tiny_dir, tmp_path):
    out = tmp_path / "exp"
    steps, warmup = 4, 1
    argv = ["--model", str(tiny_dir), "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--samples", "4",
            "--warmup", str(warmup), "--eval-samples", "4", "--eval-batch-size", "4", "--pruner", "divprune:ratio=0.1",
            "--device", "cpu"]
    assert main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["command"].startswith("python -m slimvlm.train.experiment_dualspeed ") and "--steps 4" in payload["command"]
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
