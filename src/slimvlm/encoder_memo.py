"""One run of the vision tower's untouched layers per batch of pixels, shared by the methods of a sweep.

Methods that leave the encoder as it is (stage 2 and later, and stage-1 methods that act only at its last layer)
all start from the same untouched layers; on a CPU that is most of a small model's time (the testbed: 6.1 of the
6.7 s a `divprune:budget=64` run of 200 scenes takes). Within `reusing_vision_tower()`, those layers run once per
pixel tensor, encoder and layer count, and later runs over the same tensor reuse their output.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator

import torch

_MEMO: ContextVar[dict | None] = ContextVar("slimvlm_encoder_memo", default=None)


@contextlib.contextmanager
def reusing_vision_tower() -> Iterator[None]:
    """Within: the untouched layers of the vision tower run once per (pixel tensor, encoder, layers), for
    evaluating several methods over the same prepared batches (`slimvlm demo`). The memo holds every output (and
    its pixels) until the block ends; a pixel tensor changed in place is run again. Inference only: with autograd
    on, the layers always run."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def untouched_layers(encoder: object, pixel_values: torch.Tensor, layers: int, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """run(): the patch embedding and the first `layers` encoder layers over pixel_values, or, inside
    `reusing_vision_tower()`, the output an earlier call gave for the same tensor, encoder and layer count."""
    memo = _MEMO.get()
    if memo is None or torch.is_grad_enabled():
        return run()
    key = (id(encoder), pixel_values.data_ptr(), pixel_values.shape, pixel_values.stride(), pixel_values.dtype,
           pixel_values.device, pixel_values._version, layers)
    entry = memo.get(key)
    if entry is None:  # the encoder and pixels are held with the output: while they live, their ids and memory stay theirs
        entry = memo[key] = (encoder, pixel_values, run())
    return entry[2]
