"""Keyword names that differ across the transformers 5.x releases slimvlm supports."""

from __future__ import annotations

import dataclasses
import inspect
from types import ModuleType
from typing import Callable


def cache_kwarg(forward: Callable) -> str:
    """The keyword under which ``forward`` takes the KV cache: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name stays a deprecated alias until 5.40), and code
    that reads or passes the cache must use the name the installed release binds."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def image_output(tokens, output_class: type) -> dict:
    """The field of `output_class` (the model's output) carrying the visual tokens the LLM got, as the
    installed release names it: `image_outputs` (5.2x: a vision output whose pooler_output lists each
    image's tokens) or `image_hidden_states` (earlier: one tensor, here padded to the longest image);
    none where the class has neither."""
    fields = {field.name for field in dataclasses.fields(output_class)}
    if "image_outputs" in fields:
        return modality_outputs({"image": tokens.split()}, output_class)
    if "image_hidden_states" in fields:
        return {"image_hidden_states": tokens.x}
    return {}  # Qwen2-VL's own output class (transformers 5.17) carries no visual tokens


def modality_outputs(items: dict[str, list], output_class: type) -> dict:
    """Per kind of item that came ('image', 'video': each item's tokens), the `{kind}_outputs` field of
    `output_class` where it has one (5.2x: a vision output whose pooler_output lists them); kinds that did
    not come stay out (None), as in the untouched model's output."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    fields = {field.name for field in dataclasses.fields(output_class)}
    return {f"{kind}_outputs": BaseModelOutputWithPooling(pooler_output=tokens)
            for kind, tokens in items.items() if tokens and f"{kind}_outputs" in fields}


def multimodal_output_class(modeling: ModuleType, prefix: str) -> type:
    """The class a Qwen-VL forward returns: its modeling module's `{prefix}CausalLMOutputWithPast` in
    transformers 5.17 (with rope_deltas, no visual tokens), MultimodalCausalLMOutputWithPast (shared by the
    multimodal families, with image_outputs) in later releases such as 5.25."""
    own = getattr(modeling, f"{prefix}CausalLMOutputWithPast", None)
    if own is not None:
        return own
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast

    return MultimodalCausalLMOutputWithPast
