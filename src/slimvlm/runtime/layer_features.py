"""Features visual tokens add to the outputs of the LLM's first layers (Qwen3-VL's DeepStack), during a prefill.

The model adds them at the visual positions of its whole prompt; here each visual token of a layer's view gets
its own (VisualTokens.layer_features, which follow every token stages 1-2 kept or merged), so after a stage-3
drop at layer k the layers from k on add them to the kept tokens alone, as they see only those.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

from ..hooks import HookSet
from .session import Session


@contextlib.contextmanager
def layer_features_added(layers: list, session: Session) -> Iterator[None]:
    """Within the block, each of the LLM layers the session's tokens carry features for adds them to its output."""
    features = session.tokens.layer_features
    if features is None:
        yield
        return
    hooks = HookSet()
    try:  # installing inside: a failure halfway leaves none of the hooks behind
        for layer in range(features.shape[2]):
            hooks.add(layers[layer].register_forward_hook(functools.partial(_add, session, features, layer)))
        yield
    finally:
        hooks.remove()


def _add(session: Session, features: torch.Tensor, layer: int, _module, _args, hidden: torch.Tensor) -> torch.Tensor:
    """The layer's output (B, L, D) with each visual token's features added, in the layer's view of the sequence."""
    sequence = session.view_of(layer).sequence
    added = features[sequence.image.clamp_min(0), sequence.token.clamp_min(0), layer].to(hidden.dtype)
    return hidden + torch.where(sequence.visual[..., None], added, 0)
