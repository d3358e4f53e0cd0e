"""Testbed clips (frames with objects appearing, disappearing and moving) and clips through
slimvlm.apply + generate (LLaVA-Mini: C tokens per frame, pre-fusion over all frames)."""

import random

import numpy as np
import pytest
import torch

import slimvlm
from slimvlm.bench.evaluate import evaluate, from_sample
from slimvlm.testbed import clips, scenes
from slimvlm.testbed.clips import ClipObject


def _pixel(image, x, y):
    return tuple(int(v) for v in np.asarray(image)[int(y), int(x)])


def test_clip_samples_are_deterministic_and_splits_differ():
    a = clips.make_clip_samples(5, seed=1, frames=4)
    b = clips.make_clip_samples(5, seed=1, frames=4)
    for x, y in zip(a, b):
        assert (x.question, x.answer, x.question_type) == (y.question, y.answer, y.question_type)
        assert len(x.frames) == 4 and all(f.tobytes() == g.tobytes() for f, g in zip(x.frames, y.frames))
    assert [s.question_type for s in a] == list(clips.CLIP_QUESTION_TYPES)
    test = [f.tobytes() for f in clips.make_clip(clips.clip_seed(0, "test", 0), 4).frames]
    train = [f.tobytes() for f in clips.make_clip(clips.clip_seed(0, "train", 0), 4).frames]
    assert test != train


def test_layouts_keep_their_promises():
    vocabulary = set(scenes.vocabulary())
    for seed in range(60):
        frames = 2 + seed % 7
        objects, clutter = clips.clip_layout(seed, frames)
        assert 1 <= len(objects) <= 6 and 0 <= clutter <= 0.5
        assert any(o.first > 0 for o in objects)  # something appears after the first frame
        for o in objects:
            assert 0 <= o.first <= o.last < frames
            for f in range(frames):
                x0, y0, x1, y1 = o.at(f, frames).bbox
                assert 0 <= x0 and 0 <= y0 and x1 <= scenes.IMAGE_SIZE and y1 <= scenes.IMAGE_SIZE
        for i, o in enumerate(objects):
            for p in objects[i + 1 :]:
                for f in range(max(o.first, p.first), min(o.last, p.last) + 1):
                    assert scenes._disjoint(o.at(f, frames).bbox, p.at(f, frames).bbox)
        for kind in clips.CLIP_QUESTION_TYPES:
            qa = clips.ask_clip(objects, kind, random.Random(seed))
            if qa is not None:
                assert set(scenes.tokenize(qa[0] + " " + qa[1])) <= vocabulary  # the testbed model can read it


def _constructed():
    """A red circle in frames 0-1, a blue square moving right in frames 1-3, a red star in frame 3 only."""
    return [
        ClipObject("circle", "red", 40.0, 60.0, 60.0, 60.0, 60.0, 0, 1),
        ClipObject("square", "blue", 40.0, 100.0, 250.0, 220.0, 250.0, 1, 3),
        ClipObject("star", "red", 48.0, 260.0, 80.0, 260.0, 80.0, 3, 3),
    ]


def test_answers_on_a_constructed_clip():
    objects = _constructed()
    rng = random.Random(0)
    assert clips.ask_clip(objects, "total", rng) == ("how many objects are there?", "three")
    for seed in range(30):
        question, answer = clips.ask_clip(objects, "color", random.Random(seed))  # the star: last frame only
        assert answer == {"circle": "red", "square": "blue", "star": "red"}[question.split()[-1].rstrip("?")]
        question, answer = clips.ask_clip(objects, "count", random.Random(seed))
        expected = {"how many red objects are there?": "two", "how many blue objects are there?": "one",
                    "how many circles are there?": "one", "how many squares are there?": "one", "how many stars are there?": "one"}
        assert expected[question] == answer
        question, answer = clips.ask_clip(objects, "presence", random.Random(seed))
        words = question.rstrip("?").split()
        assert answer == ("yes" if (words[-2], words[-1]) in {("red", "circle"), ("blue", "square"), ("red", "star")} else "no")
        question, answer = clips.ask_clip(objects, "shape", random.Random(seed))
        assert (question, answer) == ("what shape is the blue object?", "square")  # red names two objects: never asked
    with pytest.raises(ValueError):
        clips.ask_clip(objects, "word", rng)


def test_frames_draw_what_is_visible_where_it_is():
    objects = _constructed()
    frames = clips.render_clip(objects, 4, clutter=0.0, seed=5)
    red, blue = scenes.COLOR_RGB["red"], scenes.COLOR_RGB["blue"]
    assert _pixel(frames[0], 60, 60) == red and _pixel(frames[2], 60, 60) != red  # the circle disappears
    assert _pixel(frames[0], 100, 250) != blue  # the square appears in frame 1 ...
    square = objects[1]
    for f in (1, 2, 3):  # ... and moves: 100 -> 220 over t = f / 3
        x = 100 + f / 3 * 120
        assert square.at(f, 4).x == round(x) and _pixel(frames[f], x, 250) == blue
    assert _pixel(frames[3], 260, 80) == red and _pixel(frames[2], 260, 80) != red  # the star: last frame only
    assert frames[0].size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    assert clips.format_clip_prompt("how many objects are there?", 3) == "<image><image><image>\nhow many objects are there? answer:"


def test_clips_through_apply_and_generate(tiny):
    model, processor = tiny
    samples = clips.make_clip_samples(3, seed=2, frames=3) + clips.make_clip_samples(1, seed=3, frames=2)
    items = [from_sample(s) for s in samples]
    assert [len(i.image) for i in items] == [3, 3, 3, 2]
    mini = evaluate(model, processor, items, "llava-mini:budget=2,layers=1", batch_size=4, progress=False)
    assert [r.visual_tokens for r in mini.records] == [6, 6, 6, 4]  # C tokens per frame
    stats = mini.stats[0]
    assert stats.visual_tokens == [2] * 11  # one entry per frame
    assert [layers[0] for layers in stats.kv_visual_entries] == [6, 6, 6, 4]
    full = evaluate(model, processor, items[3:], "none", batch_size=1, progress=False)
    assert full.records[0].visual_tokens == 2 * 576
    # the untouched model would need 3 x 576 visual positions per clip; LLaVA-Mini keeps the LLM's sequence short
    assert max(stats.llm_tokens[0]) < 40
    # a mixed batch gives each clip the answer it gets alone (its own frames, its own pre-fusion)
    alone = [evaluate(model, processor, [item], "llava-mini:budget=2,layers=1", progress=False).records[0].prediction
             for item in items]
    assert alone == [r.prediction for r in mini.records]
    assert getattr(model, "_slimvlm_handle", None) is None


def test_a_clip_prompt_needs_one_placeholder_to_repeat(tiny):
    model, processor = tiny
    item = from_sample(clips.make_clip_samples(1, frames=2)[0])
    with pytest.raises(ValueError, match="exactly one"):
        evaluate(model, processor, [item], "none", prompt=lambda q: f"<image> <image> {q}", progress=False)


def test_every_frame_reaches_the_answer(tiny):
    """Pre-fusion runs over all frames: changing only the first frame changes the logits."""
    model, processor = tiny
    sample = clips.make_clip_samples(1, seed=4, frames=3)[0]
    text = clips.format_clip_prompt(sample.question, 3)
    other = clips.make_clip(99, 3).frames[0]
    with torch.no_grad(), slimvlm.apply(model, "llava-mini:budget=1,layers=1"):
        a = model(**processor(images=sample.frames, text=[text], return_tensors="pt")).logits[0, -1]
        b = model(**processor(images=[other] + sample.frames[1:], text=[text], return_tensors="pt")).logits[0, -1]
    assert not torch.allclose(a, b)
