"""How batches travel from the data workers to the training loop: a ``DataLoader`` over
:class:`~.dataset.SceneQADataset` sized to fit shared memory, and under ``--compile`` padded to one
width (one shape, one compilation)."""

from __future__ import annotations

import math
import os
import random
import sys

from torch.utils.data import DataLoader

from slimvlm.testbed import build, scenes

from .config import TrainConfig
from .dataset import SceneQADataset
from .targets import AUX_LABELS, PATCH


def training_loader(config: TrainConfig, processor, step_offset: int, workers: int, pin_memory: bool) -> tuple[SceneQADataset, DataLoader, int]:
    """(dataset, loader, workers): the loader's workers may be fewer than asked, to fit /dev/shm.
    ``step_offset`` is the chain's curriculum position, where this run's ramp continues."""
    dataset = SceneQADataset(
        processor, config.batch_size, config.seed, config.questions_per_scene,
        curriculum_steps=config.curriculum_steps, step_offset=step_offset, token_dropout=config.token_dropout,
    )  # fmt: skip
    if config.compile:  # one sequence width -> one compiled graph (no dynamic-shape recompilation)
        dataset.collate.min_width = max_text_tokens(processor.tokenizer) + dataset.collate.n_image_tokens - 1
    n_scenes = math.ceil(config.batch_size / config.questions_per_scene)
    scene_bytes = scenes.IMAGE_SIZE**2 * 3 + 4 * len(AUX_LABELS) + 8 * (scenes.IMAGE_SIZE // PATCH) ** 2
    batch_bytes = n_scenes * scene_bytes + 2 * 8 * config.batch_size * (dataset.collate.n_image_tokens + 32)
    workers, prefetch = fit_loader_to_shm(workers, 4, batch_bytes)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers > 0 else None,
    )
    return dataset, loader, workers


def fit_loader_to_shm(workers: int, prefetch: int, batch_bytes: int) -> tuple[int, int]:
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
