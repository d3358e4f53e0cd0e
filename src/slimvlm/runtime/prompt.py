"""The caller's prompt with images as the runtime reads it: what it refuses, and its shape (images per sample,
the padding side)."""

from __future__ import annotations

import torch

from ..errors import SlimVLMError
from ..sequence import is_placeholder


def refuse_unsupported(adapter, arguments: dict, cache_name: str) -> None:
    """Refuse, before any work, the arguments a prompt with images cannot be run with."""
    if arguments.get("inputs_embeds") is not None:
        raise SlimVLMError("pass input_ids (with the image placeholders), not inputs_embeds, when slimvlm is applied")
    if arguments.get("input_ids") is None:
        raise SlimVLMError("input_ids are required with pixel_values")
    for name, configured in (  # the LLaVA families' (Qwen's configs have none)
        ("vision_feature_layer", getattr(adapter.config, "vision_feature_layer", None)),
        ("vision_feature_select_strategy", getattr(adapter.config, "vision_feature_select_strategy", None)),
    ):
        given = arguments.get(name)
        if given is not None and given != configured:
            raise SlimVLMError(f"{name}={given!r} differs from the model's config ({configured!r}); set it in the config")
    cache = arguments.get(cache_name)
    if cache is not None and cache.get_seq_length() > 0:
        raise SlimVLMError("images after a non-empty KV cache are not supported; start a new cache for each prompt")


def prompt_shape(adapter, input_ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[list[int], bool, int]:
    """Per sample, its images; whether the caller pads on the right (the rebuilt rows keep that side, so
    that `none` returns logits where the untouched model does); the placeholders in all. One read from
    the device."""
    columns = [is_placeholder(input_ids, adapter.placeholder_ids).sum(dim=1)]
    if mask is not None:
        columns += [mask[:, 0].long(), mask[:, -1].long()]
    read = torch.stack(columns).tolist()
    images = adapter.images_per_sample(read[0])
    right_padded = mask is not None and all(read[1]) and not all(read[2])
    return images, right_padded, sum(read[0])
