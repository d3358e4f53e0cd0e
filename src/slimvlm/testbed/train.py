"""Train slimvlm's testbed VLM from scratch on procedurally drawn scenes.

Usage::

    python -m slimvlm.testbed.train --out DIR [--size testbed|tiny] [--minutes 9] [--device cuda]
        [--batch-size 192] [--lr 1e-3] [--eval-samples 800] [--workers N] [--seed 0] [--steps N]
        [--curriculum-steps 3000] [--init PREVIOUS_DIR] [--warmup-steps N] [--compile] [--token-dropout 0.25]

    # a chain of short calls: each saves its folder, the next continues from it
    python -m slimvlm.testbed.train --out run1 --minutes 8.5
    python -m slimvlm.testbed.train --out run2 --minutes 8.5 --init run1

Everything (CLIP vision tower, projector, Llama decoder) starts from random weights and
is trained on an endless stream of :mod:`slimvlm.testbed.scenes` samples (train split
only), with two losses:

* the language-model loss on the answer word and the closing eos (prompt tokens are
  masked with -100), and
* auxiliary losses (summed, weight 0.5) on the vision tower's feature layer (``hidden_states[-2]``):
  a linear head on the CLS hidden state predicts, with BCE, which (colour, shape) pairs
  and which words are in the scene (slimvlm's CLS-attention methods need a CLS token that
  carries a trained global signal; without this loss the CLS row of a LLaVA tower gets no
  gradient at all, the "default" feature selection drops it); per-patch heads predict what
  covers each patch and the patch's grid row and column (cross-entropy); the *word bag*
  (:func:`word_bag_matrix`) asks each projected patch to name what covers it in the LM's own
  input-embedding space; and *guided attention* (:func:`guided_attention_loss`): decoder
  layer ``GUIDED_LAYER``'s attention from the answer position should fall on the patches the
  question names (:func:`question_patches`), one head group per named object. The heads are
  training-only: they are not part of the saved model (``aux_heads.safetensors`` beside it
  keeps them for ``--init``).

  Why guided attention: without it, three H100 runs (0.6M-1.6M samples, with and without
  the curriculum and the word bag) stayed at chance (35-38% held-out): the LM learned the
  answer priors and never learned to find the named object among 576 patches. With it,
  continuing the 1.6M-sample run for 5.6 minutes reached 61% (shape 100%, colour 78%).

Token dropout (``--token-dropout P``, default 0.25): a fraction P of batches have every image span cut
to a random 64 or 192 of its 576 patches, renumbered (:func:`shorten_image_span`), so the LM does not
come to depend on absolute positions (the interim model, trained without it, loses ~25 points to any
method that shortens the span, for that reason alone). Under ``--compile`` this makes three batch
shapes, hence three compilations.

The log also records the teacher-forced accuracy of the first answer token on the training
batches, per question type (``train_acc_per_type``), so learning shows before any evaluation.

Curriculum (``--curriculum-steps N``, default 3000; 0 disables): a training scene's target
complexity (see :mod:`slimvlm.testbed.scenes`) is uniform on ``[0, cap]``, the cap rising
linearly from 0.15 (1-3 objects, little clutter) at global step 0 to 1.0 at step N;
from then on scenes are drawn exactly like the held-out ones. Evaluation always uses the
standard held-out set. Each data worker estimates the global step as (batches it has made)
x (number of workers) + the curriculum steps the ``--init`` chain has done already (its runs
without a curriculum, e.g. folders trained before it existed, count 0: the ramp restarts).

Continuing (``--init DIR``): the weights of a folder saved by this script (same ``--size``,
else SlimVLMError) are loaded, together with its aux heads; the optimizer is new, with a
short warmup (``--warmup-steps``, default 100 with ``--init``) and a fresh cosine over this
run's budget. ``eval.json`` and the card record the chain: every run's folder, steps,
samples and minutes, and the totals. Several short calls (e.g. two of 8.5 minutes) thus
make one long training.

``--compile`` compiles the training loss function (vision tower, projector, decoder,
heads, forward and backward) with ``torch.compile``; the model object itself stays eager,
so evaluation's ``generate`` never runs compiled code. Batches then have one shape (a fixed
number of scenes, always; a fixed padded width under ``--compile``), so it compiles once.
If compilation fails, the run goes on eagerly (noted in the log, card and eval.json).

Data pipeline (measured ~300 scenes / ~900 samples/s per worker on CPU, so 14 workers out-supply one GPU):

* ``DataLoader`` workers each own a distinct stream of even (train-split) scene seeds
  and yield whole, already collated batches (``batch_size=None``), so the training loop
  does no per-sample Python work.
* One rendered scene answers ``--questions-per-scene`` (default 3) different questions;
  question types are kept balanced by always asking the least-asked type first (a scene
  whose layout cannot answer it, or cannot answer its full share of distinct types, is
  skipped *before* rendering, like ``make_samples``), so every batch has the same number
  of scenes.
* Images travel as uint8 HWC (4x less shared memory / H2D traffic than float32) and are
  normalised on the device with the processor's own mean/std: bit-identical to
  ``LlavaProcessor`` output (tested), and ~5-8 ms per image cheaper on the CPU.
* Text is tokenised with the processor's tokenizer; the single ``<image>`` is expanded to
  the processor's number of image tokens (576), exactly as ``LlavaProcessor`` does.
* The vision tower runs once per *scene*; its projected features are indexed out to the
  scene's questions and handed to the stock ``LlavaForConditionalGeneration.forward``
  through ``inputs_embeds`` (tested equal to feeding duplicated ``pixel_values``).
* Batches are right-padded and trained without an attention mask: under a causal mask
  real tokens never see the trailing pads, and pads carry label -100, so this is exact
  and lets SDPA use its fastest causal kernel.

Schedule (wall-clock driven, no step estimate needed): linear warmup over the first
``--warmup-steps`` steps (300; 100 with ``--init``), times a cosine from 1 to 0.1 over the
training-progress fraction ``f``:
``f = elapsed training time / time available for training`` (or ``step / --steps`` if
that is larger). The time available is ``--minutes`` from the start of :func:`train`
minus a reserve for the final evaluation and saving (2x the measured time of the
step-0 evaluation + 5 s). Training stops when ``f`` reaches 1, so the whole run,
workers' start-up and final evaluation included, takes about ``--minutes``.

Outputs in ``--out``: the model (``save_pretrained``; float32 if it is under 40 MB,
else bfloat16), processor and generation config (loadable offline with
:func:`slimvlm.testbed.build.load`), ``aux_heads.safetensors`` (training-only, for ``--init``),
``train_log.jsonl``, ``eval.json`` and a model card ``README.md``. The final accuracy is
measured on the model *reloaded from disk*.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import LlavaForConditionalGeneration

from ..attention import apply_rope, attention_rows
from ..errors import SlimVLMError, exit_code
from . import build, scenes
from .batches import Collator, PixelNormalizer, normalize_pixels

__all__ = [
    "TESTBED_VISION",
    "TESTBED_TEXT",
    "SIZES",
    "AUX_LABELS",
    "TrainConfig",
    "aux_target",
    "Collator",
    "SceneQADataset",
    "PixelNormalizer",
    "normalize_pixels",
    "forward_losses",
    "word_bag_matrix",
    "make_eval_batches",
    "evaluate",
    "lr_factor",
    "curriculum_cap",
    "scene_complexity",
    "max_text_tokens",
    "train",
    "main",
]

#: The shipped testbed model: CLIP-style tower (336 px, patch 14 -> 576 patches + CLS).
TESTBED_VISION: dict[str, int] = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768)
#: Llama decoder of the testbed model.
TESTBED_TEXT: dict[str, int] = dict(
    hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768
)
SIZES: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "testbed": (TESTBED_VISION, TESTBED_TEXT),
    "tiny": (build.TINY_VISION, build.TINY_TEXT),
}

AUX_WEIGHT = 0.5
DROPOUT_KEEPS = (64, 192)  # visual tokens a shortened training image span keeps (--token-dropout)
GUIDED_LAYER = 2  # decoder layer whose attention from the answer position is guided to the asked patches
GUIDED_GROUPS = 2  # its heads split into this many groups, one per object a question names
MIN_LR_RATIO = 0.1
MAX_FLOAT32_BYTES = 40 * 1024 * 1024  # save in float32 when the weights fit, else bfloat16
MAX_STREAMS = 4096  # worker streams per --seed (distinct scene seeds for any worker count below this)
DEFAULT_WARMUP_STEPS = 300
INIT_WARMUP_STEPS = 100  # --init: the weights are trained already, only the new optimizer's moments warm up
CURRICULUM_START = 0.15  # scene-complexity cap at global step 0 (1-3 objects, little clutter)
AUX_HEADS_FILE = "aux_heads.safetensors"  # training-only heads, saved beside the model so --init can resume them

#: The CLS head's targets: every (colour, shape) pair, then every word.
AUX_LABELS: tuple[str, ...] = tuple(f"{c} {s}" for c in scenes.COLORS for s in scenes.SHAPES) + tuple(
    f"word:{w}" for w in scenes.WORDS
)
_PAIR_INDEX = {(c, s): i for i, (c, s) in enumerate((c, s) for c in scenes.COLORS for s in scenes.SHAPES)}
_WORD_INDEX = {w: len(_PAIR_INDEX) + i for i, w in enumerate(scenes.WORDS)}


# ---------------------------------------------------------------------- configuration


def _default_workers() -> int:
    return max(0, min(14, (os.cpu_count() or 1) - 1))


@dataclass
class TrainConfig:
    """Every knob of :func:`train`; the CLI flags map one to one (``--batch-size`` -> batch_size)."""

    out: str | Path
    size: str = "testbed"
    minutes: float = 9.0
    device: str = "cuda"
    batch_size: int = 192
    lr: float = 1e-3
    weight_decay: float = 0.05
    eval_samples: int = 800
    eval_every: int = 1000
    eval_batch_size: int = 200
    workers: int | None = None  # None -> min(14, cpu_count - 1)
    seed: int = 0
    steps: int | None = None  # optional step cap; the time budget always applies too
    questions_per_scene: int = 3
    warmup_steps: int | None = None  # None -> 300, or 100 with --init
    log_every: int = 50
    curriculum_steps: int = 3000  # complexity cap ramps 0.15 -> 1 over these global steps; 0 = off
    init: str | Path | None = None  # a saved testbed folder to continue training from
    compile: bool = False  # torch.compile the training forward (never used by generate)
    token_dropout: float = 0.25  # fraction of batches whose image spans keep only 64 or 192 random patches
    progress: bool = True

    def resolved_warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return INIT_WARMUP_STEPS if self.init is not None else DEFAULT_WARMUP_STEPS

    def validate(self) -> None:
        if self.size not in SIZES:
            raise SlimVLMError(f"unknown --size {self.size!r}; expected one of {sorted(SIZES)}")
        if not (isinstance(self.minutes, (int, float)) and math.isfinite(self.minutes) and self.minutes > 0):
            raise SlimVLMError(f"--minutes must be a positive number, got {self.minutes!r}")
        for name in ("batch_size", "eval_samples", "eval_every", "eval_batch_size", "questions_per_scene", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SlimVLMError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        if self.warmup_steps is not None and not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise SlimVLMError(f"--warmup-steps must be an int >= 0, got {self.warmup_steps!r}")
        n = self.curriculum_steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise SlimVLMError(f"--curriculum-steps must be an int >= 0 (0 disables), got {self.curriculum_steps!r}")
        if self.init is not None:
            if not (Path(self.init) / "config.json").is_file():
                raise SlimVLMError(f"--init {self.init}: not a saved model folder (no config.json there)")
            if Path(self.init).resolve() == Path(self.out).resolve():
                raise SlimVLMError("--out must differ from --init (each run of a chain keeps its own folder and log)")
        if self.steps is not None and self.steps < 1:
            raise SlimVLMError(f"--steps must be >= 1 when given, got {self.steps!r}")
        if self.workers is not None and not (0 <= self.workers < MAX_STREAMS):
            raise SlimVLMError(f"--workers must be in [0, {MAX_STREAMS}), got {self.workers!r}")
        if not (0.0 <= self.token_dropout <= 1.0):
            raise SlimVLMError(f"--token-dropout must be in [0, 1], got {self.token_dropout!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SlimVLMError(f"--lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise SlimVLMError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SlimVLMError(f"--seed must be a non-negative int, got {self.seed!r}")
        _resolve_device(self.device)

    def command(self) -> str:
        """The exact CLI command that reproduces this configuration."""
        parts = ["python", "-m", "slimvlm.testbed.train", "--out", str(self.out)]
        defaults = TrainConfig(out="")
        for f in dataclasses.fields(self):
            if f.name in ("out", "progress"):
                continue
            value = getattr(self, f.name)
            if f.name == "workers" and value is None:
                value = _default_workers()
            if f.name not in _ALWAYS_IN_COMMAND and value == getattr(defaults, f.name):
                continue
            if value is None:
                continue
            if isinstance(value, bool):  # store_true flags
                if value:
                    parts.append(f"--{f.name.replace('_', '-')}")
                continue
            parts += [f"--{f.name.replace('_', '-')}", str(value)]
        return shlex.join(parts)


_ALWAYS_IN_COMMAND = ("size", "minutes", "device", "batch_size", "lr", "workers", "seed", "questions_per_scene")


def _resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise SlimVLMError(f"bad --device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlimVLMError(
            f"--device {name} was requested but CUDA is not available (torch {torch.__version__}); "
            "use --device cpu (with --size tiny) for a smoke test"
        )
    if device.type not in ("cuda", "cpu"):
        raise SlimVLMError(f"--device must be cuda or cpu, got {name!r}")
    return device


def _fit_loader_to_shm(workers: int, prefetch: int, batch_bytes: int) -> tuple[int, int]:
    """Shrink prefetch, then workers, so in-flight batches fit in /dev/shm (Docker's default is 64 MB).

    Workers hand batches over through shared memory; overflowing it kills them with a bus error.
    """
    if workers == 0:
        return 0, prefetch
    try:
        free = os.statvfs("/dev/shm")
        free_bytes = free.f_bavail * free.f_frsize
    except OSError:
        return workers, prefetch
    budget = free_bytes // 2  # headroom for other processes and the pinned-memory copies
    if workers * prefetch * batch_bytes <= budget:
        return workers, prefetch
    new_prefetch = 2
    new_workers = max(1, min(workers, budget // max(new_prefetch * batch_bytes, 1)))
    print(
        f"warning: /dev/shm has {free_bytes / 2**20:.0f} MB free; {workers} workers x {prefetch} batches x "
        f"{batch_bytes / 2**20:.1f} MB would not fit, using {new_workers} workers x {new_prefetch}",
        file=sys.stderr,
    )
    return int(new_workers), new_prefetch


# ------------------------------------------------------------------------------ data


def curriculum_cap(step: int, curriculum_steps: int) -> float:
    """Upper end of the scene-complexity range at global ``step``: :data:`CURRICULUM_START` at step 0,
    rising linearly to 1.0 at ``curriculum_steps`` and staying there; always 1.0 when ``curriculum_steps``
    is 0 (curriculum off)."""
    if curriculum_steps <= 0:
        return 1.0
    ramp = min(1.0, max(step, 0) / curriculum_steps)
    return CURRICULUM_START + (1.0 - CURRICULUM_START) * ramp


def scene_complexity(seed: int, cap: float) -> float | None:
    """The target complexity handed to ``scenes.layout`` for a scene seed under ``cap``: uniform on
    [0, cap], drawn from the seed (deterministic). ``None`` at cap 1, so that ``layout`` draws its own
    uniform target and the scene is exactly the standard (held-out-like) scene of that seed."""
    if cap >= 1.0:
        return None
    return float(np.random.default_rng([seed, 0xC0C]).uniform(0.0, cap))


def max_text_tokens(tokenizer) -> int:
    """Tokens of the longest training text (before ``<image>`` expansion) any question and answer can make.

    Found by asking every question type about a scene built from the longest-tokenised names, with the
    longest-tokenised answer; used to pad batches to one width under ``--compile`` (a wider batch would
    only cost a recompilation, never a wrong result)."""
    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    colour = max(scenes.COLORS, key=n_tokens)
    shape = max(scenes.SHAPES, key=n_tokens)
    word = max(scenes.WORDS, key=n_tokens)
    answers = [*scenes.COLORS, *scenes.SHAPES, *scenes.WORDS, *scenes.COUNT_WORDS, *scenes.QUADRANTS,
               "yes", "no", "left", "right", "above", "below", "bigger", "smaller"]  # fmt: skip
    answer = max(answers, key=n_tokens)
    other = scenes.SHAPES[0] if shape != scenes.SHAPES[0] else scenes.SHAPES[1]
    objects = [
        scenes.SceneObject(shape, colour, 60.0, 60.0, 70.0),
        scenes.SceneObject(other, colour, 280.0, 280.0, 20.0),
    ]
    stub = scenes.Scene(0, None, objects, [(word, (200.0, 60.0))], 0.0, 0.0, [20])  # type: ignore[arg-type]
    longest = 0
    for qt in scenes.QUESTION_TYPES:
        for k in range(8):
            qa = scenes.ask(stub, qt, random.Random(k))
            if qa is not None:
                longest = max(longest, len(tokenizer(build.format_training_text(qa[0], answer))["input_ids"]))
    return longest


#: Per-patch classes of the dense auxiliary loss: background, each (colour, shape) pair, each word.
PATCH_CLASSES = 1 + len(AUX_LABELS)
_PATCH = 14


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
    grid = np.asarray(canvas)[_PATCH // 2 :: _PATCH, _PATCH // 2 :: _PATCH].copy()
    side = grid.shape[0]
    for o in objects:
        row, col = min(int(o.y) // _PATCH, side - 1), min(int(o.x) // _PATCH, side - 1)
        grid[row, col] = 1 + _PAIR_INDEX[(o.color, o.shape)]
    return grid.reshape(-1).astype(np.int64)


class AuxHeads(torch.nn.Module):
    """Training-only heads on the vision tower's feature layer: CLS -> which pairs/words are in the
    scene (a global signal for CLS-attention methods), each patch -> what covers it and which grid
    row and column it sits in (keeps 2D position linearly readable for the position/quadrant
    questions: the LM itself only has 1D RoPE over the raster order)."""

    def __init__(self, width: int, word_bag: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cls = torch.nn.Linear(width, len(AUX_LABELS))
        self.patch = torch.nn.Linear(width, PATCH_CLASSES)
        self.grid = torch.nn.Linear(width, 2 * (scenes.IMAGE_SIZE // _PATCH))
        # (PATCH_CLASSES, vocab) multi-hot: the words that name what covers a patch (not saved)
        self.register_buffer("word_bag", word_bag, persistent=False)


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


_PAIR_COLOR = np.array([-1] + [scenes.COLORS.index(c) for c, _ in _PAIR_INDEX] + [-1] * len(scenes.WORDS))
_PAIR_SHAPE = np.array([-1] + [scenes.SHAPES.index(s) for _, s in _PAIR_INDEX] + [-1] * len(scenes.WORDS))
_REFERENT_STARTS = ("the", "a", "an", "many")


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


def aux_target(objects: Sequence[scenes.SceneObject], words: Sequence[tuple[str, Any]]) -> np.ndarray:
    """Multi-hot float32 vector over :data:`AUX_LABELS`: which (colour, shape) pairs and words are drawn."""
    target = np.zeros(len(AUX_LABELS), dtype=np.float32)
    for o in objects:
        target[_PAIR_INDEX[(o.color, o.shape)]] = 1.0
    for w, _ in words:
        target[_WORD_INDEX[w]] = 1.0
    return target


@dataclass
class _Record:
    """One rendered scene and the questions asked about it (used by tests and the dataset)."""

    scene_seed: int
    image: np.ndarray  # (H, W, 3) uint8
    aux: np.ndarray
    patches: np.ndarray  # (576,) int64 patch classes
    qas: list[tuple[str, str, str]]  # (question_type, question, answer)
    complexity: float = 0.0  # the scene's realised complexity (scenes.complexity_of)


def shorten_image_span(batch: dict[str, torch.Tensor], keep: int, image_token_id: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """The batch with every question's image span cut to a random ``keep`` of its patches, in raster
    order and renumbered, as stage 1-2 methods hand them to the LLM; ``visual_keep`` (B, keep) names
    the projected patches that fill the shortened span.

    Why: an LM trained from scratch on full 576-token spans only learns to depend on absolute
    positions, and then loses accuracy to any method that shortens the span for that reason alone; a
    pretrained LM (as in real LLaVA) does not. Training on some shortened spans removes the artefact."""
    ids = batch["input_ids"]
    span = ids == image_token_id
    n = int(span[0].sum())
    start = int(span[0].int().argmax())
    if not (bool(span[:, start : start + n].all()) and bool((span.sum(1) == n).all())):
        raise RuntimeError("every row must hold one image span at the same place to shorten it")
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}], got {keep}")
    chosen = np.sort(np.stack([rng.choice(n, keep, replace=False) for _ in range(len(ids))]), axis=1)
    index = torch.from_numpy(chosen).long()

    def cut(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, : start + keep], t[:, start + n :]], dim=1)

    out = dict(batch, input_ids=cut(ids), labels=cut(batch["labels"]), visual_keep=index)
    if "attention_target" in batch:
        target = batch["attention_target"]  # (B, G, n)
        out["attention_target"] = target.gather(2, index[:, None].expand(-1, target.shape[1], -1))
    return out


class SceneQADataset(IterableDataset):
    """Endless stream of collated training batches, generated on the fly (train split only).

    Each DataLoader worker ``w`` draws scene seeds ``scenes.scene_seed(seed * 4096 + w,
    "train", k)`` for k = 0, 1, ...: even numbers (the train parity of
    :func:`scenes.make_samples`), distinct across workers and ``--seed`` values, never a
    test-split scene.

    Curriculum: a worker's ``k``-th batch is taken to be trained at global step
    ``step_offset + k * num_workers`` (workers are consumed round-robin, so this is exact up
    to the prefetch depth); its scenes get a target complexity uniform on
    ``[0, curriculum_cap(step, curriculum_steps)]`` (see :func:`scene_complexity`).

    Every scene contributes its full share of questions (``questions_per_scene``, fewer only
    for the batch's last scene), so a batch always holds ``ceil(batch_size /
    questions_per_scene)`` scenes: one tensor shape, whatever the layouts.
    """

    def __init__(
        self,
        processor,
        batch_size: int,
        seed: int = 0,
        questions_per_scene: int = 3,
        curriculum_steps: int = 0,
        step_offset: int = 0,
        min_width: int | None = None,
        token_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.collate = Collator(processor, min_width)
        self.token_dropout = token_dropout
        self.batch_size = batch_size
        self.seed = seed
        self.questions_per_scene = questions_per_scene
        self.curriculum_steps = curriculum_steps
        self.step_offset = step_offset
        self.types = scenes.QUESTION_TYPES
        self.counts = [0] * len(self.types)

    def scene_seeds(self, worker_id: int) -> Iterator[int]:
        stream = self.seed * MAX_STREAMS + worker_id
        parity = scenes.SPLITS.index("train")
        for k in range(scenes.SCENE_BLOCK):
            s = scenes.scene_seed(stream, "train", k)
            assert s % 2 == parity
            yield s
        raise RuntimeError("scene stream exhausted")  # pragma: no cover - 16M scenes per worker

    def _questions(self, seed: int, limit: int, cap: float = 1.0):
        """Layout + questions for a scene seed (complexity uniform on [0, cap]), or None when the
        neediest type can't be asked or the scene can't answer ``limit`` distinct types."""
        objects, words, word_sizes, clutter = scenes.layout(seed, scene_complexity(seed, cap))
        stub = scenes.Scene(seed, None, objects, words, clutter, 0.0, word_sizes)  # type: ignore[arg-type]
        rng = random.Random(seed)
        order = sorted(range(len(self.types)), key=lambda t: (self.counts[t], rng.random()))
        qas: list[tuple[str, str, str]] = []
        for rank, t in enumerate(order):
            qa = scenes.ask(stub, self.types[t], rng)
            if qa is None:
                if rank == 0:
                    return None  # keep types balanced: the least-asked type must be asked
                continue
            qas.append((self.types[t], qa[0], qa[1]))
            if len(qas) == limit:
                break
        if len(qas) < limit:
            return None  # rare (< 1 scene in 100): keeps the number of scenes per batch fixed
        for qt, _, _ in qas:
            self.counts[self.types.index(qt)] += 1
        return objects, words, word_sizes, clutter, qas

    def records(self, seeds: Iterator[int], n_questions: int, cap: float = 1.0) -> list[_Record]:
        """Render scenes (complexity uniform on [0, cap]) until ``n_questions`` questions are collected."""
        out: list[_Record] = []
        have = 0
        while have < n_questions:
            s = next(seeds)
            got = self._questions(s, min(self.questions_per_scene, n_questions - have), cap)
            if got is None:
                continue
            objects, words, word_sizes, clutter, qas = got
            scene = scenes.render(objects, words, clutter, s, word_sizes)
            out.append(
                _Record(s, np.asarray(scene.image, dtype=np.uint8), aux_target(objects, words),
                        patch_target(objects, words, word_sizes), qas, scene.complexity)
            )
            have += len(qas)
        return out

    def batch(self, records: Sequence[_Record]) -> dict[str, torch.Tensor]:
        images, questions, answers, index, qtypes = [], [], [], [], []
        for i, r in enumerate(records):
            images.append(r.image)
            for qt, q, a in r.qas:
                questions.append(q)
                answers.append(a)
                index.append(i)
                qtypes.append(self.types.index(qt))
        out = self.collate(images, questions, answers, index)
        out["aux_target"] = torch.from_numpy(np.stack([r.aux for r in records]))
        out["patch_target"] = torch.from_numpy(np.stack([r.patches for r in records]))
        out["attention_target"] = torch.from_numpy(np.stack([question_patches(q, records[i].patches) for q, i in zip(questions, index)]))
        out["question_type"] = torch.tensor(qtypes, dtype=torch.long)
        out["complexity"] = torch.tensor([r.complexity for r in records], dtype=torch.float32)  # CPU-side stats
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        n_workers = info.num_workers if info is not None else 1
        seeds = self.scene_seeds(worker_id)
        rng = np.random.default_rng([self.seed, worker_id, 0xD20])
        produced = 0
        while True:
            cap = curriculum_cap(self.step_offset + produced * n_workers, self.curriculum_steps)
            out = self.batch(self.records(seeds, self.batch_size, cap))
            if self.token_dropout and rng.random() < self.token_dropout:
                out = shorten_image_span(out, int(rng.choice(DROPOUT_KEEPS)), self.collate.image_token_id, rng)
            out["complexity_cap"] = torch.tensor(cap, dtype=torch.float32)
            produced += 1
            yield out


# ----------------------------------------------------------------------- model steps


def forward_losses(model, head: AuxHeads, batch: dict[str, torch.Tensor], pixel_values: torch.Tensor):
    """(lm_loss, aux_loss, answer_correct) with the vision tower run once per scene, features shared by
    its questions; ``answer_correct`` (B,) says whether the first answer token is the argmax
    (teacher-forced training accuracy, logged per question type)."""
    inner = model.model
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise SlimVLMError("train.py supports a single int vision_feature_layer")
    # The vision tower's own forward and LLaVA's projector, placed into the embeddings by hand: the
    # same computation as LlavaForConditionalGeneration.forward on every transformers 5.x release.
    hidden = inner.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer]
    cls = hidden[:, 0]  # (S, vision_hidden): CLS at the feature layer
    patches = hidden[:, 1:]
    if model.config.vision_feature_select_strategy == "default":
        hidden = patches
    features = inner.multi_modal_projector(hidden)  # (S, 576, D)
    per_question = features.index_select(0, batch["image_index"])  # (B, 576, D)
    if "visual_keep" in batch:  # a shortened image span (token dropout)
        keep = batch["visual_keep"]
        per_question = per_question.gather(1, keep[..., None].expand(-1, -1, per_question.shape[-1]))
    embeds = model.get_input_embeddings()(batch["input_ids"])
    placeholders = (batch["input_ids"] == model.config.image_token_id)[..., None]
    embeds = embeds.masked_scatter(placeholders, per_question.to(embeds.dtype))
    # No attention_mask: batches are right-padded, so under the causal mask no real token sees a pad
    # (pads carry label -100); this keeps SDPA on its fastest causal kernel.
    labels = batch["labels"]
    guided = "attention_target" in batch
    out = model(inputs_embeds=embeds, labels=labels, output_hidden_states=guided)
    first = (labels != -100).int().argmax(1)  # each row's first answer token
    rows = torch.arange(labels.shape[0], device=labels.device)
    correct = (out.logits[rows, first - 1].argmax(-1) == labels[rows, first]).float()
    aux_loss = F.binary_cross_entropy_with_logits(head.cls(cls).float(), batch["aux_target"].float())
    aux_loss = aux_loss + F.cross_entropy(head.patch(patches).flatten(0, 1).float(), batch["patch_target"].flatten())
    side = scenes.IMAGE_SIZE // _PATCH
    grid_logits = head.grid(patches).float().unflatten(-1, (2, side))  # (S, 576, 2, side)
    index = torch.arange(side * side, device=patches.device)
    grid_target = torch.stack([index // side, index % side], -1).expand(patches.shape[0], -1, -1)  # (row, col)
    aux_loss = aux_loss + F.cross_entropy(grid_logits.flatten(0, 2), grid_target.flatten())
    if head.word_bag is not None:
        words = model.get_input_embeddings().weight[: head.word_bag.shape[1]]
        # on RMS-normalised features (what the LM's first norm sees), so the loss cannot be met by
        # inflating the features
        unit = features.float() * torch.rsqrt(features.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        bag_logits = unit @ words.float().T  # (S, 576, vocab)
        aux_loss = aux_loss + F.binary_cross_entropy_with_logits(bag_logits, head.word_bag[batch["patch_target"]])
    if guided:
        span = placeholders[..., 0, None].expand(-1, -1, GUIDED_GROUPS)  # (B, T, G)
        target = torch.zeros(span.shape, device=labels.device).masked_scatter(
            span, batch["attention_target"].float().transpose(1, 2).contiguous()
        ).transpose(1, 2)  # (B, G, T)
        aux_loss = aux_loss + guided_attention_loss(model, out.hidden_states[GUIDED_LAYER], first - 1, target)
    return out.loss, aux_loss, correct


def guided_attention_loss(model, hidden: torch.Tensor, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over head groups of -log of the attention mass (mean over the group's heads) that decoder
    layer ``GUIDED_LAYER`` puts, from each row's ``query`` position (the one that predicts the
    answer), on that group's ``target`` positions (B, GUIDED_GROUPS, T: the patches of the object
    the group reads, see :func:`question_patches`); rows with no target count 0.

    ``hidden`` is that layer's input (right-padded rows, positions 0..T-1, causal). The attention
    row is rebuilt from the layer's own q/k projections and rotary embedding, beside SDPA.
    Guiding one layer's attention to the named object teaches the binding that answer-only
    training did not find in 1.6M samples; one head group per object keeps two objects apart for
    the comparisons (position, size) that one pooled read cannot answer."""
    layer = model.model.language_model.layers[GUIDED_LAYER]
    attn = layer.self_attn
    b, t, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    rows = torch.arange(b, device=hidden.device)
    positions = torch.arange(t, device=hidden.device).expand(b, t)
    cos, sin = model.model.language_model.rotary_emb(normed, position_ids=positions)
    d = attn.head_dim
    q = attn.q_proj(normed[rows, query]).view(b, -1, 1, d)
    k = attn.k_proj(normed).view(b, t, -1, d).transpose(1, 2)
    q = apply_rope(q, cos[rows, query][:, None], sin[rows, query][:, None])
    k = apply_rope(k, cos, sin)
    allowed = (positions <= query[:, None])[:, None, None, :]
    weights = attention_rows(q, k, attn.scaling, allowed=allowed)[:, :, 0]  # (B, H, T)
    groups = weights.unflatten(1, (GUIDED_GROUPS, -1)).mean(2)  # (B, G, T): heads in order, one block per group
    mass = (groups * target).sum(-1)  # (B, G)
    has_target = (target.sum((1, 2)) > 0).float()
    per_row = -(mass + 1e-4).log().mean(1)
    return (per_row * has_target).sum() / has_target.sum().clamp_min(1.0)


def lr_factor(step: int, frac: float, warmup_steps: int) -> float:
    """Linear warmup over ``warmup_steps`` times a cosine from 1 to 0.1 over progress ``frac`` in [0, 1]."""
    warm = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    frac = min(max(frac, 0.0), 1.0)
    return warm * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_eval_batches(samples: Sequence[scenes.Sample], processor, batch_size: int, device: torch.device):
    """Processor outputs (left padding) for the held-out samples, cached on the device."""
    batches = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        enc = processor(
            text=[build.format_prompt(s.question) for s in chunk],
            images=[s.image for s in chunk],
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        batches.append(
            {
                "inputs": {k: v.to(device) for k, v in enc.items()},
                "answers": [s.answer.strip().lower() for s in chunk],
                "types": [s.question_type for s in chunk],
            }
        )
    return batches


@torch.no_grad()
def evaluate(model, tokenizer, eval_batches, autocast: bool = False) -> dict[str, Any]:
    """Greedy answers (max 3 new tokens, first word) vs. the truth: overall and per question type."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    use_amp = autocast and device.type == "cuda"
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    hits: dict[str, list[int]] = {t: [0, 0] for t in scenes.QUESTION_TYPES}
    with ctx:
        for b in eval_batches:
            inputs = b["inputs"]
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for text, answer, qt in zip(texts, b["answers"], b["types"]):
                words = text.strip().lower().split()
                hits[qt][0] += int(bool(words) and words[0] == answer)
                hits[qt][1] += 1
    if was_training:
        model.train()
    correct = sum(h[0] for h in hits.values())
    total = sum(h[1] for h in hits.values())
    return {
        "accuracy": correct / max(total, 1),
        "per_type": {t: h[0] / h[1] for t, h in hits.items() if h[1]},
        "n": total,
        "n_per_type": {t: h[1] for t, h in hits.items() if h[1]},
    }


# --------------------------------------------------------------------------- training


def _param_groups(modules: Sequence[torch.nn.Module], weight_decay: float):
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _results_table(
    result: dict[str, Any], baseline: dict[str, Any] | None = None, baseline_label: str = "before training (%)"
) -> str:
    head = "| question type | n | accuracy (%) |" + (f" {baseline_label} |" if baseline else "")
    sep = "|---|---:|---:|" + ("---:|" if baseline else "")
    rows = [head, sep]
    for t in scenes.QUESTION_TYPES:
        if t not in result["per_type"]:
            continue
        row = f"| {t} | {result['n_per_type'][t]} | {_fmt_pct(result['per_type'][t])} |"
        if baseline:
            row += f" {_fmt_pct(baseline['per_type'].get(t))} |"
        rows.append(row)
    row = f"| **overall** | {result['n']} | **{_fmt_pct(result['accuracy'])}** |"
    if baseline:
        row += f" {_fmt_pct(baseline['accuracy'])} |"
    rows.append(row)
    return "\n".join(rows)


def _curriculum_text(info: dict[str, Any]) -> str:
    n = info["curriculum_steps"]
    if n <= 0:
        return "No curriculum: every training scene's complexity is uniform in [0, 1]."
    return (
        f"Curriculum: a training scene's complexity is uniform in [0, cap], the cap rising linearly from "
        f"{CURRICULUM_START} (1-3 objects, little clutter) at global step 0 to 1 at global step {n:,} "
        f"(counted over the whole training chain) and staying at 1 after; this run ended at cap "
        f"{info['chain']['runs'][-1]['complexity_cap_end']:g}. The held-out set is never curriculum-shaped."
    )


def _chain_text(info: dict[str, Any]) -> str:
    chain = info["chain"]
    if info["init"] is None:
        return (
            f"- Training chain: this single run ({chain['steps']:,} steps). Continue it with "
            f"`--init <this folder>`."
        )
    rows = ["| run | continued from | steps | samples | batch | minutes | held-out accuracy (%) |",
            "|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for i, r in enumerate(chain["runs"], 1):
        acc = r.get("accuracy")
        rows.append(
            f"| {i} | {r.get('init') or '(from scratch)'} | {r['steps']:,} | {r['samples']:,} | "
            f"{r.get('batch_size', '-')} | {r['minutes']:.1f} | {_fmt_pct(acc)} |"
        )
    resumed = "with their saved aux heads" if info["aux_resumed"] else "with new aux heads"
    return (
        f"- Training chain: this run continued `{info['init']}` (weights loaded, new optimizer, {resumed}, "
        f"warmup {info['warmup_steps']} steps); in all {len(chain['runs'])} runs, **{chain['steps']:,} steps, "
        f"{chain['samples']:,} samples, {chain['minutes']:.1f} minutes**:\n\n" + "\n".join(rows) + "\n"
    )


def _model_card(info: dict[str, Any]) -> str:
    v, t = info["vision"], info["text"]
    shapes, colors = ", ".join(scenes.SHAPES), ", ".join(scenes.COLORS)
    compiled = ""
    if info["compile"]:
        compiled = (
            f", training forward compiled with torch.compile (first step {info['first_step_s']:.0f} s)"
            if info["compile_error"] is None
            else f", torch.compile requested but failed ({info['compile_error'][:120]}), trained eagerly"
        )
    return f"""# slimvlm testbed VLM ({info['size']})

A small LLaVA-1.5-architecture vision-language model trained **from scratch** by
`slimvlm.testbed.train` on procedurally drawn scenes, so that slimvlm can measure
visual-token reduction on a real trained model without downloading anything.
Load it offline with `slimvlm.testbed.build.load(folder)`.

## Architecture

| part | configuration | parameters |
|---|---|---:|
| vision tower (CLIP) | {scenes.IMAGE_SIZE} px, patch 14 -> {info['n_image_tokens']} patches + CLS; hidden {v['hidden_size']}, {v['num_hidden_layers']} layers, {v['num_attention_heads']} heads, MLP {v['intermediate_size']} | {info['params']['vision']:,} |
| projector | 2-layer MLP (GELU), {v['hidden_size']} -> {t['hidden_size']} | {info['params']['projector']:,} |
| language model (Llama) | hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, {t['num_attention_heads']} heads ({t['num_key_value_heads']} KV), MLP {t['intermediate_size']}, word-level vocab {info['vocab_size']} | {info['params']['language']:,} |
| **total** | feature layer -2, "default" selection (CLS dropped), SDPA attention | **{info['params']['total']:,}** |

Saved as {info['save_dtype']} safetensors: {info['file_mb']:.1f} MB.

## Data

Generated on the fly by `slimvlm.testbed.scenes` (train split: even scene seeds; the
held-out test split uses odd seeds, so no test scene is ever trained on). Each
{scenes.IMAGE_SIZE}x{scenes.IMAGE_SIZE} scene has 1-12 objects (shapes: {shapes};
colours: {colors}; small/medium/large), 0-2 written words (from {len(scenes.WORDS)}),
and background clutter (gradient, noise texture, distractor dots/lines).
Scene complexity (held-out set: uniform in [0, 1]):
`complexity = 0.5*(n_objects-1)/11 + 0.1*n_words/2 + 0.4*clutter`.
{_curriculum_text(info)}
Question types (one-word answers, balanced): {", ".join(scenes.QUESTION_TYPES)}.
Each rendered scene is used for {info['questions_per_scene']} different questions.

## Recipe

- Losses: next-token cross-entropy on the answer word + eos only (prompt masked),
  plus {AUX_WEIGHT} x the sum of: BCE of a training-only linear head on the vision CLS hidden
  state at the feature layer, predicting which (colour, shape) pairs and words are present
  ({len(AUX_LABELS)} labels); cross-entropy of per-patch heads predicting what covers each
  patch and the patch's grid row and column; the word bag (each projected patch, RMS-normalised,
  scored against the LM's input embeddings, BCE towards the words naming what covers it); and
  guided attention (-log of the attention mass that decoder layer {GUIDED_LAYER} puts, from the
  position predicting the answer, on the patches the question names, averaged over {GUIDED_GROUPS} head
  groups: with two named objects, each group reads one).
  The heads are not part of the model (`{AUX_HEADS_FILE}` keeps them for `--init` only).
- AdamW (betas 0.9/0.98, weight decay {info['weight_decay']} on matrices), peak lr {info['lr']:g},
  linear warmup {info['warmup_steps']} steps then cosine to 10% of peak over the wall-clock budget,
  grad clip 1.0, batch {info['batch_size']}, bf16 autocast on CUDA (TF32 matmuls){compiled}, all weights trained.
- Token dropout: a share {info.get('token_dropout', 0.0):g} of the batches had every image span cut to a random
  {' or '.join(map(str, DROPOUT_KEEPS))} of its patches, renumbered (0: none).
- This run: {info['steps']:,} steps, {info['samples']:,} samples ({info['scenes_est']:,} scenes approx.),
  {info['train_s']:.0f} s of training, {info['total_s']:.0f} s in all, on {info['device_name']}
  ({info['workers']} data workers).
{_chain_text(info)}

## Held-out accuracy

{info['eval_n']} test-split samples (`make_samples({info['eval_n']}, seed=0, split="test")`), greedy
decoding (3 new tokens, first word compared with the answer), measured on this folder
reloaded from disk ({info['save_dtype']}).

{info['table']}

## Command

```
{info['command']}
```
"""


@dataclass
class _Init:
    """What ``--init`` brings in: the folder's weights, its aux heads (if saved) and its training chain."""

    folder: Path
    state: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor] | None
    chain: dict[str, Any]


def _size_of(config) -> str | None:
    for name, (vision, text) in SIZES.items():
        if all(getattr(config.vision_config, k, None) == v for k, v in vision.items()) and all(
            getattr(config.text_config, k, None) == v for k, v in text.items()
        ):
            return name
    return None


def _load_init(folder: str | Path, tokenizer, size: str) -> _Init:
    """Load a saved testbed folder for ``--init``; SlimVLMError unless it has exactly ``size``'s shapes
    and the scene vocabulary."""
    folder = Path(folder)
    try:
        loaded, processor = build.load(folder, dtype=torch.float32, device="cpu")
    except Exception as error:  # noqa: BLE001 - any loading failure is a bad --init
        raise SlimVLMError(
            f"--init {folder}: cannot load a model and processor ({type(error).__name__}: {error})"
        ) from None
    vision, text = SIZES[size]
    parts = (("vision", vision, loaded.config.vision_config), ("text", text, loaded.config.text_config))
    problems = [
        f"{part} {key} is {getattr(cfg, key, None)}, --size {size} has {value}"
        for part, want, cfg in parts
        for key, value in want.items()
        if getattr(cfg, key, None) != value
    ]
    vocab = processor.tokenizer.get_vocab()
    if loaded.config.text_config.vocab_size != len(tokenizer) or vocab != tokenizer.get_vocab():
        problems.append("its tokenizer is not the testbed's scene vocabulary")
    if problems:
        other = _size_of(loaded.config)
        hint = f" (it is a --size {other} model)" if other and other != size else ""
        raise SlimVLMError(f"--init {folder} does not fit --size {size}{hint}: " + "; ".join(problems))
    aux = None
    aux_path = folder / AUX_HEADS_FILE
    if aux_path.is_file():
        aux = load_file(str(aux_path))
    chain: dict[str, Any] = {"steps": 0, "samples": 0, "minutes": 0.0, "curriculum_step": 0, "runs": []}
    record_path = folder / "eval.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if isinstance(record.get("chain"), dict):
            chain = record["chain"]
        else:  # a folder from before chains were recorded: one run
            run = {"out": str(folder), "init": None, "steps": int(record.get("steps", 0)),
                   "samples": int(record.get("samples", 0)),
                   "minutes": round(float(record.get("total_s", 0.0)) / 60, 2),
                   "accuracy": record.get("accuracy")}  # fmt: skip
            # trained without a curriculum: the curriculum starts from its beginning
            chain = {"steps": run["steps"], "samples": run["samples"], "minutes": run["minutes"], "curriculum_step": 0,
                     "runs": [run]}  # fmt: skip
    else:
        print(f"warning: --init {folder} has no eval.json; its earlier training is not counted in the chain",
              file=sys.stderr)  # fmt: skip
    return _Init(folder, loaded.state_dict(), aux, chain)


def train(config: TrainConfig | None = None, **kwargs: Any) -> Path:
    """Train and save the testbed model; returns the output folder. Accepts a TrainConfig or its fields."""
    if config is None:
        config = TrainConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    config.validate()
    t0 = time.perf_counter()
    budget_s = config.minutes * 60.0
    device = _resolve_device(config.device)
    cuda = device.type == "cuda"
    workers = _default_workers() if config.workers is None else config.workers
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork workers after tokenising
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    tokenizer = build.build_tokenizer(scenes.vocabulary())
    processor = build.build_processor(tokenizer)
    init = _load_init(config.init, tokenizer, config.size) if config.init is not None else None
    prior_steps = int(init.chain["steps"]) if init is not None else 0
    # Curriculum position: the steps earlier runs of the chain trained under a curriculum.
    curriculum_offset = int(init.chain.get("curriculum_step", 0)) if init is not None else 0
    warmup_steps = config.resolved_warmup()

    # Start the data workers first (before CUDA is initialised): they fill their queues
    # while the model and the held-out set are being built. The curriculum continues the
    # chain's global step count.
    dataset = SceneQADataset(
        processor, config.batch_size, config.seed, config.questions_per_scene,
        curriculum_steps=config.curriculum_steps, step_offset=curriculum_offset, token_dropout=config.token_dropout,
    )  # fmt: skip
    if config.compile:  # one sequence width -> one compiled graph (no dynamic-shape recompilation)
        dataset.collate.min_width = max_text_tokens(tokenizer) + dataset.collate.n_image_tokens - 1
    n_scenes = math.ceil(config.batch_size / config.questions_per_scene)
    scene_bytes = scenes.IMAGE_SIZE**2 * 3 + 4 * len(AUX_LABELS) + 8 * (scenes.IMAGE_SIZE // _PATCH) ** 2
    batch_bytes = n_scenes * scene_bytes + 2 * 8 * config.batch_size * (dataset.collate.n_image_tokens + 32)
    workers, prefetch = _fit_loader_to_shm(workers, 4, batch_bytes)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers > 0 else None,
    )
    batches = iter(loader)

    vision, text = SIZES[config.size]
    model_config = build.llava_config(tokenizer, vision, text)
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration._from_config(model_config, attn_implementation="sdpa")
    model.generation_config = build.generation_config(tokenizer)
    head = AuxHeads(model_config.vision_config.hidden_size, word_bag_matrix(tokenizer))
    aux_resumed = False
    if init is not None:
        try:
            model.load_state_dict(init.state, strict=True)
        except RuntimeError as error:
            raise SlimVLMError(
                f"--init {init.folder}: weights do not fit the --size {config.size} model: {error}"
            ) from None
        if init.aux is not None:
            try:
                head.load_state_dict(init.aux, strict=True)
                aux_resumed = True
            except RuntimeError:
                print(f"warning: --init {init.folder}: {AUX_HEADS_FILE} does not fit; new aux heads", file=sys.stderr)
        del init.state
    model.to(device).train()
    head.to(device).train()

    eval_samples = scenes.make_samples(config.eval_samples, seed=0, split="test")
    eval_batches = make_eval_batches(eval_samples, processor, config.eval_batch_size, device)
    del eval_samples

    optimizer = torch.optim.AdamW(
        _param_groups([model, head], config.weight_decay), lr=config.lr, betas=(0.9, 0.98), fused=cuda
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    normalizer = PixelNormalizer(processor, device)
    # --compile compiles this training-loss function only: `model` itself stays uncompiled, so
    # evaluate()'s model.generate never runs compiled code. Batches have one shape (fixed scene
    # count, padded width), hence dynamic=False: a single compilation.
    loss_fn = torch.compile(forward_losses, dynamic=False) if config.compile else forward_losses
    compile_error: str | None = None

    log_path = out / "train_log.jsonl"
    log_file = open(log_path, "w")

    def log(record: dict[str, Any]) -> None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    # Step-0 evaluation: a chance-level baseline, and a measure of what the final one will cost.
    t_eval = time.perf_counter()
    baseline = evaluate(model, tokenizer, eval_batches, autocast=True)
    eval_s = time.perf_counter() - t_eval
    reserve_s = 2.0 * eval_s + 5.0
    log({"step": 0, "chain_step": prior_steps, "elapsed_s": round(time.perf_counter() - t0, 2), "loss": None,
         "lm_loss": None, "aux_loss": None, "lr": 0.0, "eval_s": round(eval_s, 2), **baseline})  # fmt: skip

    t_train = time.perf_counter()
    deadline = t0 + budget_s - reserve_s
    span = max(deadline - t_train, 1e-6)
    sums = torch.zeros(3, device=device)  # running sums of loss, lm loss, aux loss since the last log
    type_hits = torch.zeros(len(scenes.QUESTION_TYPES), 2, device=device)  # (correct, asked) per type, same span
    n_in_sums = 0
    wait_s = 0.0
    complexity_sum, n_scenes_in_sum, cap = 0.0, 0, curriculum_cap(curriculum_offset, config.curriculum_steps)
    first_step_s: float | None = None
    step = 0
    last_log_t, last_log_step = t_train, 0
    last_eval: dict[str, Any] | None = None
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, unit="step", dynamic_ncols=True, desc=f"train {config.size}")

    def progress(now: float) -> float:
        frac = (now - t_train) / span
        if config.steps is not None:
            frac = max(frac, step / config.steps)
        return frac

    def forward_backward(fn, batch, pixel_values):
        with amp:
            lm_loss, aux_loss, correct = fn(model, head, batch, pixel_values)
            loss = lm_loss + AUX_WEIGHT * aux_loss
        loss.backward()
        type_hits.index_add_(0, batch["question_type"], torch.stack([correct, torch.ones_like(correct)], -1))
        return loss, lm_loss, aux_loss

    last = False
    while not last:  # at least one step; stop once the progress fraction reaches 1
        frac = progress(time.perf_counter())
        lr = config.lr * lr_factor(step, frac, warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr

        t_wait = time.perf_counter()
        batch = next(batches)
        wait_s += time.perf_counter() - t_wait
        complexity = batch.pop("complexity")  # CPU-side statistics, never sent to the device
        complexity_sum += float(complexity.sum())
        n_scenes_in_sum += complexity.numel()
        cap = float(batch.pop("complexity_cap"))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        pixel_values = normalizer(batch["pixels"])
        if step == 0 and loss_fn is not forward_losses:
            t_first = time.perf_counter()
            try:  # compilation happens here; should it fail, train eagerly instead of losing the run
                loss, lm_loss, aux_loss = forward_backward(loss_fn, batch, pixel_values)
            except Exception as error:  # noqa: BLE001
                compile_error = f"{type(error).__name__}: {str(error)[:500]}"
                print(f"warning: --compile failed, training without it: {compile_error}", file=sys.stderr)
                optimizer.zero_grad(set_to_none=True)
                loss_fn = forward_losses
                loss, lm_loss, aux_loss = forward_backward(loss_fn, batch, pixel_values)
            if cuda:
                torch.cuda.synchronize()
            first_step_s = time.perf_counter() - t_first
        else:
            loss, lm_loss, aux_loss = forward_backward(loss_fn, batch, pixel_values)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sums += torch.stack([loss.detach(), lm_loss.detach(), aux_loss.detach()]).float()
        n_in_sums += 1
        step += 1

        last = progress(time.perf_counter()) >= 1.0
        do_eval = step % config.eval_every == 0 and not last  # the final evaluation happens after saving
        if step % config.log_every == 0 or do_eval or last:
            mean = (sums / n_in_sums).tolist()  # one device sync per log interval
            hits = type_hits.tolist()
            now = time.perf_counter()
            record = {
                "step": step,
                "chain_step": prior_steps + step,
                "elapsed_s": round(now - t0, 2),
                "loss": mean[0],
                "lm_loss": mean[1],
                "aux_loss": mean[2],
                "lr": lr,
                "samples": step * config.batch_size,
                "samples_per_s": round((step - last_log_step) * config.batch_size / max(now - last_log_t, 1e-9), 1),
                "data_wait_frac": round(wait_s / max(now - last_log_t, 1e-9), 3),
                "complexity_cap": round(cap, 4),
                "scene_complexity": round(complexity_sum / max(n_scenes_in_sum, 1), 4),
                # teacher-forced first-answer-token accuracy on this span's training batches (curriculum scenes)
                "train_acc": round(sum(h[0] for h in hits) / max(sum(h[1] for h in hits), 1), 4),
                "train_acc_per_type": {t: round(h[0] / h[1], 3) for t, h in zip(scenes.QUESTION_TYPES, hits) if h[1]},
            }
            if first_step_s is not None and last_log_step == 0:
                record["first_step_s"] = round(first_step_s, 2)  # includes the compilation
            if not all(math.isfinite(x) for x in mean):
                log(record)
                raise RuntimeError(f"non-finite loss at step {step}: {mean}")
            if do_eval:
                t_eval = time.perf_counter()
                last_eval = evaluate(model, tokenizer, eval_batches, autocast=True)
                record.update(eval_s=round(time.perf_counter() - t_eval, 2), **last_eval)
            log(record)
            if bar is not None:
                postfix = {"loss": f"{mean[0]:.3f}", "lm": f"{mean[1]:.3f}", "lr": f"{lr:.2e}",
                           "smp/s": f"{record['samples_per_s']:.0f}"}  # fmt: skip
                if last_eval is not None:
                    postfix["acc"] = f"{last_eval['accuracy']:.3f}"
                bar.set_postfix(postfix, refresh=False)
            sums.zero_()
            type_hits.zero_()
            n_in_sums = 0
            wait_s = 0.0
            complexity_sum, n_scenes_in_sum = 0.0, 0
            last_log_t, last_log_step = time.perf_counter(), step
        if bar is not None:
            bar.update(1)

    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t_train
    if bar is not None:
        bar.close()
    del batches, loader  # stop the workers

    # ---- save (float32 if it fits in 40 MB, else bfloat16), reload, final evaluation
    n_params = _count(model)
    save_dtype = torch.float32 if n_params * 4 <= MAX_FLOAT32_BYTES else torch.bfloat16
    model.eval()
    model.to(dtype=save_dtype)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # Training-only state for a later --init (not part of the model; build.load ignores it).
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out / AUX_HEADS_FILE))
    file_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors") if p.name != AUX_HEADS_FILE)
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()

    loaded, loaded_processor = build.load(out, dtype=save_dtype, device=device)
    if _count(loaded) != n_params:
        raise RuntimeError("reloaded model has a different parameter count")
    t_eval = time.perf_counter()
    final = evaluate(loaded, loaded_processor.tokenizer, eval_batches, autocast=False)
    final_eval_s = time.perf_counter() - t_eval
    total_s = time.perf_counter() - t0
    log({"step": step, "chain_step": prior_steps + step, "elapsed_s": round(total_s, 2), "loss": None, "lm_loss": None,
         "aux_loss": None, "lr": None, "final": True, "eval_s": round(final_eval_s, 2), **final})  # fmt: skip
    log_file.close()

    prior = init.chain if init is not None else {"steps": 0, "samples": 0, "minutes": 0.0, "runs": []}
    run = {
        "out": str(out),
        "init": None if init is None else str(init.folder),
        "steps": step,
        "samples": step * config.batch_size,
        "minutes": round(total_s / 60, 2),
        "batch_size": config.batch_size,
        "lr": config.lr,
        "warmup_steps": warmup_steps,
        "curriculum_steps": config.curriculum_steps,
        "complexity_cap_end": round(cap, 4),
        "token_dropout": config.token_dropout,
        "compiled": config.compile and compile_error is None,
        "accuracy": final["accuracy"],
    }
    chain = {
        "steps": int(prior["steps"]) + step,
        "samples": int(prior["samples"]) + step * config.batch_size,
        "minutes": round(float(prior["minutes"]) + total_s / 60, 2),
        "curriculum_step": curriculum_offset + (step if config.curriculum_steps > 0 else 0),
        "runs": [*prior.get("runs", []), run],
    }

    inner = loaded.model
    info = {
        "size": config.size,
        "vision": vision,
        "text": text,
        "n_image_tokens": dataset.collate.n_image_tokens,
        "vocab_size": len(tokenizer),
        "params": {
            "vision": _count(inner.vision_tower),
            "projector": _count(inner.multi_modal_projector),
            "language": _count(inner.language_model) + _count(loaded.lm_head),
            "total": n_params,
        },
        "save_dtype": str(save_dtype).replace("torch.", ""),
        "file_mb": file_bytes / 2**20,
        "questions_per_scene": config.questions_per_scene,
        "weight_decay": config.weight_decay,
        "lr": config.lr,
        "warmup_steps": warmup_steps,
        "batch_size": config.batch_size,
        "curriculum_steps": config.curriculum_steps,
        "token_dropout": config.token_dropout,
        "init": None if init is None else str(init.folder),
        "aux_resumed": aux_resumed,
        "chain": chain,
        "compile": config.compile,
        "compile_error": compile_error,
        "first_step_s": first_step_s,
        "steps": step,
        "samples": step * config.batch_size,
        "scenes_est": math.ceil(step * config.batch_size / config.questions_per_scene),
        "train_s": train_s,
        "total_s": total_s,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "workers": workers,
        "eval_n": final["n"],
        "table": _results_table(final, baseline, "at start (init) (%)" if init is not None else "before training (%)"),
        "command": config.command(),
    }
    (out / "README.md").write_text(_model_card(info))
    eval_record = {
        **final,
        "baseline_accuracy": baseline["accuracy"],
        "steps": step,
        "samples": step * config.batch_size,
        "train_s": round(train_s, 1),
        "total_s": round(total_s, 1),
        "dtype": info["save_dtype"],
        "device": info["device_name"],
        "params": n_params,
        "file_bytes": file_bytes,
        "eval_set": f"make_samples({config.eval_samples}, seed=0, split='test')",
        "batch_size": config.batch_size,
        "curriculum_steps": config.curriculum_steps,
        "complexity_cap_end": round(cap, 4),
        "init": info["init"],
        "compile": config.compile,
        "compile_error": compile_error,
        "first_step_s": None if first_step_s is None else round(first_step_s, 2),
        "chain": chain,
    }
    (out / "eval.json").write_text(json.dumps(eval_record, indent=2) + "\n")

    print(f"\n{config.size} model: {n_params:,} params, {info['file_mb']:.1f} MB ({info['save_dtype']}) -> {out}")
    print(f"{step:,} steps, {step * config.batch_size:,} samples in {train_s:.0f} s of training "
          f"({step * config.batch_size / max(train_s, 1e-9):.0f} samples/s), {total_s:.0f} s in all")  # fmt: skip
    if init is not None:
        print(f"chain: {len(chain['runs'])} runs, {chain['steps']:,} steps, {chain['samples']:,} samples, "
              f"{chain['minutes']:.1f} min (continued from {init.folder})")
    print(info["table"])
    return out


# -------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    d = TrainConfig(out="")
    p = argparse.ArgumentParser(
        prog="python -m slimvlm.testbed.train", description="Train slimvlm's testbed VLM from scratch."
    )
    p.add_argument("--out", required=True, help="output folder (model, processor, log, eval.json, README.md)")
    p.add_argument("--size", default=d.size, help=f"one of {sorted(SIZES)} (default {d.size})")
    p.add_argument("--minutes", type=float, default=d.minutes, help="wall-clock budget, final eval included")
    p.add_argument("--device", default=d.device)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--workers", type=int, default=None, help="data workers (default min(14, cpu_count - 1))")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=None, help="optional step cap (the time budget still applies)")
    p.add_argument("--questions-per-scene", type=int, default=d.questions_per_scene)
    p.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps,
        help=f"linear lr warmup (default {DEFAULT_WARMUP_STEPS}, or {INIT_WARMUP_STEPS} with --init)",
    )  # fmt: skip
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument(
        "--curriculum-steps", type=int, default=d.curriculum_steps,
        help=f"training-scene complexity is uniform in [0, cap], cap rising linearly from {CURRICULUM_START} to 1 "
        f"over this many global steps (counted over an --init chain); 0 disables (default {d.curriculum_steps})",
    )  # fmt: skip
    p.add_argument(
        "--init", default=None, metavar="DIR",
        help="continue training a saved testbed folder (same --size; new optimizer, cosine over this run); "
        "the card and eval.json record the whole chain",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="torch.compile the training forward/backward (evaluation's generate stays eager)",
    )  # fmt: skip
    p.add_argument(
        "--token-dropout", type=float, default=d.token_dropout,
        help=f"fraction of batches whose image spans keep only {' or '.join(map(str, DROPOUT_KEEPS))} random patches, "
        f"renumbered, so the LM tolerates shortened spans (default {d.token_dropout}; 0 disables)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    args["progress"] = not args.pop("no_progress")
    return exit_code(lambda: train(TrainConfig(**args)), "slimvlm.testbed.train")


if __name__ == "__main__":
    raise SystemExit(main())
