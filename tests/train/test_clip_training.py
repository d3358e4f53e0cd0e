"""Training data from testbed scenes and clips (several image placeholders per sample), collated like the processor does."""

from __future__ import annotations

import pytest
import torch

from slimvlm.testbed import build, clips, scenes
from slimvlm.train.data import ClipDataset, SceneCollator, SceneDataset


def test_a_mixed_batch_matches_the_processor_and_trains(tiny):
    model, processor = tiny
    clip = clips.make_clip_samples(1, seed=0, split="train", frames=3)[0]
    scene = scenes.make_samples(1, seed=0, split="train")[0]
    batch = SceneCollator(processor)([clip, scene])
    image_id = processor.tokenizer.convert_tokens_to_ids(build.SPECIAL_TOKENS["image"])
    assert batch["pixel_values"].shape[0] == 4  # 3 frames, then the scene
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [3 * 576, 576]
    for row, sample, frames in zip(range(2), (clip, scene), (clip.frames, [scene.image])):
        ref = processor(text=[build.format_training_text(sample.question, sample.answer, len(frames))],
                        images=frames, return_tensors="pt")  # fmt: skip
        n = ref["input_ids"].shape[1]
        assert batch["input_ids"][row, :n].tolist() == ref["input_ids"][0].tolist()
        assert torch.allclose(batch["pixel_values"][sum(len(f) for f in (clip.frames, [scene.image])[:row]) :][: len(frames)],
                              ref["pixel_values"], atol=1e-5)  # fmt: skip
        answer = processor.tokenizer(f" {sample.answer}{build.SPECIAL_TOKENS['eos']}", add_special_tokens=False)["input_ids"]
        assert batch["labels"][row][batch["labels"][row] != -100].tolist() == answer
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_scene_dataset_is_deterministic_balanced_and_train_split():
    data = SceneDataset(16, seed=3)
    again = SceneDataset(16, seed=3)
    assert len(data) == 16
    for i in (0, 5, 15):
        a, b = data[i], again[i]
        assert (a.question, a.answer) == (b.question, b.answer) and a.image.tobytes() == b.image.tobytes()
    assert [data[i].question_type for i in range(8)] == list(scenes.QUESTION_TYPES)
    assert data[0].id.startswith("train-")
    with pytest.raises(IndexError):
        data[16]


def test_clip_dataset_is_deterministic_balanced_and_train_split():
    data = ClipDataset(5, seed=3, frames=2)
    items = [data[i] for i in range(5)]
    assert [s.question_type for s in items] == list(clips.CLIP_QUESTION_TYPES)
    assert all(len(s.frames) == 2 and s.id.startswith("train-") for s in items)
    again = ClipDataset(5, seed=3, frames=2)[4]
    assert (again.question, again.answer) == (items[4].question, items[4].answer)


def test_llava_mini_trains_on_a_batch_of_a_clip_and_a_scene(tiny_dir):
    from slimvlm.train import LlavaMiniModule

    model, processor = build.load(tiny_dir)  # its own copy: the backward leaves gradients behind
    module = LlavaMiniModule("llava-mini:budget=2,layers=1", model)
    batch = SceneCollator(processor)(
        [clips.make_clip_samples(1, seed=1, split="train", frames=2)[0], scenes.make_samples(1, seed=1, split="train")[0]]
    )
    loss = module(**batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in module.mini.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert "forward" not in model.__dict__  # the method was installed for the call only


def test_raw_pixels_normalised_on_the_device_equal_the_collators_own(tiny):
    _, processor = tiny
    samples = [*SceneDataset(2), *ClipDataset(1, frames=2)]
    cpu = SceneCollator(processor)(samples)
    raw = SceneCollator(processor, normalize_on_device=True)
    batch = raw(samples)
    assert "pixel_values" not in batch and batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape[0] == 4
    done = raw.on_device(batch)
    assert set(done) == set(cpu) and torch.equal(done["pixel_values"], cpu["pixel_values"])
    assert all(torch.equal(done[k], cpu[k]) for k in ("input_ids", "attention_mask", "labels"))
    assert raw.on_device(cpu) is cpu  # already normalised: left alone
