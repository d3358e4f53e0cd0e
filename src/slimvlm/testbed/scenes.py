"""Deterministic procedural scenes and one-word-answer questions about them.

Why this exists: to measure how visual-token reduction hurts a VLM we need an
unlimited, exactly reproducible supply of images whose ground truth is known and
whose questions range from coarse (is there a red circle?) to fine (what does the
small word say? how many small stars?). Everything here is a pure function of
integer seeds: scene layout uses ``numpy.random.default_rng`` and questions use
``random.Random``, always explicitly seeded, never global RNG state.

Complexity of a scene (documented formula, see :func:`complexity_of`)::

    complexity = 0.5 * (n_objects - 1) / 11  +  0.1 * n_words / 2  +  0.4 * clutter

with ``n_objects`` in 1..12, ``n_words`` in 0..2 and ``clutter`` in [0, 1]. Clutter
drives the background: 0 is a flat colour, then a linear gradient fades in
(full at clutter 0.25), then smooth value-noise texture (from 0.25 to 1), and
``round(50 * clutter ** 1.5)`` small grey distractor dots / short lines.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "IMAGE_SIZE",
    "SHAPES",
    "COLORS",
    "COLOR_RGB",
    "WORDS",
    "QUESTION_TYPES",
    "SIZE_RANGES",
    "SceneObject",
    "Scene",
    "Sample",
    "complexity_of",
    "render",
    "make_scene",
    "ask",
    "make_samples",
    "vocabulary",
    "tokenize",
]

IMAGE_SIZE: int = 336

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")

# Saturated or extreme colours; backgrounds are mid-grey (slightly tinted), so
# every object colour is >= ~80 RGB-distance away from the background under it.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)

# Short concrete nouns; none is a colour or shape name so 'word' answers never
# collide with the attribute vocabulary.
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "tree", "car", "bus", "fish", "bird", "moon", "book",
    "cup", "hat", "key", "box", "bed", "door", "lamp", "ship", "frog", "cake",
    "milk", "rain", "snow", "wind", "fire", "leaf", "rock", "sand", "road", "king",
    "cow", "pig", "egg", "pen", "map", "bell", "kite", "ball", "shoe", "sock",
    "coat", "ring", "drum", "rose", "corn", "bean", "nest", "duck", "goat", "wolf",
)

QUESTION_TYPES: tuple[str, ...] = (
    "color", "shape", "count", "presence", "position", "quadrant", "word", "size",
)

# Bounding-box side in pixels, per size class (small ones need fine detail).
SIZE_RANGES: dict[str, tuple[int, int]] = {
    "small": (16, 24),
    "medium": (32, 48),
    "large": (56, 80),
}

MAX_OBJECTS = 12
MAX_WORDS = 2
FONT_SIZES = (16, 28)  # inclusive range of word font sizes (px)
_GAP = 4  # minimum empty pixels between any two placed items
_PLACE_TRIES = 40  # rejection-sampling attempts per object / word
_POSITION_MIN_DELTA = 20.0  # centres must differ by more than this on the asked axis
_SIZE_MIN_RATIO = 1.3  # bigger/smaller only asked when sizes differ by this factor
_QUADRANT_MARGIN = 12.0  # centre must be this far from both midlines (or size/4)

COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six")
QUADRANTS: tuple[str, ...] = ("topleft", "topright", "bottomleft", "bottomright")
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape; (x, y) is its centre and size its bounding-box side, in pixels."""

    shape: str
    color: str
    x: float
    y: float
    size: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Axis-aligned box (x0, y0, x1, y1) that contains the whole shape."""
        r = self.size / 2
        return (self.x - r, self.y - r, self.x + r, self.y + r)


@dataclass
class Scene:
    """A rendered scene plus the ground truth needed to answer questions about it.

    ``words`` holds (word, text-box centre); ``word_sizes`` the matching font sizes
    (an extra field, so word boxes can be recomputed by analysis code).
    """

    seed: int
    image: Image.Image
    objects: list[SceneObject]
    words: list[tuple[str, tuple[float, float]]]
    clutter: float
    complexity: float
    word_sizes: list[int] = field(default_factory=list)


@dataclass
class Sample:
    """One (image, question, one-word answer) item for training or evaluation."""

    id: str
    image: Image.Image
    question: str
    answer: str
    question_type: str
    complexity: float


# --------------------------------------------------------------------------- helpers


def complexity_of(n_objects: int, n_words: int, clutter: float) -> float:
    """Scene complexity in [0, 1]; one documented formula so it is comparable across runs."""
    n_objects = min(max(n_objects, 1), MAX_OBJECTS)
    value = (
        0.5 * (n_objects - 1) / (MAX_OBJECTS - 1)
        + 0.1 * min(n_words, MAX_WORDS) / MAX_WORDS
        + 0.4 * clutter
    )
    return float(min(max(value, 0.0), 1.0))


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (no download); cached because loading costs ~0.1 ms."""
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=4096)
def _text_box(word: str, size: int) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the inked text relative to the draw origin."""
    left, top, right, bottom = _font(size).getbbox(word)
    return left, top, right - left, bottom - top


def word_bbox(word: str, size: int, cx: float, cy: float) -> tuple[float, float, float, float]:
    _, _, w, h = _text_box(word, size)
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def _disjoint(a: tuple[float, ...], b: tuple[float, ...], gap: float = _GAP) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _check_complexity(complexity: float | None) -> None:
    if complexity is None:
        return
    if not isinstance(complexity, (int, float)) or not (0.0 <= float(complexity) <= 1.0):
        raise ValueError(f"complexity must be a float in [0, 1] or None, got {complexity!r}")


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


# ----------------------------------------------------------------------- rendering

def _background(seed: int, clutter: float) -> tuple[Image.Image, np.ndarray]:
    """RGB background and its uint8 luminance; flat -> gradient -> smooth noise as clutter grows.

    The luminance field is built on a small k x k grid (linear gradient + uniform
    noise) and upsampled bicubically, then tinted through a palette: ~0.7 ms.
    """
    rng = np.random.default_rng([seed, 0xB6])
    base = float(rng.uniform(105.0, 150.0))
    tint = rng.integers(-10, 11, 3)
    grad_amp = 20.0 * min(1.0, clutter / 0.25)
    noise_amp = 22.0 * min(1.0, max(0.0, (clutter - 0.25) / 0.75))
    angle = float(rng.uniform(0.0, 2 * math.pi))
    k = int(rng.integers(4, 13))
    noise = rng.uniform(-1.0, 1.0, (k, k))
    if grad_amp == 0.0 and noise_amp == 0.0:
        lum = np.full((IMAGE_SIZE, IMAGE_SIZE), round(base), dtype=np.uint8)
        color = tuple(int(np.clip(round(base) + t, 0, 255)) for t in tint)
        return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), color), lum
    coord = (np.arange(k) + 0.5) / k * 2 - 1
    ramp = (math.cos(angle) * coord[None, :] + math.sin(angle) * coord[:, None]) / math.sqrt(2)
    grid = base + grad_amp * ramp + noise_amp * noise
    small = Image.fromarray(np.clip(np.rint(grid), 0, 255).astype(np.uint8), "L")
    lum_img = small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    lum = np.asarray(lum_img)
    palette = np.clip(np.arange(256)[:, None] + tint[None, :], 0, 255).astype(np.uint8)
    pal_img = Image.fromarray(lum, "P")
    pal_img.putpalette(palette.tobytes())
    return pal_img.convert("RGB"), lum


def _draw_distractors(draw: ImageDraw.ImageDraw, seed: int, clutter: float, lum: np.ndarray) -> None:
    """Small grey dots and short thin lines: visual clutter that is never an object colour."""
    count = round(50 * clutter**1.5)
    if count == 0:
        return
    rng = np.random.default_rng([seed, 0xD1])
    xs = rng.uniform(0, IMAGE_SIZE - 1, count).tolist()
    ys = rng.uniform(0, IMAGE_SIZE - 1, count).tolist()
    kinds = rng.random(count).tolist()
    shifts = (rng.uniform(35, 60, count) * rng.choice((-1.0, 1.0), count)).tolist()
    radii = rng.integers(1, 4, count).tolist()
    lengths = rng.uniform(6, 20, count).tolist()
    angles = rng.uniform(0, math.pi, count).tolist()
    widths = rng.integers(1, 3, count).tolist()
    for i in range(count):
        x, y = xs[i], ys[i]
        g = min(255, max(0, int(lum[int(y), int(x)]) + int(shifts[i])))
        fill = (g, g, g)
        if kinds[i] < 0.5:
            r = radii[i]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        else:
            dx = math.cos(angles[i]) * lengths[i] / 2
            dy = math.sin(angles[i]) * lengths[i] / 2
            draw.line((x - dx, y - dy, x + dx, y + dy), fill=fill, width=widths[i])


def _shape_polygon(obj: SceneObject) -> list[tuple[float, float]]:
    x, y, r = obj.x, obj.y, obj.size / 2
    if obj.shape == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if obj.shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if obj.shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {obj.shape!r}")


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill: tuple[int, int, int] | int | None = None) -> None:
    """Draw obj in its colour, or in `fill` (a label map draws the same pixels with a class id)."""
    fill = COLOR_RGB[obj.color] if fill is None else fill
    x, y, r = obj.x, obj.y, obj.size / 2
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r - 1, y + r - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x - r, y - r, x + r - 1, y + r - 1), fill=fill)
    else:
        draw.polygon(_shape_polygon(obj), fill=fill)


def render(
    objects: Sequence[SceneObject],
    words: Sequence[tuple[str, tuple[float, float]]] = (),
    clutter: float = 0.0,
    seed: int = 0,
    word_sizes: Sequence[int] | None = None,
) -> Scene:
    """Draw given objects and words on a seed-determined background.

    Used by :func:`make_scene` and by tests that build scenes by hand, so the
    ground truth is exactly what was asked for. ``word_sizes`` defaults to 24 px.
    """
    _check_seed(seed)
    if not 0.0 <= clutter <= 1.0:
        raise ValueError(f"clutter must be in [0, 1], got {clutter!r}")
    for obj in objects:
        if obj.shape not in SHAPES:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
        if obj.color not in COLOR_RGB:
            raise ValueError(f"unknown colour {obj.color!r}; expected one of {COLORS}")
    sizes = [24] * len(words) if word_sizes is None else [int(s) for s in word_sizes]
    if len(sizes) != len(words):
        raise ValueError("word_sizes must have one entry per word")

    image, lum = _background(seed, clutter)
    draw = ImageDraw.Draw(image)
    _draw_distractors(draw, seed, clutter, lum)
    for obj in objects:
        draw_object(draw, obj)
    for (word, (cx, cy)), size in zip(words, sizes):
        left, top, w, h = _text_box(word, size)
        x0, y0 = cx - w / 2, cy - h / 2
        ix0, iy0 = max(0, int(x0)), max(0, int(y0))
        patch = lum[iy0 : max(iy0 + 1, int(y0 + h)), ix0 : max(ix0 + 1, int(x0 + w))]
        fill = (15, 15, 15) if float(patch.mean()) > 118 else (245, 245, 245)
        draw.text((x0 - left, y0 - top), word, font=_font(size), fill=fill)

    return Scene(
        seed=int(seed),
        image=image,
        objects=list(objects),
        words=[(w, (float(c[0]), float(c[1]))) for w, c in words],
        clutter=float(clutter),
        complexity=complexity_of(len(objects), len(words), clutter),
        word_sizes=sizes,
    )


# -------------------------------------------------------------------------- layout


def layout(
    seed: int, complexity: float | None
) -> tuple[list[SceneObject], list[tuple[str, tuple[float, float]]], list[int], float]:
    """Choose objects, words and clutter for a seed; cheap, so samplers can reject before drawing."""
    rng = np.random.default_rng([seed, 0x5CE])
    target = float(rng.uniform()) if complexity is None else float(complexity)
    n_objects = int(np.clip(round(1 + 11 * target + rng.normal(0.0, 1.0)), 1, MAX_OBJECTS))
    n_words = int(rng.binomial(MAX_WORDS, 0.15 + 0.6 * target))

    # Pre-draw a fixed block of randoms per attempt: fast and stable.
    n_att = n_objects * _PLACE_TRIES
    u = rng.random((n_att, 5))
    size_classes = tuple(SIZE_RANGES.values())
    placed: list[SceneObject] = []
    boxes: list[tuple[float, float, float, float]] = []
    att = 0
    for _ in range(n_objects):
        for _ in range(_PLACE_TRIES):
            a = u[att]
            att += 1
            lo, hi = size_classes[int(a[0] * 3)]
            size = float(lo + int(a[1] * (hi - lo + 1)))
            half = size / 2
            x = float(round(_GAP + half + a[2] * (IMAGE_SIZE - 2 * _GAP - size)))
            y = float(round(_GAP + half + a[3] * (IMAGE_SIZE - 2 * _GAP - size)))
            box = (x - half, y - half, x + half, y + half)
            if all(_disjoint(box, b) for b in boxes):
                shape = SHAPES[int(a[4] * len(SHAPES))]
                color = COLORS[int(rng.integers(len(COLORS)))]
                placed.append(SceneObject(shape, color, x, y, size))
                boxes.append(box)
                break

    words: list[tuple[str, tuple[float, float]]] = []
    word_sizes: list[int] = []
    chosen = rng.choice(len(WORDS), size=n_words, replace=False) if n_words else []
    for idx in chosen:
        word = WORDS[int(idx)]
        fsize = int(rng.integers(FONT_SIZES[0], FONT_SIZES[1] + 1))
        _, _, w, h = _text_box(word, fsize)
        pos = rng.random((_PLACE_TRIES, 2))
        for px, py in pos:
            cx = float(round(_GAP + w / 2 + px * (IMAGE_SIZE - 2 * _GAP - w)))
            cy = float(round(_GAP + h / 2 + py * (IMAGE_SIZE - 2 * _GAP - h)))
            box = word_bbox(word, fsize, cx, cy)
            if all(_disjoint(box, b) for b in boxes):
                words.append((word, (cx, cy)))
                word_sizes.append(fsize)
                boxes.append(box)
                break

    # Clutter absorbs the rest of the target so realised complexity ~= target.
    rest = target - complexity_of(len(placed), len(words), 0.0)
    clutter = float(np.clip(rest / 0.4, 0.0, 1.0))
    return placed, words, word_sizes, clutter


def make_scene(seed: int, complexity: float | None = None) -> Scene:
    """Scene for ``seed``; complexity drawn uniformly when None, else targeted (more objects, clutter)."""
    _check_seed(seed)
    _check_complexity(complexity)
    objects, words, word_sizes, clutter = layout(seed, complexity)
    return render(objects, words, clutter, seed, word_sizes)


# ------------------------------------------------------------------------ questions


def _article(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def _unique_refs(scene: Scene) -> list[SceneObject]:
    """Objects that 'the <colour> <shape>' names without ambiguity."""
    counts: dict[tuple[str, str], int] = {}
    for o in scene.objects:
        counts[(o.color, o.shape)] = counts.get((o.color, o.shape), 0) + 1
    return [o for o in scene.objects if counts[(o.color, o.shape)] == 1]


def _name(o: SceneObject) -> str:
    return f"{o.color} {o.shape}"


def _unique_by(scene: Scene, attribute: str) -> list[SceneObject]:
    """Objects that their `attribute` alone names ('the circle' when only one is a circle)."""
    values = [getattr(o, attribute) for o in scene.objects]
    return [o for o, value in zip(scene.objects, values) if values.count(value) == 1]


def _ask_color(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    candidates = _unique_by(scene, "shape")
    if not candidates:
        return None
    o = rng.choice(candidates)
    return f"what color is the {o.shape}?", o.color


def _ask_shape(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    candidates = _unique_by(scene, "color")
    if not candidates:
        return None
    o = rng.choice(candidates)
    return f"what shape is the {o.color} object?", o.shape


def _ask_count(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    by_count: dict[int, list[str]] = {}
    for shape in SHAPES:
        c = sum(o.shape == shape for o in scene.objects)
        if 1 <= c <= len(COUNT_WORDS):
            by_count.setdefault(c, []).append(f"how many {shape}s are there?")
    for color in COLORS:
        c = sum(o.color == color for o in scene.objects)
        if 1 <= c <= len(COUNT_WORDS):
            by_count.setdefault(c, []).append(f"how many {color} objects are there?")
    if not by_count:
        return None
    counts = sorted(by_count)
    count = rng.choices(counts, weights=counts)[0]  # favour larger counts: fewer 'one's
    return rng.choice(by_count[count]), COUNT_WORDS[count - 1]


def _ask_presence(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5 and present:
        color, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        # Half the time a near miss (shares colour or shape with something present)
        # so the model must bind attributes, not just detect them.
        near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
        pool = near if near and rng.random() < 0.5 else absent
        color, shape = rng.choice(pool)
        answer = "no"
    return f"is there {_article(color)} {color} {shape}?", answer


def _ask_position(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    refs = _unique_refs(scene)
    cands = []
    for i, a in enumerate(refs):
        for b in refs[i + 1 :]:
            need = max(_POSITION_MIN_DELTA, 0.25 * (a.size + b.size))
            if abs(a.x - b.x) > need:
                cands.append((a, b, "x"))
            if abs(a.y - b.y) > need:
                cands.append((a, b, "y"))
    if not cands:
        return None
    a, b, axis = rng.choice(cands)
    if rng.random() < 0.5:
        a, b = b, a
    if axis == "x":
        return f"is the {_name(a)} left or right of the {_name(b)}?", "left" if a.x < b.x else "right"
    return f"is the {_name(a)} above or below the {_name(b)}?", "above" if a.y < b.y else "below"


def _quadrant(o: SceneObject) -> str | None:
    mid = IMAGE_SIZE / 2
    margin = max(_QUADRANT_MARGIN, o.size / 4)
    if abs(o.x - mid) <= margin or abs(o.y - mid) <= margin:
        return None
    return ("top" if o.y < mid else "bottom") + ("left" if o.x < mid else "right")


def _ask_quadrant(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    cands = [(o, q) for o in _unique_refs(scene) if (q := _quadrant(o)) is not None]
    if not cands:
        return None
    o, q = rng.choice(cands)
    return f"which quadrant is the {_name(o)} in?", q


def _ask_word(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    if len(scene.words) != 1:
        return None
    return "what word is written?", scene.words[0][0]


def _ask_size(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    refs = _unique_refs(scene)
    cands = [
        (a, b)
        for i, a in enumerate(refs)
        for b in refs[i + 1 :]
        if max(a.size, b.size) >= _SIZE_MIN_RATIO * min(a.size, b.size)
    ]
    if not cands:
        return None
    a, b = rng.choice(cands)
    if rng.random() < 0.5:
        a, b = b, a
    answer = "bigger" if a.size > b.size else "smaller"
    return f"is the {_name(a)} bigger or smaller than the {_name(b)}?", answer


_ASKERS = {
    "color": _ask_color,
    "shape": _ask_shape,
    "count": _ask_count,
    "presence": _ask_presence,
    "position": _ask_position,
    "quadrant": _ask_quadrant,
    "word": _ask_word,
    "size": _ask_size,
}
assert tuple(_ASKERS) == QUESTION_TYPES


def ask(scene: Scene, question_type: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of this type about the scene, or None when it would be ambiguous."""
    if question_type not in _ASKERS:
        raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")
    return _ASKERS[question_type](scene, rng)


# ------------------------------------------------------------------------- samples

SCENE_BLOCK = 1 << 24  # scenes one make_samples call may draw before seeds could repeat


def scene_seed(seed: int, split: str, k: int) -> int:
    """Scene seed: parity encodes the split, so train and test never share a scene."""
    return (seed * SCENE_BLOCK + k) * 2 + SPLITS.index(split)


def make_samples(
    n: int,
    seed: int = 0,
    split: str = "test",
    question_types: Sequence[str] = QUESTION_TYPES,
    complexity: float | None = None,
) -> list[Sample]:
    """``n`` deterministic samples; types round-robin (exactly balanced), new scenes when a type can't be asked.

    Each sample's scene is ``make_scene(s, complexity)`` for some ``s`` whose parity is the
    split (train even, test odd), so the splits are disjoint for any ``seed``.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    _check_seed(seed)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(question_types, str):
        question_types = (question_types,)
    question_types = tuple(question_types)
    if not question_types:
        raise ValueError("question_types must not be empty")
    for qt in question_types:
        if qt not in _ASKERS:
            raise ValueError(f"unknown question type {qt!r}; expected one of {QUESTION_TYPES}")
    _check_complexity(complexity)

    samples: list[Sample] = []
    k = 0
    for i in range(n):
        qt = question_types[i % len(question_types)]
        for _ in range(10_000):
            if k >= SCENE_BLOCK:
                raise ValueError("too many scenes for one call; split it over several seeds")
            s = scene_seed(seed, split, k)
            k += 1
            objects, words, word_sizes, clutter = layout(s, complexity)
            stub = Scene(s, None, objects, words, clutter, 0.0, word_sizes)  # type: ignore[arg-type]
            qa = ask(stub, qt, random.Random(s))
            if qa is not None:
                break
        else:  # pragma: no cover - would need a pathological generator
            raise RuntimeError(f"could not ask a {qt!r} question after 10000 scenes")
        scene = render(objects, words, clutter, s, word_sizes)
        samples.append(
            Sample(
                id=f"{split}-{i:06d}",
                image=scene.image,
                question=qa[0],
                answer=qa[1],
                question_type=qt,
                complexity=scene.complexity,
            )
        )
    return samples


def tokenize(text: str) -> list[str]:
    """Word-level tokens of a question or answer: lower-case, '?' is its own token."""
    return text.lower().replace("?", " ?").split()


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    words: set[str] = {"?"}
    templates = (
        "what color is the", "what shape is the object", "how many are there objects",
        "is there a an", "is the left or right of the", "is the above or below the",
        "which quadrant is the in", "what word is written", "is the bigger or smaller than the",
        "yes no left right above below bigger smaller",
    )
    for t in templates:
        words.update(t.split())
    words.update(SHAPES)
    words.update(f"{s}s" for s in SHAPES)
    words.update(COLORS)
    words.update(WORDS)
    words.update(COUNT_WORDS)
    words.update(QUADRANTS)
    return tuple(sorted(words))


def vocabulary() -> list[str]:
    """Every token any question or answer can contain, for building a word-level tokenizer."""
    return list(_vocabulary())
