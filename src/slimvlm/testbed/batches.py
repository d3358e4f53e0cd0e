"""Training tensors from testbed question-answer batches, exactly as ``LlavaProcessor`` builds them.

Why here: the testbed trainer (experiments/testbed) and the library's own fine-tuning batches
(:mod:`slimvlm.train.data`) must feed the model what the processor would, so both build their
batches with these two classes. Images travel as uint8 HWC (4x less shared memory and
host-to-device traffic than float32) and are normalised where the batch is, with the processor's
own mean and std: bit-identical to its output (tested), and ~5-8 ms per image cheaper on the CPU.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import SlimVLMError
from . import build, scenes

__all__ = ["Collator", "PixelNormalizer", "normalize_pixels"]


class Collator:
    """Turns (images, questions, answers) into training tensors exactly like ``LlavaProcessor``.

    ``input_ids`` equal the processor's (right padding), ``labels`` are -100 except on
    the answer tokens and the final eos, and images stay uint8 HWC for
    :func:`normalize_pixels` on the device. With ``min_width`` set, every batch is right-padded
    to at least that many tokens (one shape for ``torch.compile``); the extra pads are exact
    (causal mask, label -100).
    """

    def __init__(self, processor, min_width: int | None = None) -> None:
        self.min_width = min_width
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(build.SPECIAL_TOKENS["image"])
        self.pad_id = self.tokenizer.pad_token_id
        ip = processor.image_processor
        crop = ip.crop_size
        if (crop["height"], crop["width"]) != (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE) or ip.size.get(
            "shortest_edge"
        ) != scenes.IMAGE_SIZE:
            raise SlimVLMError(
                f"processor expects {crop} images but scenes are {scenes.IMAGE_SIZE}px; "
                "the device-side normalisation would not match the processor"
            )
        # How many placeholders one <image> becomes, asked from the processor itself.
        probe = processor(
            text=[build.format_prompt("x")],
            images=[Image.new("RGB", (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE))],
            return_tensors="np",
        )
        self.n_image_tokens = int((probe["input_ids"][0] == self.image_token_id).sum())

    def __call__(
        self,
        images: Sequence[np.ndarray],
        questions: Sequence[str],
        answers: Sequence[str],
        image_index: Sequence[int],
        frames: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """frames: image placeholders per question (a clip's frames; default one each), each expanded
        to the processor's number of image tokens, in order; ``image_index`` names each question's first
        image."""
        tok = self.tokenizer
        frames = [1] * len(questions) if frames is None else list(frames)
        full = tok([build.format_training_text(q, a, k) for q, a, k in zip(questions, answers, frames)])["input_ids"]
        prompt = tok([build.format_prompt(q, k) for q, k in zip(questions, frames)])["input_ids"]
        n_img = self.n_image_tokens
        rows = []
        for i, (ids, p_ids, k) in enumerate(zip(full, prompt, frames)):
            if ids[: len(p_ids)] != p_ids or ids.count(self.image_token_id) != k:
                raise RuntimeError(f"prompt is not a prefix of the training text: {questions[i]!r}")
            rows.append([t for token in ids for t in ([token] * n_img if token == self.image_token_id else [token])])
        width = max(max(len(r) for r in rows), self.min_width or 0)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), -100, dtype=np.int64)
        for i, (row, p_ids, k) in enumerate(zip(rows, prompt, frames)):
            input_ids[i, : len(row)] = row
            start = len(p_ids) + k * (n_img - 1)  # first answer token
            labels[i, start : len(row)] = row[start:]
        return {
            "pixels": torch.from_numpy(np.stack(images)),  # (S, H, W, 3) uint8
            "image_index": torch.tensor(image_index, dtype=torch.long),
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
        }


class PixelNormalizer:
    """uint8 (S, H, W, 3) -> float32 (S, 3, H, W) with the processor's rescale + mean/std.

    Mean and std live on the device once (building them per step would be a blocking
    host-to-device copy every step).
    """

    def __init__(self, processor, device: torch.device | str = "cpu") -> None:
        ip = processor.image_processor
        if not math.isclose(ip.rescale_factor, 1 / 255):
            raise SlimVLMError(f"unexpected rescale_factor {ip.rescale_factor}")
        self.device = torch.device(device)
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return (x / 255.0 - self.mean) / self.std  # same op order as the processor: bit-identical


def normalize_pixels(pixels: torch.Tensor, processor, device: torch.device | str | None = None) -> torch.Tensor:
    """One-off form of :class:`PixelNormalizer`."""
    return PixelNormalizer(processor, pixels.device if device is None else device)(pixels)
