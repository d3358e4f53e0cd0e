"""Keyword names that differ across the transformers 5.x releases slimvlm supports."""

from __future__ import annotations

import dataclasses
import inspect
from types import ModuleType
from typing import Callable

import torch


def cache_kwarg(forward: Callable) -> str:
    """The keyword under which ``forward`` takes the KV cache: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name stays a deprecated alias until 5.40), and code
    that reads or passes the cache must use the name the installed release binds."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def modality_outputs(items: dict[str, list], output_class: type) -> dict:
    """Per kind of item that came ('image', 'video': each item's tokens), the field of `output_class` carrying
    them, as the installed release names it: `{kind}_outputs` (5.2x: a vision output whose pooler_output lists
    them) or `{kind}_hidden_states` (earlier: one tensor, padded to the longest item); kinds that did not come
    stay out (None), as in the untouched model's output, and so do kinds the class has no field for (Qwen2-VL's
    own output class in 5.17 carries no visual tokens)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    fields = {field.name for field in dataclasses.fields(output_class)}
    out = {}
    for kind, tokens in items.items():
        if tokens and f"{kind}_outputs" in fields:
            out[f"{kind}_outputs"] = BaseModelOutputWithPooling(pooler_output=tokens)
        elif tokens and f"{kind}_hidden_states" in fields:
            out[f"{kind}_hidden_states"] = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True)
    return out


def multimodal_output_class(modeling: ModuleType, prefix: str) -> type:
    """The class a Qwen-VL forward returns: its modeling module's `{prefix}CausalLMOutputWithPast` in
    transformers 5.17 (with rope_deltas, no visual tokens), MultimodalCausalLMOutputWithPast (shared by the
    multimodal families, with image_outputs) in later releases such as 5.25."""
    own = getattr(modeling, f"{prefix}CausalLMOutputWithPast", None)
    if own is not None:
        return own
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast

    return MultimodalCausalLMOutputWithPast
