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


def modality_output(items: list, output_class: type, modality: str) -> dict:
    """The field of `output_class` carrying the LLM's tokens of each item of a modality ('image', 'video'), as
    the installed release names it: `{modality}_outputs` (5.2x: a vision output whose pooler_output lists each
    item's tokens) or `{modality}_hidden_states` (earlier: one tensor, here padded to the longest item); none
    where the class has neither, or there are no items (the untouched model leaves the field None)."""
    if not items:
        return {}
    fields = {field.name for field in dataclasses.fields(output_class)}
    if f"{modality}_outputs" in fields:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {f"{modality}_outputs": BaseModelOutputWithPooling(pooler_output=items)}
    if f"{modality}_hidden_states" in fields:
        return {f"{modality}_hidden_states": torch.nn.utils.rnn.pad_sequence(items, batch_first=True)}
    return {}  # Qwen2-VL's own output class (transformers 5.17) carries no visual tokens


def multimodal_output_class(modeling: ModuleType, prefix: str) -> type:
    """The class a Qwen-VL forward returns: its modeling module's `{prefix}CausalLMOutputWithPast` in
    transformers 5.17 (with rope_deltas, no visual tokens), MultimodalCausalLMOutputWithPast (shared by the
    multimodal families, with image_outputs) in later releases such as 5.25."""
    own = getattr(modeling, f"{prefix}CausalLMOutputWithPast", None)
    if own is not None:
        return own
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast

    return MultimodalCausalLMOutputWithPast
