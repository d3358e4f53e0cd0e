"""Tests for the procedural scene + question generator (slimvlm.testbed.scenes)."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest

from slimvlm.testbed import scenes as S
from slimvlm.testbed.scenes import (
    COLOR_RGB,
    COLORS,
    IMAGE_SIZE,
    QUESTION_TYPES,
    SHAPES,
    WORDS,
    Sample,
    Scene,
    SceneObject,
    ask,
    make_samples,
    make_scene,
    render,
    vocabulary,
)


def _pix(scene: Scene, x: float, y: float) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(scene.image)[int(y), int(x)])


def _all_answers(scene: Scene, qt: str, tries: int = 60) -> set[tuple[str, str]]:
    return {qa for i in range(tries) if (qa := ask(scene, qt, random.Random(i))) is not None}


# ------------------------------------------------------------------ determinism


def test_make_scene_deterministic_and_seed_sensitive() -> None:
    a, b, c = make_scene(7), make_scene(7), make_scene(8)
    assert a.image.size == (IMAGE_SIZE, IMAGE_SIZE) and a.image.mode == "RGB"
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.objects == b.objects and a.words == b.words and a.complexity == b.complexity
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_make_samples_deterministic() -> None:
    a = make_samples(16, seed=3, split="train")
    b = make_samples(16, seed=3, split="train")
    c = make_samples(16, seed=4, split="train")
    assert [(s.id, s.question, s.answer) for s in a] == [(s.id, s.question, s.answer) for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.question for s in a] != [s.question for s in c]
    assert a[0].id == "train-000000" and a[15].id == "train-000015"
    assert all(isinstance(s, Sample) for s in a)


def test_global_rng_state_untouched() -> None:
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.random())
    random.seed(123)
    np.random.seed(123)
    make_samples(8)
    make_scene(5)
    assert (random.random(), np.random.random()) == expected


def test_splits_disjoint() -> None:
    def fingerprints(split: str, seed: int) -> set[bytes]:
        return {s.image.tobytes()[::97] for s in make_samples(48, seed=seed, split=split)}

    train = fingerprints("train", 0) | fingerprints("train", 1)
    test = fingerprints("test", 0) | fingerprints("test", 1)
    assert not train & test
    # The split is encoded in the scene-seed parity, for any seed and index.
    for seed in (0, 1, 12345):
        for k in (0, 1, 999):
            assert S.scene_seed(seed, "train", k) % 2 == 0
            assert S.scene_seed(seed, "test", k) % 2 == 1


# --------------------------------------------------------- answers on hand-built scenes


def test_render_uses_given_ground_truth() -> None:
    objs = [SceneObject("circle", "red", 80, 80, 40), SceneObject("square", "blue", 250, 250, 60)]
    scene = render(objs, [("cat", (250.0, 80.0))], clutter=0.0, seed=1)
    assert scene.objects == objs and scene.words == [("cat", (250.0, 80.0))]
    assert scene.complexity == pytest.approx(S.complexity_of(2, 1, 0.0))


def test_color_and_shape_questions() -> None:
    objs = [
        SceneObject("circle", "red", 60, 60, 40),
        SceneObject("square", "blue", 200, 60, 40),
        SceneObject("square", "green", 60, 200, 40),
    ]
    scene = render(objs, [], 0.0, 0)
    # 'square' is not unique, so only the circle can be asked about.
    assert _all_answers(scene, "color") == {("what color is the circle?", "red")}
    assert _all_answers(scene, "shape") == {
        ("what shape is the red object?", "circle"),
        ("what shape is the blue object?", "square"),
        ("what shape is the green object?", "square"),
    }
    two_circles = render([SceneObject("circle", "red", 60, 60, 40), SceneObject("circle", "red", 200, 200, 40)], [], 0.0, 0)
    assert ask(two_circles, "color", random.Random(0)) is None
    assert ask(two_circles, "shape", random.Random(0)) is None


def test_count_questions() -> None:
    objs = [SceneObject("star", "yellow", 40 + 60 * i, 60, 30) for i in range(3)]
    objs.append(SceneObject("circle", "yellow", 60, 250, 30))
    scene = render(objs, [], 0.0, 0)
    assert _all_answers(scene, "count") == {
        ("how many stars are there?", "three"),
        ("how many circles are there?", "one"),
        ("how many yellow objects are there?", "four"),
    }
    seven = render([SceneObject("star", "red", 30 + 40 * i, 60, 20) for i in range(7)], [], 0.0, 0)
    assert ask(seven, "count", random.Random(0)) is None  # counts above six are never asked


def test_presence_questions_balanced_and_correct() -> None:
    objs = [SceneObject("circle", "red", 60, 60, 40), SceneObject("triangle", "orange", 200, 200, 40)]
    scene = render(objs, [], 0.0, 0)
    answers = collections.Counter()
    for i in range(400):
        q, a = ask(scene, "presence", random.Random(i))
        words = q.rstrip("?").split()
        color, shape = words[-2], words[-1]
        assert a == ("yes" if (color, shape) in {("red", "circle"), ("orange", "triangle")} else "no")
        assert words[2] == ("an" if color == "orange" else "a")
        answers[a] += 1
    assert 150 < answers["yes"] < 250


def test_position_questions() -> None:
    objs = [SceneObject("circle", "red", 60, 100, 30), SceneObject("square", "blue", 260, 110, 30)]
    scene = render(objs, [], 0.0, 0)
    # y differs by only 10 px: only left/right can be asked.
    assert _all_answers(scene, "position") == {
        ("is the red circle left or right of the blue square?", "left"),
        ("is the blue square left or right of the red circle?", "right"),
    }
    stacked = render([SceneObject("circle", "red", 100, 60, 30), SceneObject("star", "green", 110, 260, 30)], [], 0.0, 0)
    assert _all_answers(stacked, "position") == {
        ("is the red circle above or below the green star?", "above"),
        ("is the green star above or below the red circle?", "below"),
    }
    close = render([SceneObject("circle", "red", 100, 100, 20), SceneObject("star", "green", 115, 130, 20)], [], 0.0, 0)
    assert _all_answers(close, "position") == {
        ("is the red circle above or below the green star?", "above"),
        ("is the green star above or below the red circle?", "below"),
    }
    ambiguous = render([SceneObject("circle", "red", 60, 60, 30), SceneObject("circle", "red", 260, 260, 30)], [], 0.0, 0)
    assert ask(ambiguous, "position", random.Random(0)) is None


def test_quadrant_questions() -> None:
    objs = [
        SceneObject("circle", "red", 60, 60, 30),
        SceneObject("square", "blue", 280, 60, 30),
        SceneObject("star", "white", 60, 280, 30),
        SceneObject("diamond", "black", 280, 280, 30),
    ]
    got = dict(_all_answers(render(objs, [], 0.0, 0), "quadrant"))
    assert got == {
        "which quadrant is the red circle in?": "topleft",
        "which quadrant is the blue square in?": "topright",
        "which quadrant is the white star in?": "bottomleft",
        "which quadrant is the black diamond in?": "bottomright",
    }
    on_midline = render([SceneObject("circle", "red", IMAGE_SIZE / 2 + 5, 60, 30)], [], 0.0, 0)
    assert ask(on_midline, "quadrant", random.Random(0)) is None


def test_word_questions() -> None:
    one = render([], [("fish", (150.0, 150.0))], 0.0, 0)
    assert ask(one, "word", random.Random(0)) == ("what word is written?", "fish")
    two = render([], [("fish", (100.0, 100.0)), ("cake", (200.0, 250.0))], 0.0, 0)
    assert ask(two, "word", random.Random(0)) is None
    assert ask(render([], [], 0.0, 0), "word", random.Random(0)) is None


def test_size_questions() -> None:
    objs = [SceneObject("circle", "red", 60, 60, 70), SceneObject("square", "blue", 250, 250, 20)]
    assert _all_answers(render(objs, [], 0.0, 0), "size") == {
        ("is the red circle bigger or smaller than the blue square?", "bigger"),
        ("is the blue square bigger or smaller than the red circle?", "smaller"),
    }
    similar = [SceneObject("circle", "red", 60, 60, 40), SceneObject("square", "blue", 250, 250, 44)]
    assert ask(render(similar, [], 0.0, 0), "size", random.Random(0)) is None


def test_ask_on_generated_scenes_is_consistent() -> None:
    """Cross-check generated answers against the scene's ground truth."""
    for seed in range(40):
        scene = make_scene(seed)
        for qt in QUESTION_TYPES:
            qa = ask(scene, qt, random.Random(seed))
            if qa is None:
                continue
            q, a = qa
            if qt == "color":
                shape = q.rstrip("?").split()[-1]
                assert [o.color for o in scene.objects if o.shape == shape] == [a]
            if qt == "count":
                key = q.split()[2]
                n = sum(o.color == key for o in scene.objects) or sum(o.shape + "s" == key for o in scene.objects)
                assert S.COUNT_WORDS[n - 1] == a


# ------------------------------------------------------------------ pixels


def test_object_centre_pixels_have_object_colour() -> None:
    for seed in range(30):
        scene = make_scene(seed)
        for o in scene.objects:
            assert _pix(scene, o.x, o.y) == COLOR_RGB[o.color], (seed, o)
    objs = [SceneObject(s, c, 40 + 60 * i, 40 + 30 * j, 24) for i, s in enumerate(SHAPES) for j, c in enumerate(COLORS)]
    scene = render(objs, [], 1.0, 3)
    for o in objs:
        assert _pix(scene, o.x, o.y) == COLOR_RGB[o.color]


def test_objects_stand_out_from_background() -> None:
    worst = 1e9
    for seed in range(60):
        scene = make_scene(seed, complexity=float(seed % 11) / 10)
        bg = np.asarray(S._background(seed, scene.clutter)[0]).astype(float)
        for o in scene.objects:
            dist = np.linalg.norm(bg[int(o.y), int(o.x)] - np.array(COLOR_RGB[o.color]))
            worst = min(worst, dist)
    assert worst > 60


def test_objects_and_words_do_not_overlap_and_fit() -> None:
    for seed in range(60):
        scene = make_scene(seed, complexity=1.0)
        boxes = [o.bbox for o in scene.objects]
        boxes += [S.word_bbox(w, fs, *c) for (w, c), fs in zip(scene.words, scene.word_sizes)]
        for b in boxes:
            assert 0 <= b[0] and 0 <= b[1] and b[2] <= IMAGE_SIZE and b[3] <= IMAGE_SIZE
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert S._disjoint(a, b, gap=1)


def test_words_render_visible_pixels() -> None:
    blank = np.asarray(render([], [], 0.0, 5).image).astype(int)
    for size in (16, 28):
        img = np.asarray(render([], [("tree", (168.0, 168.0))], 0.0, 5, word_sizes=[size]).image).astype(int)
        changed = np.abs(img - blank).sum(-1) > 60
        ys, xs = np.nonzero(changed)
        assert changed.sum() > 20
        assert abs(xs.mean() - 168) < 10 and abs(ys.mean() - 168) < 10  # drawn where recorded


def test_scene_counts_ranges() -> None:
    for seed in range(50):
        scene = make_scene(seed)
        assert 1 <= len(scene.objects) <= 12 and 0 <= len(scene.words) <= 2
        assert 0.0 <= scene.clutter <= 1.0 and 0.0 <= scene.complexity <= 1.0
        assert all(w in WORDS for w, _ in scene.words)
        for o in scene.objects:
            assert o.shape in SHAPES and o.color in COLORS and 16 <= o.size <= 80


# --------------------------------------------------------------- complexity


def test_complexity_is_controlled() -> None:
    low = [make_scene(s, 0.1) for s in range(60)]
    high = [make_scene(s, 0.9) for s in range(60)]
    assert np.mean([s.complexity for s in high]) > np.mean([s.complexity for s in low]) + 0.5
    assert np.mean([len(s.objects) for s in high]) > np.mean([len(s.objects) for s in low]) + 5
    assert np.mean([s.clutter for s in high]) > np.mean([s.clutter for s in low])
    assert abs(np.mean([s.complexity for s in low]) - 0.1) < 0.05
    for s in low + high:
        assert s.complexity == pytest.approx(S.complexity_of(len(s.objects), len(s.words), s.clutter))
    uniform = [make_scene(s).complexity for s in range(200)]
    assert min(uniform) < 0.15 and max(uniform) > 0.85


# ------------------------------------------------------------ vocab + balance


def test_vocabulary_covers_all_questions_and_answers() -> None:
    vocab = set(vocabulary())
    assert vocabulary() == sorted(vocab) and all(w == w.lower() for w in vocab)
    samples = make_samples(400, seed=11, split="train")
    for s in samples:
        tokens = S.tokenize(s.question)
        assert tokens[-1] == "?" and len(tokens) <= 14
        assert set(tokens) <= vocab, s.question
        assert s.answer in vocab and " " not in s.answer and s.answer == s.answer.lower()
        assert all(ch.isalpha() or ch in " ?" for ch in s.question)


def test_question_types_balanced() -> None:
    samples = make_samples(80, seed=2)
    counts = collections.Counter(s.question_type for s in samples)
    assert set(counts) == set(QUESTION_TYPES) and set(counts.values()) == {10}
    only = make_samples(6, question_types=("word", "size"))
    assert [s.question_type for s in only] == ["word", "size"] * 3
    fixed = make_samples(16, complexity=0.8)
    assert np.mean([s.complexity for s in fixed]) > 0.6


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call",
    [
        lambda: make_scene(0, complexity=1.5),
        lambda: make_scene(0, complexity=-0.1),
        lambda: make_scene(-1),
        lambda: make_samples(0),
        lambda: make_samples(4, split="val"),
        lambda: make_samples(4, question_types=("colour",)),
        lambda: make_samples(4, complexity=2.0),
        lambda: ask(make_scene(0), "colour", random.Random(0)),
        lambda: render([SceneObject("hexagon", "red", 50, 50, 20)], [], 0.0, 0),
        lambda: render([], [], 1.5, 0),
    ],
)
def test_bad_input_raises(call) -> None:
    with pytest.raises(ValueError):
        call()
