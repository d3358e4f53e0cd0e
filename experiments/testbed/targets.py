"""What each scene teaches besides its answer: the targets of the auxiliary heads and of guided
attention, computed by the data workers from the scene's layout.

- :func:`aux_target`: which (colour, shape) pairs and words are drawn (the CLS head's labels);
- :func:`patch_target`: what covers each patch (the per-patch head's classes);
- :func:`word_bag_matrix`: per patch class, the vocabulary words that name it (the word bag);
- :func:`question_patches`: the patches a question names, one row per guided head group.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from slimvlm.testbed import scenes

PATCH = 14  # the testbed tower's patch side: 336 px -> a 24 x 24 grid
GUIDED_GROUPS = 2  # the guided layer's heads split into this many groups, one per object a question names

#: The CLS head's targets: every (colour, shape) pair, then every word.
AUX_LABELS: tuple[str, ...] = tuple(f"{c} {s}" for c in scenes.COLORS for s in scenes.SHAPES) + tuple(
    f"word:{w}" for w in scenes.WORDS
)
#: Per-patch classes of the dense auxiliary loss: background, each (colour, shape) pair, each word.
PATCH_CLASSES = 1 + len(AUX_LABELS)

_PAIR_INDEX = {(c, s): i for i, (c, s) in enumerate((c, s) for c in scenes.COLORS for s in scenes.SHAPES)}
_WORD_INDEX = {w: len(_PAIR_INDEX) + i for i, w in enumerate(scenes.WORDS)}
_PAIR_COLOR = np.array([-1] + [scenes.COLORS.index(c) for c, _ in _PAIR_INDEX] + [-1] * len(scenes.WORDS))
_PAIR_SHAPE = np.array([-1] + [scenes.SHAPES.index(s) for _, s in _PAIR_INDEX] + [-1] * len(scenes.WORDS))
_REFERENT_STARTS = ("the", "a", "an", "many")


def aux_target(objects: Sequence[scenes.SceneObject], words: Sequence[tuple[str, Any]]) -> np.ndarray:
    """Multi-hot float32 vector over :data:`AUX_LABELS`: which (colour, shape) pairs and words are drawn."""
    target = np.zeros(len(AUX_LABELS), dtype=np.float32)
    for o in objects:
        target[_PAIR_INDEX[(o.color, o.shape)]] = 1.0
    for w, _ in words:
        target[_WORD_INDEX[w]] = 1.0
    return target


def patch_target(objects: Sequence[scenes.SceneObject], words: Sequence[tuple[str, Any]], word_sizes: Sequence[int]) -> np.ndarray:
    """Per patch (raster order), the class of what covers its centre pixel (0 = background,
    1 + an AUX_LABELS index otherwise); an object smaller than a patch still marks the patch
    holding its centre. Dense labels teach the from-scratch vision tower what is where in a few
    minutes, which the answer loss alone does not."""
    canvas = Image.new("L", (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        scenes.draw_object(draw, o, fill=1 + _PAIR_INDEX[(o.color, o.shape)])
    for (word, (cx, cy)), size in zip(words, word_sizes):
        draw.rectangle(scenes.word_bbox(word, size, cx, cy), fill=1 + _WORD_INDEX[word])
    grid = np.asarray(canvas)[PATCH // 2 :: PATCH, PATCH // 2 :: PATCH].copy()
    side = grid.shape[0]
    for o in objects:
        row, col = min(int(o.y) // PATCH, side - 1), min(int(o.x) // PATCH, side - 1)
        grid[row, col] = 1 + _PAIR_INDEX[(o.color, o.shape)]
    return grid.reshape(-1).astype(np.int64)


def word_bag_matrix(tokenizer) -> torch.Tensor:
    """Per patch class, the LM vocabulary tokens that name it: a shape's colour and shape words, a
    written word's own token(s); nothing for background.

    The "word bag" loss asks each *projected* patch (the LM's input) to score these tokens highest
    against the LM's input embeddings, so visual tokens start out in the LM's word space: a
    question's "circle" can then find circle patches by matching like with like, and their colour
    words travel straight to the answer. Without it, two runs of 0.6-1.6M samples stayed at chance
    (the LM never learned to bind a name to the patches it names)."""
    bag = torch.zeros(PATCH_CLASSES, len(tokenizer))
    for c, label in enumerate(AUX_LABELS, start=1):
        text = label.removeprefix("word:")
        bag[c, tokenizer(text, add_special_tokens=False)["input_ids"]] = 1.0
    return bag


def question_patches(question: str, patches: np.ndarray) -> np.ndarray:
    """Bool (GUIDED_GROUPS, 576): the patches showing what ``question`` is about, one row per head group
    of the guided layer, from the scene's per-patch classes.

    Every "the/a/an/many" opens a referent; colour and shape words after it narrow it down (a
    referent with neither, "how many objects", means every object). A question with two referents
    ("is the red circle left of the blue square?") gives the first to group 0 and the second to group
    1, so the answer position receives each object through its own heads and can compare them; a
    single referent goes to every group. Questions about the written word point at the word patches.
    Empty when nothing named is drawn ("is there a red star?" -> no). This is the attention the
    answer needs, used to guide the LM's attention in training."""
    referents: list[list[int | None]] = []
    for token in scenes.tokenize(question):
        if token in _REFERENT_STARTS:
            referents.append([None, None])
        elif referents and token in scenes.COLORS:
            referents[-1][0] = scenes.COLORS.index(token)
        elif referents and (token in scenes.SHAPES or token.removesuffix("s") in scenes.SHAPES):
            referents[-1][1] = scenes.SHAPES.index(token.removesuffix("s") if token not in scenes.SHAPES else token)
    if not referents:  # "what word is written?"
        return np.repeat((patches > len(_PAIR_INDEX))[None], GUIDED_GROUPS, axis=0)
    if len(referents) > GUIDED_GROUPS:
        raise ValueError(f"{question!r} names {len(referents)} objects; guided attention has {GUIDED_GROUPS} head groups")
    colour, shape = _PAIR_COLOR[patches], _PAIR_SHAPE[patches]
    hits = [
        (colour >= 0) & ((colour == c) if c is not None else True) & ((shape == sh) if sh is not None else True)
        for c, sh in referents
    ]
    return np.stack([hits[g * len(hits) // GUIDED_GROUPS] for g in range(GUIDED_GROUPS)])
