"""A pool of rendered training scenes held on the device, so that every run of an experiment reads the same
batches at the speed of device memory.

Why: at the testbed's size a training step on an H100 takes tens of milliseconds, and the CPU workers that draw
scenes (about 900 samples/s each) bound the runs whose tokens are cut: a pruned run cannot be faster than its
data. Drawn once, before any run, the scenes cost every run the same (nothing), and a run's wall-clock is its
steps. Rendering reuses the testbed trainer's dataset (train split only, balanced question types, three
questions per scene), so the pool holds exactly the stream the testbed model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from experiments.testbed.dataset import SceneQADataset
from experiments.testbed.loader import max_text_tokens
from slimvlm.train.spans import ImageSpan


@dataclass
class ScenePool:
    """`scenes` rendered scenes (uint8 pixels on the device) and their questions' training rows."""

    pixels: torch.Tensor  # (S, H, W, 3) uint8
    input_ids: torch.Tensor  # (S * Q, W), right-padded, one image span at one place
    labels: torch.Tensor  # (S * Q, W)
    question_type: torch.Tensor  # (S * Q,)
    questions_per_scene: int
    span: ImageSpan

    @property
    def scenes(self) -> int:
        return self.pixels.shape[0]

    def batches(self, scenes_per_batch: int, seed: int):
        """Endless batches of `scenes_per_batch` scenes with all their questions, the scenes in a fresh random
        order each pass (a generator of `seed`: every run that asks gets the same batches)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        questions = torch.arange(self.questions_per_scene, device=self.pixels.device)
        while True:
            order = torch.randperm(self.scenes, generator=generator).to(self.pixels.device)
            for first in range(0, self.scenes - scenes_per_batch + 1, scenes_per_batch):
                scenes = order[first : first + scenes_per_batch]
                rows = (scenes[:, None] * self.questions_per_scene + questions).flatten()
                yield {
                    "pixels": self.pixels[scenes],
                    "image_index": torch.arange(scenes_per_batch, device=scenes.device).repeat_interleave(
                        self.questions_per_scene),
                    "input_ids": self.input_ids[rows],
                    "labels": self.labels[rows],
                    "image_start": self.span.start,
                    "image_tokens": self.span.length,
                }


def render_pool(processor, scenes: int, device: torch.device, seed: int = 0, workers: int = 14,
                questions_per_scene: int = 3) -> ScenePool:
    """Render `scenes` train-split scenes in `workers` processes and move them to `device`."""
    chunk = 64  # scenes per worker batch
    width = max_text_tokens(processor.tokenizer) + 576  # one width for every row
    dataset = SceneQADataset(processor, chunk * questions_per_scene, seed=seed,
                             questions_per_scene=questions_per_scene, min_width=width)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    parts = {"pixels": [], "input_ids": [], "labels": [], "question_type": []}
    have = 0
    for batch in loader:
        for name in parts:
            parts[name].append(batch[name])
        have += batch["pixels"].shape[0]
        if have >= scenes:
            break
    pool = {name: torch.cat(values)[: scenes if name == "pixels" else scenes * questions_per_scene].to(device)
            for name, values in parts.items()}
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    return ScenePool(**pool, questions_per_scene=questions_per_scene,
                     span=ImageSpan.of(pool["input_ids"][:256], image_token))
