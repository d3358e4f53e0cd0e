"""Training batches from testbed scenes for `transformers.Trainer`: input_ids, attention_mask,
pixel_values and labels (loss on the answer and the final eos only), built exactly as the testbed
was trained."""

from __future__ import annotations

import numpy as np
import torch

from ..testbed import scenes
from ..testbed.clips import CLIP_QUESTION_TYPES, ClipSample, make_clip_samples
from ..testbed.batches import Collator, PixelNormalizer


class SceneCollator:
    """Samples -> a Trainer batch; right padding, attention mask from the padding. A sample's
    ``image`` is one image (a scene) or a list of frames (a clip: one placeholder per frame, in order).

    normalize_on_device: the batch carries the raw uint8 ``pixels`` (S, H, W, 3), a quarter of the
    float32 ``pixel_values`` through the DataLoader's shared memory and the host-to-device copy,
    and ``on_device`` (given to the trainer as ``prepare_batch``) normalises them where the batch
    is, exactly as the processor would. Otherwise the collator normalises on the CPU."""

    def __init__(self, processor, normalize_on_device: bool = False) -> None:
        self.collate = Collator(processor)
        self.processor = processor
        self.normalize_on_device = bool(normalize_on_device)
        self.normalizers: dict[torch.device, PixelNormalizer] = {}
        self.pad_id = processor.tokenizer.pad_token_id

    def normalizer(self, device: torch.device) -> PixelNormalizer:
        if device not in self.normalizers:
            self.normalizers[device] = PixelNormalizer(self.processor, device)
        return self.normalizers[device]

    def __call__(self, samples: list) -> dict[str, torch.Tensor]:
        per_sample = [s.image if isinstance(s.image, list) else [s.image] for s in samples]
        frames = [len(f) for f in per_sample]
        out = self.collate(
            [np.asarray(frame, dtype=np.uint8) for f in per_sample for frame in f],
            [s.question for s in samples],
            [s.answer for s in samples],
            [sum(frames[:i]) for i in range(len(samples))],
            frames,
        )
        if self.normalize_on_device:
            pixels = {"pixels": out["pixels"]}
        else:
            pixels = {"pixel_values": self.normalizer(torch.device("cpu"))(out["pixels"])}
        return {
            "input_ids": out["input_ids"],
            "attention_mask": (out["input_ids"] != self.pad_id).long(),
            **pixels,
            "labels": out["labels"],
            **image_span(out["input_ids"], self.collate.image_token_id),
        }

    def on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch of this collator, moved to its device, with its raw ``pixels`` normalised there."""
        if "pixels" not in batch:
            return batch
        batch = dict(batch)
        pixels = batch.pop("pixels")
        batch["pixel_values"] = self.normalizer(pixels.device)(pixels)
        return batch


def image_span(input_ids: torch.Tensor, image_token_id: int) -> dict[str, int]:
    """{image_start, image_tokens}: where every row holds its one image, when they all hold it at one place
    (slimvlm.train.spans takes the direct forward then); {} otherwise (clips, several images). Read on the
    CPU, where the collator builds the rows."""
    placeholders = input_ids == image_token_id
    counts = placeholders.sum(dim=1)
    first = placeholders.int().argmax(dim=1)
    if int(counts[0]) == 0 or not bool((counts == counts[0]).all() & (first == first[0]).all()):
        return {}
    start, length = int(first[0]), int(counts[0])
    if not bool(placeholders[:, start : start + length].all()):
        return {}
    return {"image_start": start, "image_tokens": length}


def training_scenes(count: int, seed: int = 0) -> list[scenes.Sample]:
    """`count` question-answer samples from the train split (never a held-out scene)."""
    return scenes.make_samples(count, seed=seed, split="train")


class SceneDataset(torch.utils.data.Dataset):
    """`length` train-split samples drawn on demand (so DataLoader workers render them in
    parallel): item i is the first askable scene of seed `seed + i` for question type i mod 8, so
    the types stay balanced, every item is deterministic and none is a held-out scene."""

    kinds: tuple[str, ...] = scenes.QUESTION_TYPES

    def __init__(self, length: int, seed: int = 0) -> None:
        if length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        self.length = int(length)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.sample(self.seed + index, self.kinds[index % len(self.kinds)])

    def sample(self, seed: int, kind: str) -> scenes.Sample:
        return scenes.make_samples(1, seed=seed, split="train", question_types=(kind,))[0]


class ClipDataset(SceneDataset):
    """The same for train-split clips of `frames` frames (clip question types, balanced). Mixed with
    scenes (torch.utils.data.ConcatDataset), it teaches LLaVA-Mini's pre-fusion to gather a
    question's answer across frames."""

    kinds = CLIP_QUESTION_TYPES

    def __init__(self, length: int, seed: int = 0, frames: int = 8) -> None:
        super().__init__(length, seed)
        self.frames = int(frames)

    def sample(self, seed: int, kind: str) -> ClipSample:
        return make_clip_samples(1, seed=seed, split="train", frames=self.frames, question_types=(kind,))[0]


class OneKindBatches(torch.utils.data.Sampler[int]):
    """Indices into a ConcatDataset of parts (scenes, then clips) in which every run of
    `batch_size` consecutive indices - one DataLoader batch - comes from one part: the samples of
    each part shuffled, cut into batches, and the batches of all parts shuffled together
    (deterministic from `seed`). A batch mixing scenes with clips pads every scene's LLaVA-Mini
    pre-fusion sequence to the clip's length (4 frames: 2,304 visual tokens against 576); batches
    of one kind do not. A part's last partial batch is left out."""

    def __init__(self, part_sizes: list[int], batch_size: int, seed: int = 0) -> None:
        if batch_size < 1 or any(size < 0 for size in part_sizes):
            raise ValueError(f"batch_size must be >= 1 and part sizes >= 0, got {batch_size} and {part_sizes}")
        self.part_sizes = [int(size) for size in part_sizes]
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def __len__(self) -> int:
        return sum(size // self.batch_size * self.batch_size for size in self.part_sizes)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        batches, offset = [], 0
        for size in self.part_sizes:
            order = (torch.randperm(size, generator=generator) + offset).tolist()
            whole = size // self.batch_size * self.batch_size
            batches += [order[i : i + self.batch_size] for i in range(0, whole, self.batch_size)]
            offset += size
        for position in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[position]
