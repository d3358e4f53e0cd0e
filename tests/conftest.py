import numpy as np
import pytest
import torch
from PIL import Image

from slimvlm.testbed.build import format_prompt, load, make_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, processor): a tiny random LLaVA (CLIP 336/14 -> 576 patches, Llama LM), float32, SDPA."""
    return load(tiny_dir)


def images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(count)]


QUESTIONS = ["what colour is the circle ?", "is there a red square ? what is it", "what shape is it ?"]


def batch(processor, count: int = 2, seed: int = 0) -> dict:
    """A left-padded batch of `count` prompts of different lengths, one image each."""
    prompts = [format_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(count)]
    return processor(images=images(count, seed), text=prompts, return_tensors="pt", padding=True)


def select(inputs: dict, index: int) -> dict:
    """One sample of a batch, alone, with its padding removed."""
    keep = inputs["attention_mask"][index].bool()
    return {
        "input_ids": inputs["input_ids"][index : index + 1, keep],
        "attention_mask": inputs["attention_mask"][index : index + 1, keep],
        "pixel_values": inputs["pixel_values"][index : index + 1],
    }


@pytest.fixture
def fresh(tiny):
    """The tiny model, guaranteed untouched after the test."""
    model, processor = tiny
    yield model, processor
    handle = getattr(model, "_slimvlm_handle", None)
    if handle is not None:
        handle.remove()
    torch.manual_seed(0)


# ---- LLaVA-NeXT (AnyRes) -------------------------------------------------------------------------
NEXT_SIZES = [(100, 230), (200, 190)]  # (height, width): 1 x 2 tiles cut to 6 of 8 rows; 2 x 2 tiles, uncut


def next_model(folder):
    from transformers import LlavaNextForConditionalGeneration

    return load(folder, model_class=LlavaNextForConditionalGeneration)


@pytest.fixture(scope="session")
def tiny_next_dir(tmp_path_factory):
    from slimvlm.testbed.build import make_tiny_next

    return make_tiny_next(tmp_path_factory.mktemp("tiny_next"), seed=0, image_size=112)


@pytest.fixture(scope="session")
def tiny_next(tiny_next_dir):
    """(model, processor): a tiny random LLaVA-NeXT, crops of 112 px / patch 14 (8 x 8 patches), 2 or 4 tiles."""
    return next_model(tiny_next_dir)


def next_images(sizes=NEXT_SIZES, seed: int = 0, scale: int = 1) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h * scale, w * scale, 3), dtype=np.uint8)) for h, w in sizes]


def next_batch(processor, sizes=NEXT_SIZES, scale: int = 1) -> dict:
    """A left-padded batch of prompts of different lengths, one image each, of different sizes (tile counts)."""
    prompts = [format_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(len(sizes))]
    return processor(images=next_images(sizes, scale=scale), text=prompts, return_tensors="pt", padding=True)


def next_select(inputs: dict, index: int) -> dict:
    """One sample of a LLaVA-NeXT batch, alone, without padding."""
    return {**select(inputs, index), "image_sizes": inputs["image_sizes"][index : index + 1]}


@pytest.fixture
def fresh_next(tiny_next):
    model, processor = tiny_next
    yield model, processor
    handle = getattr(model, "_slimvlm_handle", None)
    if handle is not None:
        handle.remove()
