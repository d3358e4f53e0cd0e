"""The endless stream of training batches: scenes drawn on the fly (train split only), each asked
several questions, collated exactly like ``LlavaProcessor`` (:mod:`slimvlm.testbed.batches`) with
the auxiliary targets beside them.

Measured ~300 scenes / ~900 samples/s per worker on a CPU, so 14 workers out-supply one GPU:

* ``DataLoader`` workers each own a distinct stream of even (train-split) scene seeds and yield
  whole, already collated batches (``batch_size=None``), so the training loop does no per-sample
  Python work.
* One rendered scene answers ``--questions-per-scene`` (default 3) different questions; question
  types are kept balanced by always asking the least-asked type first (a scene whose layout cannot
  answer it, or cannot answer its full share of distinct types, is skipped *before* rendering,
  like ``make_samples``), so every batch has the same number of scenes.
* The vision tower runs once per *scene*; its projected features are indexed out to the scene's
  questions (:func:`~.losses.forward_losses`).
* Batches are right-padded and trained without an attention mask: under a causal mask real tokens
  never see the trailing pads, and pads carry label -100, so this is exact and lets SDPA use its
  fastest causal kernel.

Token dropout (``--token-dropout P``, default 0.25): a fraction P of batches have every image span
cut to a random 64 or 192 of its 576 patches, renumbered (:func:`shorten_image_span`), so the LM does
not come to depend on absolute positions (the interim model, trained without it, loses ~25 points to
any method that shortens the span, for that reason alone).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from slimvlm.testbed import scenes
from slimvlm.testbed.batches import Collator

from .curriculum import curriculum_cap, scene_complexity
from .targets import aux_target, patch_target, question_patches

DROPOUT_KEEPS = (64, 192)  # visual tokens a shortened training image span keeps (--token-dropout)
MAX_STREAMS = 4096  # worker streams per --seed (distinct scene seeds for any worker count below this)


@dataclass
class SceneRecord:
    """One rendered scene and the questions asked about it."""

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
    ``[0, curriculum_cap(step, curriculum_steps)]`` (see :func:`~.curriculum.scene_complexity`).

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

    def records(self, seeds: Iterator[int], n_questions: int, cap: float = 1.0) -> list[SceneRecord]:
        """Render scenes (complexity uniform on [0, cap]) until ``n_questions`` questions are collected."""
        out: list[SceneRecord] = []
        have = 0
        while have < n_questions:
            s = next(seeds)
            got = self._questions(s, min(self.questions_per_scene, n_questions - have), cap)
            if got is None:
                continue
            objects, words, word_sizes, clutter, qas = got
            scene = scenes.render(objects, words, clutter, s, word_sizes)
            out.append(
                SceneRecord(s, np.asarray(scene.image, dtype=np.uint8), aux_target(objects, words),
                            patch_target(objects, words, word_sizes), qas, scene.complexity)
            )
            have += len(qas)
        return out

    def batch(self, records: Sequence[SceneRecord]) -> dict[str, torch.Tensor]:
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
