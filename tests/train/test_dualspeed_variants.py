"""The DualSpeed paper's two comparison runs (baseline, naive pruning) as DualSpeed settings, and
`slimvlm train` choosing them."""

import pytest
import torch

from conftest import images
from slimvlm.api import apply
from slimvlm.cli import main as cli_main
from slimvlm.errors import SlimVLMError
from slimvlm.testbed.build import format_prompt, load
from slimvlm.train.dualspeed import VARIANTS, DualSpeed, variant


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
