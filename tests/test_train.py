"""Tests for slimvlm.testbed.train: collation, label mask, shared-vision forward, a tiny CPU run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from slimvlm.errors import SlimVLMError
from slimvlm.testbed import build as B
from slimvlm.testbed import scenes as S
from slimvlm.testbed import train as T


@pytest.fixture(scope="module")
def processor():
    return B.build_processor(B.build_tokenizer(S.vocabulary()))


@pytest.fixture(scope="module")
def batch_and_records(processor):
    ds = T.SceneQADataset(processor, batch_size=5, seed=0, questions_per_scene=3)
    records = ds.records(ds.scene_seeds(0), 5)
    return ds.batch(records), records


def _flat(records):
    return [(i, qt, q, a) for i, r in enumerate(records) for qt, q, a in r.qas]


def test_label_mask_covers_exactly_answer_and_eos(processor, batch_and_records):
    batch, records = batch_and_records
    tok = processor.tokenizer
    flat = _flat(records)
    assert len(flat) == batch["input_ids"].shape[0] == 5
    assert batch["pixels"].shape[0] == len(records) == 2  # 3 + 2 questions: one render, several questions
    for row, (_, _, q, a) in enumerate(flat):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        real = int((ids != tok.pad_token_id).sum())
        assert (ids[real:] == tok.pad_token_id).all()  # right padding
        kept = (labels != -100).nonzero().flatten().tolist()
        n_answer = len(tok(a, add_special_tokens=False)["input_ids"])
        assert kept == list(range(real - n_answer - 1, real))  # the answer tokens, then eos
        assert tok.convert_ids_to_tokens(labels[kept].tolist()) == a.split() + ["</s>"]
        assert (labels[kept] == ids[kept]).all()
        # everything before is the prompt, exactly
        prompt_len = len(tok(B.format_prompt(q))["input_ids"]) + T.Collator(processor).n_image_tokens - 1
        assert kept[0] == prompt_len


def test_collation_matches_processor(processor, batch_and_records):
    batch, records = batch_and_records
    flat = _flat(records)
    images = [Image.fromarray(records[i].image) for i, *_ in flat]
    texts = [B.format_training_text(q, a) for _, _, q, a in flat]
    ref = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="right")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    pixels = T.normalize_pixels(batch["pixels"], processor)[batch["image_index"]]
    assert torch.equal(pixels, ref["pixel_values"])  # bit-identical to the processor


def test_records_are_train_scenes_with_matching_images_and_aux(processor):
    ds = T.SceneQADataset(processor, batch_size=8, seed=0, questions_per_scene=2)
    records = ds.records(ds.scene_seeds(1), 8)
    test_seeds = {S._scene_seed(0, "test", k) for k in range(1000)}
    for r in records:
        assert r.scene_seed % 2 == 0 and r.scene_seed not in test_seeds
        scene = S.make_scene(r.scene_seed)  # the image is the scene the questions were asked about
        assert np.array_equal(r.image, np.asarray(scene.image))
        assert r.aux.sum() == len({(o.color, o.shape) for o in scene.objects}) + len(scene.words)
        for qt, q, a in r.qas:
            assert qt in S.QUESTION_TYPES and q and a
        assert len({qt for qt, _, _ in r.qas}) == len(r.qas)  # distinct types per scene
    a = list(zip(range(50), ds.scene_seeds(0)))
    b = list(zip(range(50), ds.scene_seeds(1)))
    assert not {s for _, s in a} & {s for _, s in b}  # workers draw distinct scenes


def test_question_types_stay_balanced(processor):
    ds = T.SceneQADataset(processor, batch_size=8, seed=3, questions_per_scene=3)
    seeds = ds.scene_seeds(0)
    for _ in range(40):
        ds._questions(next(seeds), 3)
    assert max(ds.counts) - min(ds.counts) <= 3


def test_shared_vision_forward_equals_stock_forward(processor, batch_and_records):
    batch, _ = batch_and_records
    torch.manual_seed(0)
    config = B.llava_config(processor.tokenizer, B.TINY_VISION, B.TINY_TEXT)
    model = T.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    head = T.AuxHeads(config.vision_config.hidden_size)
    pixels = T.normalize_pixels(batch["pixels"], processor)
    with torch.no_grad():
        lm, aux = T.forward_losses(model, head, batch, pixels)
        ref = model(
            input_ids=batch["input_ids"],
            pixel_values=pixels[batch["image_index"]],
            attention_mask=(batch["input_ids"] != processor.tokenizer.pad_token_id).long(),
            labels=batch["labels"],
        )
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        ref_aux = torch.nn.functional.binary_cross_entropy_with_logits(head.cls(hidden[:, 0]), batch["aux_target"])
        ref_aux += torch.nn.functional.cross_entropy(head.patch(hidden[:, 1:]).flatten(0, 1), batch["patch_target"].flatten())
    assert torch.allclose(lm, ref.loss, atol=1e-5)
    assert torch.allclose(aux, ref_aux, atol=1e-6)


def test_lr_schedule():
    assert T.lr_factor(0, 0.0, 300) == pytest.approx(1 / 300)
    assert T.lr_factor(299, 0.0, 300) == pytest.approx(1.0)
    assert T.lr_factor(5000, 0.5, 300) == pytest.approx(0.55)
    assert T.lr_factor(5000, 1.0, 300) == pytest.approx(0.1)
    assert T.lr_factor(5000, 2.0, 300) == pytest.approx(0.1)


def test_bad_input(tmp_path):
    with pytest.raises(SlimVLMError, match="unknown --size"):
        T.train(out=tmp_path, size="huge", device="cpu")
    with pytest.raises(SlimVLMError, match="--minutes"):
        T.train(out=tmp_path, size="tiny", device="cpu", minutes=0)
    with pytest.raises(SlimVLMError, match="--minutes"):
        T.train(out=tmp_path, size="tiny", device="cpu", minutes=-1)
    if not torch.cuda.is_available():
        with pytest.raises(SlimVLMError, match="CUDA is not available"):
            T.train(out=tmp_path, size="tiny", device="cuda")
    assert T.main(["--out", str(tmp_path), "--size", "huge", "--device", "cpu"]) == 2
    assert not (tmp_path / "train_log.jsonl").exists()


def test_tiny_training_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = T.train(
        out=tmp_path / "model", size="tiny", device="cpu", minutes=5, steps=10, batch_size=4,
        eval_samples=8, eval_batch_size=4, eval_every=5, workers=0, log_every=1, warmup_steps=2, progress=False,
    )  # fmt: skip
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["loss"] is not None]
    assert [r["step"] for r in train_lines] == list(range(1, 11))
    for r in train_lines:
        assert math.isfinite(r["loss"]) and math.isfinite(r["lm_loss"]) and math.isfinite(r["aux_loss"])
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.5 * r["aux_loss"], rel=1e-5)
    first = sum(r["lm_loss"] for r in train_lines[:2]) / 2
    last = sum(r["lm_loss"] for r in train_lines[-2:]) / 2
    assert last < first
    evals = [r for r in lines if "accuracy" in r]
    assert [r["step"] for r in evals] == [0, 5, 10] and evals[-1].get("final")
    assert set(evals[-1]["per_type"]) == set(S.QUESTION_TYPES)

    model, proc = B.load(out)
    assert model.config.vision_config.hidden_size == B.TINY_VISION["hidden_size"]
    assert model.dtype == torch.float32
    assert all(k.startswith(("model.", "lm_head.")) for k in model.state_dict())  # no aux head saved

    card = (out / "README.md").read_text()
    assert "| question type |" in card and "**overall**" in card and "python -m slimvlm.testbed.train" in card
    result = json.loads((out / "eval.json").read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] == 8 and result["steps"] == 10


def test_loader_shrinks_to_fit_small_shm(monkeypatch):
    class Small:
        f_bavail, f_frsize = 64 * 1024 * 1024 // 4096, 4096  # Docker's default 64 MB /dev/shm

    monkeypatch.setattr(T.os, "statvfs", lambda path: Small())
    workers, prefetch = T._fit_loader_to_shm(14, 4, 11 * 2**20)
    assert prefetch == 2 and workers == 1
    assert T._fit_loader_to_shm(0, 4, 11 * 2**20) == (0, 4)


def test_patch_targets_mark_what_covers_each_patch():
    big = S.SceneObject("square", "red", x=14 * 5 + 7, y=14 * 2 + 7, size=40)
    tiny = S.SceneObject("circle", "blue", x=14 * 20 + 3, y=14 * 20 + 3, size=8)  # covers no patch centre
    word = S.WORDS[0]
    target = T.patch_target([big, tiny], [(word, (200.0, 100.0))], [24]).reshape(24, 24)
    red_square = 1 + T.AUX_LABELS.index("red square")
    assert target[2, 5] == red_square and target[1, 4] == red_square and target[4, 5] == 0
    assert target[20, 20] == 1 + T.AUX_LABELS.index("blue circle")
    assert target[100 // 14, 200 // 14] == 1 + T.AUX_LABELS.index(f"word:{word}")
    assert (target > 0).sum() < 30
