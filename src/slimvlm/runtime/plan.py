"""Which path one forward takes, decided once at its start: the rest of the runtime follows the plan.

A prompt with images is a prefill: how the LLM runs over the rebuilt prompt (Prefill), where its cache entries
go (Cache) and how its decode steps will run (Decode). A decode step continues its prompt's plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum



class Prefill(Enum):
    LM = "the LM's own forward, stage-3 drops in layer hooks (prefill_layers.py)"
    SEGMENTS = "the LM's layers in segments between drops, replayed from CUDA graphs (segments.py)"
    STATIC = "slimvlm's static cache, its own prefill (static_cache.py)"


class Cache(Enum):
    NONE = "no cache (use_cache off): no decode step follows"
    DYNAMIC = "the caller's cache, or a new dynamic one"
    STATIC = "slimvlm's static cache from the start (stages 1-2 on a static cache)"
    HAND_OFF = "a dynamic cache in prefill, handed to slimvlm's static cache after (stages 3-4 on a static cache)"


class Decode(Enum):
    LM = "the LM's own forward (where stages 3-4 left views, their masks in layer hooks)"
    LAYER_BY_LAYER = "the LM's layers called in turn, each with its view's mask (decode.py)"
    STATIC = "the compiled step on slimvlm's static cache (static_cache.py)"


@dataclass(frozen=True)
class Plan:
    """One forward's path. prefill: how the LLM runs over the prompt (None in a decode step); cache: where
    the prompt's entries are; decode: how the prompt's decode steps run (in a step's plan: how this one runs);
    layer_hooks: the stage-3/4 hooks are on the LLM layers during the call; graphs: parts replay from CUDA graphs."""

    prefill: Prefill | None
    cache: Cache
    decode: Decode
    layer_hooks: bool
    graphs: bool

    def step(self, lm_outputs_asked: bool) -> Plan:
        """The plan of a decode step of this prompt. lm_outputs_asked: the step passes arguments for the LM's
        own forward (those outside the model's signature), which the layer-by-layer step does not take."""
        if self.decode is Decode.LAYER_BY_LAYER and lm_outputs_asked:  # the hooks give each layer its view's mask
            return replace(self, prefill=None, decode=Decode.LM, layer_hooks=True)
        # no hooks elsewhere: no view needs them, or the step gives each layer its mask itself (on the static
        # cache, where hooks would also be traced into the compiled step); but the views of an LM of mixed layers,
        # decoded by the LM's own forward, keep them
        return replace(self, prefill=None, layer_hooks=self.layer_hooks and self.decode is Decode.LM)


def plan_prefill(*, edits_layers: bool, unmerge: bool, mixed_layers: bool, takes_masks: bool, graphs: bool, batch: int,
                 lm_outputs_asked: bool, use_cache: bool, static_given: bool, layer_features: bool = False) -> Plan:
    """The plan of a prompt with images.

    edits_layers: stage-3/4 methods drop tokens or cut cache entries, so LLM layers end prefill holding different
    entries. unmerge: virtual unmerging (unmerge.py) runs in every layer's attention. mixed_layers: not every LM layer
    attends causally over the whole prompt (some attend within a sliding window, or are linear attention, whose cache is
    a recurrent state: Qwen3.5's), so each kind of layer takes masks of its own. takes_masks: its attention takes
    slimvlm's 4D masks (SDPA, eager; not flash attention). graphs: CUDA graphs are wanted (graphs.graphs_wanted).
    batch: the prompts. lm_outputs_asked: the call passes arguments for the LM's own forward. use_cache: the prefill
    keeps a cache. static_given: the caller's cache is a static one (generate(cache_implementation="static")).
    layer_features: visual tokens add features to the LM's first layers' outputs (Qwen3-VL's DeepStack, added by hooks
    on those layers: layer_features.py), so the LM's own forward runs the prefill (the segments' graphs and the static
    prefill's reordered rows would not see them)."""
    if not use_cache:
        cache = Cache.NONE
    elif not static_given:
        cache = Cache.DYNAMIC
    elif edits_layers or unmerge:  # the prefill's entries are handed over to slimvlm's static cache (static_cache.py);
        # under virtual unmerging the prefill attends over the copies on the dynamic cache, and each decode step over
        # copies of one shape for the call (unmerge.StaticCopies)
        cache = Cache.HAND_OFF
    else:
        cache = Cache.STATIC
    # at batch 1 with CUDA graphs, where a prefill is paid in launches, the runtime runs the LM in segments
    # between drops replayed from graphs (segments.py): on the dynamic cache, and on the static one for
    # stages 3-4 (stage 1-2 methods replay the whole LM there). Not where the caller asks the LM's own outputs,
    # nor on an LM of mixed layers (the segments' layers attend causally over the whole prompt into a cache of keys)
    # or whose attention takes no mask of slimvlm's (flash attention); nor without graphs, where the segments'
    # attention over the prompt's width (masked) would cost what the drops save
    segments = (graphs and batch == 1 and not lm_outputs_asked and not unmerge and not mixed_layers and takes_masks
                and cache is not Cache.STATIC and not layer_features)
    if segments:
        prefill = Prefill.SEGMENTS  # the segments run the drops themselves
    elif cache is Cache.STATIC and not lm_outputs_asked and not layer_features and not mixed_layers:  # an LM of mixed
        # layers fills slimvlm's static cache through its own forward, with its own masks per kind of layer (the static
        # prefill's are causal over the whole prompt)
        prefill = Prefill.STATIC
    else:
        prefill = Prefill.LM
    if cache in (Cache.STATIC, Cache.HAND_OFF):
        decode = Decode.STATIC
    elif edits_layers and not mixed_layers:  # no layer hook runs each step (decode.py)
        decode = Decode.LAYER_BY_LAYER
    else:  # on an LM of mixed layers after drops (its adapter masks each view per kind of layer), the LM's own forward
        # builds the first view's masks for its kinds of layers and every layer's rotary embeddings, the hooks the other
        # views'
        decode = Decode.LM
    return Plan(prefill=prefill, cache=cache, decode=decode, layer_hooks=prefill is Prefill.LM and edits_layers,
                graphs=graphs)
