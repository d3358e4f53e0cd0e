"""DualSpeed (slimvlm.train): mode choice, fast/slow losses, the isolator's gradient and file."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, select

import slimvlm
from slimvlm.errors import SlimVLMError
from slimvlm.train import DualSpeed
from slimvlm.train.dualspeed import ISOLATOR_FILE


def labelled(model, inputs: dict) -> dict:
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    return {**inputs, "labels": labels}


def step_of(ds: DualSpeed, mode: str) -> int:
    return next(step for step in range(10_000) if ds.step_mode(step) == mode)


def test_mode_choice_is_deterministic_and_about_r(fresh):
    model, _ = fresh
    ds = DualSpeed(model, r=0.1, seed=3)
    modes = [ds.step_mode(step) for step in range(1000)]
    assert set(modes) == {"fast", "slow"}
    assert 0.07 <= modes.count("slow") / 1000 <= 0.13
    assert modes == [ds.step_mode(step) for step in range(1000)]
    # another rank, another instance, same seed: the same modes without communicating
    other_rank = DualSpeed(model, r=0.1, seed=3)
    assert modes == [other_rank.step_mode(step) for step in range(1000)]
    assert modes != [DualSpeed(model, r=0.1, seed=4).step_mode(step) for step in range(1000)]
    assert all(DualSpeed(model, r=0.0).step_mode(s) == "fast" for s in range(100))
    assert all(DualSpeed(model, r=1.0).step_mode(s) == "slow" for s in range(100))


def test_isolator_tokens_enter_the_llm(fresh):
    model, processor = fresh
    ds = DualSpeed(model, pruner="divprune:budget=20", isolator_length=4)
    inputs = batch(processor, 2)
    with torch.no_grad(), slimvlm.apply(model, ds.inference_method()) as handle:
        output = model(**inputs)
    assert handle.stats.visual_tokens == [24, 24]
    assert output.logits.shape[1] == inputs["input_ids"].shape[1] - 576 + 24
    # each kept patch points at its token, shifted past the isolator
    sources = torch.tensor(handle.stats.sources)
    assert int((sources >= 0).sum(dim=1).min()) == 20 and int(sources[sources >= 0].min()) == 4


def test_fast_loss_trains_isolator_and_model(fresh):
    model, processor = fresh
    ds = DualSpeed(model)
    data = labelled(model, batch(processor, 2))
    model.zero_grad(set_to_none=True)
    loss, info = ds.loss(data, step_of(ds, "fast"))
    assert info["mode"] == "fast" and info["kl"] is None and torch.isfinite(loss)
    loss.backward()
    assert "forward" not in model.__dict__ and getattr(model, "_slimvlm_handle", None) is None
    assert ds.isolator.grad is not None and float(ds.isolator.grad.abs().sum()) > 0
    lm_head = model.get_output_embeddings().weight.grad
    projector = model.model.multi_modal_projector.linear_1.weight.grad
    assert lm_head is not None and float(lm_head.abs().sum()) > 0
    assert projector is not None and float(projector.abs().sum()) > 0
    model.zero_grad(set_to_none=True)


def test_fast_loss_matches_its_remapped_labels(fresh):
    model, processor = fresh
    ds = DualSpeed(model, pruner="divprune:budget=32")
    data = labelled(model, batch(processor, 2))
    with torch.no_grad():
        ce, logits, remapped = ds.fast_forward(data)
    assert remapped.shape == logits.shape[:2]
    assert int((remapped != -100).sum()) == int((data["labels"] != -100).sum())
    assert torch.allclose(ds._loss_function(logits, remapped), ce, atol=1e-6)


def test_slow_loss_is_ce_plus_distillation(fresh):
    model, processor = fresh
    data = labelled(model, batch(processor, 2))
    with torch.no_grad():
        reference = model(**data).loss
        plain = DualSpeed(model, lam=0.0)
        loss0, info0 = plain.loss(data, step_of(plain, "slow"))
        assert info0["mode"] == "slow" and info0["kl"] == 0.0
        assert torch.allclose(loss0, reference, atol=1e-5)

        ds = DualSpeed(model, lam=0.5, tau=2.0)
        loss, info = ds.loss(data, step_of(ds, "slow"))
    assert info["kl"] > 0
    assert torch.allclose(torch.tensor(info["ce"]), reference, atol=1e-5)
    assert loss.item() == pytest.approx(info["ce"] + 0.5 * 4.0 * info["kl"], rel=1e-5)
    assert "forward" not in model.__dict__


def test_slow_loss_backward_reaches_the_model_not_the_teacher(fresh):
    model, processor = fresh
    ds = DualSpeed(model)
    data = labelled(model, batch(processor, 1))
    model.zero_grad(set_to_none=True)
    loss, info = ds.loss(data, step_of(ds, "slow"))
    loss.backward()
    assert info["kl"] >= 0
    assert ds.isolator.grad is None  # the teacher runs without gradient; the slow mode has no isolator
    assert float(model.get_output_embeddings().weight.grad.abs().sum()) > 0
    model.zero_grad(set_to_none=True)


def test_kl_is_zero_when_teacher_equals_student(fresh):
    from slimvlm.train import distillation_kl

    logits = torch.randn(5, 11)
    assert float(distillation_kl(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_kl(logits, torch.randn(5, 11), 1.0)) > 0


def test_isolator_save_load_round_trip(fresh, tmp_path):
    model, _ = fresh
    ds = DualSpeed(model, seed=1)
    path = ds.save(tmp_path)
    assert path.name == ISOLATOR_FILE
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["isolator"]
        assert f.metadata()["format"] == "slimvlm-dualspeed-isolator"
    other = DualSpeed(model, seed=2)
    assert not torch.equal(other.isolator, ds.isolator)
    other.load(tmp_path)
    assert torch.equal(other.isolator, ds.isolator)
    with pytest.raises(SlimVLMError):
        DualSpeed(model, isolator_length=3).load(tmp_path)


def test_inference_with_isolator_generates(fresh):
    model, processor = fresh
    ds = DualSpeed(model)
    inputs = select(batch(processor, 2), 1)
    with torch.no_grad():
        with slimvlm.apply(model, ds.inference_method()) as handle:
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert handle.stats.visual_tokens == [4 + 58]
        with slimvlm.apply(model, ds.inference_method(isolator=False)) as handle:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle.stats.visual_tokens == [58]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert "forward" not in model.__dict__


def test_model_is_untouched_even_when_a_step_fails(fresh):
    model, processor = fresh
    ds = DualSpeed(model)
    data = labelled(model, batch(processor, 1))
    data["image_sizes"] = torch.tensor([[336, 336]])  # refused by the LLaVA adapter
    with pytest.raises(SlimVLMError):
        ds.loss(data, step_of(ds, "fast"))
    assert "forward" not in model.__dict__ and getattr(model, "_slimvlm_handle", None) is None


def test_refuses_a_model_with_slimvlm_applied(fresh):
    model, processor = fresh
    ds = DualSpeed(model, r=1.0)
    with slimvlm.apply(model, "divprune:budget=8"):
        with pytest.raises(SlimVLMError, match="remove it"):
            ds.loss(labelled(model, batch(processor, 1)), 0)


def test_refuses_a_pruner_outside_stage_2(fresh):
    model, _ = fresh
    with pytest.raises(SlimVLMError, match="stage 2"):
        DualSpeed(model, pruner="fastv:k=2,ratio=0.5")




def test_trains_with_transformers_trainer(tiny_dir, tmp_path):
    from transformers import TrainingArguments

    from slimvlm.testbed.build import format_prompt, load
    from slimvlm.train import dualspeed_trainer
    from conftest import images

    model, processor = load(tiny_dir)
    model.train()
    prompts = [format_prompt("what color is the circle ?") + " red", format_prompt("is there a square ?") + " yes"]
    inputs = processor(images=images(2), text=prompts, return_tensors="pt", padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    rows = [{"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i],
             "pixel_values": inputs["pixel_values"][i], "labels": labels[i]} for i in range(2)] * 2
    dual = DualSpeed(model, pruner="divprune:budget=16", r=0.5, seed=3)
    before = dual.isolator.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                             report_to=[], remove_unused_columns=False, use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = dualspeed_trainer(dual, args, rows)
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(dual.isolator.detach(), before)  # the isolator is among the trained parameters
    assert "forward" not in model.__dict__


def test_the_direct_modes_equal_the_applied_ones_with_no_host_read(fresh):
    """On rows that hold one image at one place (the collator says where), each mode replaces the span in place
    (train/spans.py): the same losses and answer logits as the general path through slimvlm.apply, the slow
    step's distillation included, and nothing read back to the host."""
    from slimvlm.device_reads import HostReads
    from slimvlm.train.data import SceneCollator, training_scenes

    model, processor = fresh
    rows = SceneCollator(processor)(training_scenes(3, seed=7))
    general = {k: v for k, v in rows.items() if k not in ("image_start", "image_tokens")}
    ds = DualSpeed(model, pruner="divprune:ratio=0.1", isolator_length=4, lam=0.7, tau=2.0)
    for mode in ("fast", "slow"):
        step = step_of(ds, mode)
        with torch.no_grad():
            with HostReads() as reads:
                direct, _ = ds.loss(rows, step, details=False)
            applied, _ = ds.loss(general, step, details=False)
        assert reads.total == 0, reads.where.most_common(3)
        assert torch.allclose(direct, applied, atol=1e-5), mode
