"""Training batches from testbed scenes for `transformers.Trainer`: input_ids, attention_mask,
pixel_values and labels (loss on the answer and the final eos only), built exactly as the testbed
was trained."""

from __future__ import annotations

import numpy as np
import torch

from ..testbed import scenes
from ..testbed.train import Collator, PixelNormalizer


class SceneCollator:
    """Samples (scenes.Sample) -> a Trainer batch; right padding, attention mask from the padding."""

    def __init__(self, processor) -> None:
        self.collate = Collator(processor)
        self.normalize = PixelNormalizer(processor)
        self.pad_id = processor.tokenizer.pad_token_id

    def __call__(self, samples: list[scenes.Sample]) -> dict[str, torch.Tensor]:
        out = self.collate(
            [np.asarray(s.image, dtype=np.uint8) for s in samples],
            [s.question for s in samples],
            [s.answer for s in samples],
            list(range(len(samples))),
        )
        return {
            "input_ids": out["input_ids"],
            "attention_mask": (out["input_ids"] != self.pad_id).long(),
            "pixel_values": self.normalize(out["pixels"]),
            "labels": out["labels"],
        }


def training_scenes(count: int, seed: int = 0) -> list[scenes.Sample]:
    """`count` question-answer samples from the train split (never a held-out scene)."""
    return scenes.make_samples(count, seed=seed, split="train")


class SceneDataset(torch.utils.data.Dataset):
    """`length` train-split samples drawn on demand (so DataLoader workers render them in
    parallel): item i is the first askable scene of seed `seed + i` for question type i mod 8, so
    the types stay balanced, every item is deterministic and none is a held-out scene."""

    def __init__(self, length: int, seed: int = 0) -> None:
        if length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        self.length = int(length)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> scenes.Sample:
        if not 0 <= index < self.length:
            raise IndexError(index)
        kind = scenes.QUESTION_TYPES[index % len(scenes.QUESTION_TYPES)]
        return scenes.make_samples(1, seed=self.seed + index, split="train", question_types=(kind,))[0]
