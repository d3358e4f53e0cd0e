"""Deterministic short clips (lists of frames) with questions about what happens over time.

Why this exists: LLaVA-Mini's point for video is that a clip of many frames fits in a few visual
tokens (C per frame) where the untouched model, at 576 tokens a frame, runs out of context. To
measure it we need clips whose answers need more than one frame: objects appear and disappear
(each is visible during its own window of frames) and some move in a straight line while they
are visible. Everything is a pure function of integer seeds, like the scenes.

Questions use the testbed's word-level vocabulary only (scenes.vocabulary()), so the trained
testbed model can read them; each is about the whole clip:

* total: "how many objects are there?" - objects that appear at any time (each counted once);
* count: "how many circles / red objects are there?" - the same, of one shape or colour;
* presence: "is there a red circle?" - did one appear at any time;
* color / shape: "what color is the star?", "what shape is the red object?" - about the one object
  of that shape/colour in the clip, which may be visible in a few frames only (what appeared).

Frames are the clip sampled at `frames` evenly spaced times t = i / (frames - 1); an object's
window is a range of frame indices, and a moving object is at start + t (end - start).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import scenes
from .build import format_prompt

__all__ = [
    "CLIP_QUESTION_TYPES",
    "ClipObject",
    "Clip",
    "ClipSample",
    "clip_layout",
    "render_clip",
    "make_clip",
    "ask_clip",
    "make_clip_samples",
    "format_clip_prompt",
]

CLIP_QUESTION_TYPES: tuple[str, ...] = ("total", "count", "presence", "color", "shape")
MAX_CLIP_OBJECTS = len(scenes.COUNT_WORDS)  # so every total has a count word
_MOVE = 90.0  # largest displacement over the clip, pixels


@dataclass(frozen=True)
class ClipObject:
    """One object of a clip: visible in frames first..last (inclusive), its centre moving linearly
    from (x0, y0) at t = 0 to (x1, y1) at t = 1 (equal for a still object)."""

    shape: str
    color: str
    size: float
    x0: float
    y0: float
    x1: float
    y1: float
    first: int
    last: int

    def visible(self, frame: int) -> bool:
        return self.first <= frame <= self.last

    @property
    def moving(self) -> bool:
        return (self.x0, self.y0) != (self.x1, self.y1)

    def at(self, frame: int, frames: int) -> scenes.SceneObject:
        """The object as drawn in `frame` of a clip of `frames` frames."""
        t = frame / (frames - 1) if frames > 1 else 0.0
        x = round(self.x0 + t * (self.x1 - self.x0))
        y = round(self.y0 + t * (self.y1 - self.y0))
        return scenes.SceneObject(self.shape, self.color, float(x), float(y), self.size)


@dataclass
class Clip:
    seed: int
    frames: list[Image.Image]
    objects: list[ClipObject]
    clutter: float


@dataclass
class ClipSample:
    """One (frames, question, one-word answer) item; `image` is the list of frames."""

    id: str
    frames: list[Image.Image]
    question: str
    answer: str
    question_type: str
    complexity: float | None = None

    @property
    def image(self) -> list[Image.Image]:
        return self.frames


def _check_frames(frames: int) -> None:
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {frames!r}")


def _box(o: scenes.SceneObject) -> tuple[float, float, float, float]:
    return o.bbox


def clip_layout(seed: int, frames: int = 8) -> tuple[list[ClipObject], float]:
    """Objects and clutter of clip `seed`: 2..6 objects, half of them moving; no two overlap in a
    frame where both are visible; at least one appears after the first frame."""
    scenes._check_seed(seed)
    _check_frames(frames)
    rng = np.random.default_rng([seed, 0xC1])
    count = int(rng.integers(2, MAX_CLIP_OBJECTS + 1))
    clutter = float(rng.uniform(0.0, 0.5))
    sizes = (scenes.SIZE_RANGES["medium"], scenes.SIZE_RANGES["large"])
    placed: list[ClipObject] = []
    for index in range(count):
        for _ in range(40):
            lo, hi = sizes[int(rng.integers(2))]
            size = float(rng.integers(lo, hi + 1))
            low, high = scenes._GAP + size / 2, scenes.IMAGE_SIZE - scenes._GAP - size / 2
            x0, y0 = (float(round(v)) for v in rng.uniform(low, high, 2))
            if rng.random() < 0.5:
                dx, dy = rng.uniform(-_MOVE, _MOVE, 2)
                x1, y1 = float(round(np.clip(x0 + dx, low, high))), float(round(np.clip(y0 + dy, low, high)))
            else:
                x1, y1 = x0, y0
            first = int(rng.integers(1, frames)) if index == 0 and frames > 1 else int(rng.integers(frames))
            last = int(rng.integers(first, frames))
            candidate = ClipObject(scenes.SHAPES[int(rng.integers(len(scenes.SHAPES)))],
                                   scenes.COLORS[int(rng.integers(len(scenes.COLORS)))], size, x0, y0, x1, y1, first, last)
            if all(
                scenes._disjoint(_box(candidate.at(f, frames)), _box(other.at(f, frames)))
                for other in placed
                for f in range(max(first, other.first), min(last, other.last) + 1)
            ):
                placed.append(candidate)
                break
    return placed, clutter


def render_clip(objects: list[ClipObject], frames: int, clutter: float = 0.0, seed: int = 0) -> list[Image.Image]:
    """The frames: each draws the objects visible in it, on the clip's one background."""
    _check_frames(frames)
    return [scenes.render([o.at(f, frames) for o in objects if o.visible(f)], (), clutter, seed).image for f in range(frames)]


def make_clip(seed: int, frames: int = 8) -> Clip:
    objects, clutter = clip_layout(seed, frames)
    return Clip(seed=int(seed), frames=render_clip(objects, frames, clutter, seed), objects=objects, clutter=clutter)


def _stub(objects: list[ClipObject]) -> scenes.Scene:
    """The clip's objects as one scene (each once), for the scene askers of colour, shape, count and
    presence, which read no positions."""
    flat = [scenes.SceneObject(o.shape, o.color, o.x0, o.y0, o.size) for o in objects]
    return scenes.Scene(0, None, flat, [], 0.0, 0.0)  # type: ignore[arg-type]


def ask_clip(objects: list[ClipObject], question_type: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of this type about the whole clip, or None when it cannot be asked unambiguously."""
    if question_type not in CLIP_QUESTION_TYPES:
        raise ValueError(f"unknown clip question type {question_type!r}; expected one of {CLIP_QUESTION_TYPES}")
    if question_type == "total":
        if not 1 <= len(objects) <= len(scenes.COUNT_WORDS):
            return None
        return "how many objects are there?", scenes.COUNT_WORDS[len(objects) - 1]
    return scenes.ask(_stub(objects), question_type, rng)


def clip_seed(seed: int, split: str, k: int) -> int:
    """Clip seed: parity encodes the split (train even, test odd), as for scenes."""
    return scenes.scene_seed(seed, split, k)


def make_clip_samples(
    n: int,
    seed: int = 0,
    split: str = "test",
    frames: int = 8,
    question_types: tuple[str, ...] | list[str] = CLIP_QUESTION_TYPES,
) -> list[ClipSample]:
    """`n` deterministic clip samples; types round-robin, a new clip when a type cannot be asked."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    scenes._check_seed(seed)
    _check_frames(frames)
    if split not in scenes.SPLITS:
        raise ValueError(f"split must be one of {scenes.SPLITS}, got {split!r}")
    question_types = (question_types,) if isinstance(question_types, str) else tuple(question_types)
    if not question_types or any(t not in CLIP_QUESTION_TYPES for t in question_types):
        raise ValueError(f"question_types must be a non-empty selection of {CLIP_QUESTION_TYPES}, got {question_types!r}")
    samples: list[ClipSample] = []
    k = 0
    for i in range(n):
        kind = question_types[i % len(question_types)]
        for _ in range(10_000):
            s = clip_seed(seed, split, k)
            k += 1
            objects, clutter = clip_layout(s, frames)
            qa = ask_clip(objects, kind, random.Random(s))
            if qa is not None:
                break
        else:  # pragma: no cover - would need a pathological generator
            raise RuntimeError(f"could not ask a {kind!r} clip question after 10000 clips")
        samples.append(ClipSample(id=f"{split}-clip-{i:06d}", frames=render_clip(objects, frames, clutter, s),
                                  question=qa[0], answer=qa[1], question_type=kind))
    return samples


def format_clip_prompt(question: str, frames: int) -> str:
    """The testbed prompt with one image placeholder per frame, in order."""
    _check_frames(frames)
    return format_prompt(question, int(frames))
