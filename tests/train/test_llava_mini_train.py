"""Training LLaVA-Mini's modules with a transformers Trainer (slimvlm.train.llava_mini)."""

import pytest
import torch

import slimvlm
from conftest import images
from slimvlm.device_reads import HostReads
from slimvlm.errors import SlimVLMError
from slimvlm.methods.llava_mini import LlavaMini
from slimvlm.testbed.build import format_prompt, load


def _rows(model, processor):
    """Two left-padded samples, each labelled on its last (answer) token only, repeated twice."""
    prompts = [format_prompt("what color is the circle ?") + " red", format_prompt("is there a square ?") + " yes"]
    inputs = processor(images=images(2), text=prompts, return_tensors="pt", padding=True)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -1] = inputs["input_ids"][:, -1]
    rows = [{"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i],
             "pixel_values": inputs["pixel_values"][i], "labels": labels[i]} for i in range(2)] * 2
    return rows, inputs


def _train(tmp_path, method, model, rows, **kwargs):
    from transformers import TrainingArguments

    from slimvlm.train import llava_mini_trainer

    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                             report_to=[], remove_unused_columns=False, use_cpu=True, save_strategy="no", logging_steps=1)
    result = llava_mini_trainer(method, model, args, rows, **kwargs).train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))


def _state(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_trainer_trains_the_modules_and_the_llm_and_the_saved_modules_load_back(tiny_dir, tmp_path):
    model, processor = load(tiny_dir)  # its own copy: training changes its weights
    model.train()
    rows, inputs = _rows(model, processor)
    method = LlavaMini(budget=4, layers=1, seed=2)
    modules = method.build(model)
    queries = modules.queries.detach().clone()
    q_proj = modules.prefusion[0].self_attn.q_proj.weight.detach().clone()
    before = _state(model)
    _train(tmp_path, method, model, rows)
    assert not torch.equal(modules.queries.detach(), queries)
    assert not torch.equal(modules.prefusion[0].self_attn.q_proj.weight.detach(), q_proj)
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert any("language_model" in name for name in changed)  # the LLM is fine-tuned too
    assert "forward" not in model.__dict__ and getattr(model, "_slimvlm_handle", None) is None

    model.eval()
    with torch.no_grad(), slimvlm.apply(model, method):
        reference = model(**inputs).logits
    method.save(tmp_path / "mini")
    loaded = slimvlm.registry.build(f"llava-mini:weights={tmp_path / 'mini'}")
    assert (loaded.budget, loaded.layers) == (4, 1)
    with torch.no_grad(), slimvlm.apply(model, loaded):
        again = model(**inputs).logits
    assert torch.equal(reference, again)


def test_train_llm_false_trains_only_the_modules(tiny_dir, tmp_path):
    model, processor = load(tiny_dir)
    model.train()
    rows, _ = _rows(model, processor)
    method = LlavaMini(budget=4, layers=1, seed=2)
    modules = method.build(model)
    mini_before = _state(modules)
    before = _state(model)
    _train(tmp_path, method, model, rows, train_llm=False)
    assert all(torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())
    assert not any(p.requires_grad for p in model.parameters())
    assert all(not torch.equal(p.detach(), mini_before[name]) for name, p in modules.named_parameters()
               if name in ("queries", "attention.in_proj_weight", "prefusion.0.self_attn.q_proj.weight"))
    assert "forward" not in model.__dict__


def test_module_refuses_bad_input(tiny, tmp_path):
    from transformers import TrainingArguments

    from slimvlm.train import LlavaMiniModule, llava_mini_trainer

    model, processor = tiny
    with pytest.raises(SlimVLMError):
        LlavaMiniModule("divprune:budget=16", model)
    module = LlavaMiniModule("llava-mini:budget=4,layers=1", model)
    rows, inputs = _rows(model, processor)
    with pytest.raises(SlimVLMError):
        module(**inputs)  # no labels
    assert "forward" not in model.__dict__
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)  # remove_unused_columns left True
    with pytest.raises(SlimVLMError):
        llava_mini_trainer(LlavaMini(budget=4, layers=1), model, args, rows)


def test_one_kind_batches_never_mix_parts_and_cover_every_whole_batch():
    from slimvlm.train.data import OneKindBatches

    sampler = OneKindBatches([12, 8], batch_size=4, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == 20 and sorted(order) == list(range(20))
    batches = [order[i : i + 4] for i in range(0, 20, 4)]
    assert all(max(b) < 12 or min(b) >= 12 for b in batches)  # scenes 0-11, clips 12-19
    many = list(OneKindBatches([40, 40], batch_size=4, seed=3))
    kinds = [many[i] >= 40 for i in range(0, 80, 4)]
    assert kinds != sorted(kinds)  # clip batches are spread among the scene batches, not all last
    assert order == list(OneKindBatches([12, 8], batch_size=4, seed=3))
    assert order != list(OneKindBatches([12, 8], batch_size=4, seed=4))
    partial = list(OneKindBatches([6, 5], batch_size=4, seed=0))  # each part's partial batch left out
    assert len(partial) == 8 and sum(i < 6 for i in partial) == 4


def test_module_trainer_draws_batches_in_the_given_sampler_order(tmp_path):
    import torch
    from transformers import TrainingArguments

    from slimvlm.train.data import OneKindBatches
    from slimvlm.train.trainer import module_trainer

    data = [{"x": torch.tensor([float(i)])} for i in range(12)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[],
                             remove_unused_columns=False)
    sampler = OneKindBatches([8, 4], batch_size=4, seed=1)
    trainer = module_trainer(torch.nn.Linear(1, 1), args, data, data_collator=lambda rows: {"x": torch.cat([r["x"] for r in rows])},
                             train_sampler=sampler)
    drawn = [batch["x"].long().tolist() for batch in trainer.get_train_dataloader()]
    expected = list(sampler)
    assert drawn == [expected[i : i + 4] for i in range(0, 12, 4)]


def _scene_batch(processor, count: int = 3):
    """Right-padded training rows of testbed scenes, one image each at one place (the collator says where)."""
    from slimvlm.train.data import SceneCollator, training_scenes

    batch = SceneCollator(processor)(training_scenes(count, seed=5))
    assert batch["image_start"] >= 0 and batch["image_tokens"] == 576
    return batch


def test_the_direct_forward_equals_the_applied_method(fresh):
    """The span replaced in place (train/spans.py) gives what slimvlm.apply gives on the same rows: logits at every
    real position and the loss, with the answer left out of the pre-fusion."""
    from slimvlm.train.llava_mini import LlavaMiniModule

    model, processor = fresh
    batch = _scene_batch(processor)
    module = LlavaMiniModule(LlavaMini(budget=4, layers=2, init="random", seed=1), model)
    general = {k: v for k, v in batch.items() if k not in ("image_start", "image_tokens")}
    with torch.no_grad():
        logits, labels = module.direct_logits(batch)
        direct_loss = module(**batch)
        with slimvlm.apply(model, module.method) as handle:
            applied = model(**general, use_cache=False)
            applied_labels = handle.labels
        applied_loss = module(**general)
    real = (batch["attention_mask"].sum(dim=1) - 576 + 4).tolist()
    assert torch.equal(labels, applied_labels)
    for row, length in enumerate(real):
        assert torch.allclose(logits[row, :length], applied.logits[row, :length], atol=1e-5)
    assert torch.allclose(direct_loss, applied_loss, atol=1e-6)


def test_distillation_is_the_same_on_both_paths_and_adds_to_the_loss(tiny_dir):
    import copy

    from slimvlm.train.llava_mini import LlavaMiniModule

    model, processor = load(tiny_dir)
    batch = _scene_batch(processor)
    general = {k: v for k, v in batch.items() if k not in ("image_start", "image_tokens")}
    method = LlavaMini(budget=1, layers=1, init="random", seed=2)
    plain = LlavaMiniModule(method, model)
    taught = LlavaMiniModule(method, model, teacher=copy.deepcopy(model), distill=0.5, tau=2.0)
    with torch.no_grad():
        with HostReads() as reads:
            ce, direct = plain(**batch), taught(**batch)
        applied = taught(**general)
    assert reads.total == 0, reads.where.most_common(3)  # the direct forward never waits for the device
    assert torch.allclose(direct, applied, atol=1e-5)
    assert float(direct) > float(ce) + 1e-3  # CE + 0.5 * 4 * KL, KL > 0: one token is not the whole image


@pytest.mark.parametrize("budget", [1, 4, 16])
def test_untrained_modules_start_as_pooling(fresh, budget):
    """Zero queries over each cell, identity values and outputs, pre-fusion layers copied from the LM with their
    outputs silenced: before any training, llava-mini:budget=C gives what pool:budget=C gives."""
    from conftest import batch

    model, processor = fresh
    inputs = batch(processor, 2)
    with torch.no_grad():
        with slimvlm.apply(model, f"pool:budget={budget}"):
            pooled = model(**inputs).logits
        with pytest.warns(UserWarning), slimvlm.apply(model, f"llava-mini:budget={budget},layers=2"):
            mini = model(**inputs).logits
    assert torch.allclose(mini, pooled, atol=1e-5)
    with pytest.warns(UserWarning), slimvlm.apply(model, f"llava-mini:budget={budget},layers=2,init=lm"):
        assert not torch.allclose(model(**inputs).logits, pooled, atol=1e-3)  # copied whole, the layers act
