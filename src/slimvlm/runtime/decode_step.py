"""One decode step of the LM as a function of modules and tensors: what torch.compile sees.

The step is embed, the LM's layers each with its group's (B, 1, Q, C) mask and its rotary embedding, lm_head
(groups: LLM layers that hold the same cache entries and attend with one mask, static_cache.py). Compiled with
transformers' own CompileConfig (inductor, CUDA graphs) on slimvlm's static cache; run eagerly, layer by layer, on
the dynamic cache after stages 3-4 (decode.py).
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.output_capturing import capture_outputs

from ..models.adapter import DecodeParts


def decode_step(parts: DecodeParts, cache_kwarg: str, input_ids, masks, group_of_layer, position_ids, cache,
                layer_kwargs: dict | None = None) -> torch.Tensor:
    """One decode step of the LM, layer by layer so that each layer gets its group's mask, as a function of
    modules and tensors alone: what torch.compile sees. Module-level (not a method of a per-apply object)
    so that compiled code is found again when slimvlm is applied anew to the same model. layer_kwargs: handed
    to every layer, for an attention slimvlm installed (VTU's copies on the static cache)."""
    hidden = parts.embed(input_ids)
    position_embeddings = layer_position_embeddings(parts, hidden, position_ids)
    hidden = decoder_layers(parts.body, parts, hidden, masks, group_of_layer, position_ids, position_embeddings,
                            cache_kwarg, cache, **(layer_kwargs or {})).last_hidden_state
    return parts.head(hidden)


def layer_position_embeddings(parts: DecodeParts, like: torch.Tensor, position_ids: torch.Tensor) -> list:
    """Per LM layer, its rotary (cos, sin) at position_ids: one for every layer, or each layer its kind's where the
    kinds have their own (parts.rotary_kinds)."""
    if parts.rotary_kinds is None:
        return [parts.rotary(like, position_ids=position_ids)] * len(parts.layers)
    by_kind = {kind: parts.rotary(like, position_ids, kind) for kind in dict.fromkeys(parts.rotary_kinds)}
    return [by_kind[kind] for kind in parts.rotary_kinds]


@capture_outputs  # as transformers runs an LM body: its output-capture hooks (installed on the layers once
# output_hidden_states was asked for) read a collector this sets, in a way torch.compile can trace
def decoder_layers(body, parts: DecodeParts, hidden, masks, group_of_layer, position_ids, position_embeddings: list,
                   cache_kwarg: str, cache, **layer_kwargs) -> BaseModelOutputWithPast:
    """The LM's layers in turn, each with its group's mask and its own rotary embeddings (position_embeddings: per
    layer)."""
    for layer, group, embeddings in zip(parts.layers, group_of_layer, position_embeddings, strict=True):
        hidden = layer(hidden, attention_mask=masks[group], position_ids=position_ids,
                       position_embeddings=embeddings, use_cache=True, **{cache_kwarg: cache}, **layer_kwargs)
    return BaseModelOutputWithPast(last_hidden_state=parts.norm(hidden))


_COMPILED: dict[str, object] = {}


def compiled_decode_step(model):
    """decode_step compiled with the model's generation_config.compile_config (transformers' default:
    inductor with CUDA graphs), one compiled function per distinct config."""
    from transformers import CompileConfig

    config = getattr(model.generation_config, "compile_config", None) or CompileConfig()
    options = config.to_dict()
    key = repr(sorted(options.items(), key=lambda item: item[0]))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(decode_step, **options)
    return _COMPILED[key]
