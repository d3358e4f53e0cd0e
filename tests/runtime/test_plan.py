"""The runtime's plan of a call (runtime/plan.py): which prefill, cache and decode path each case takes."""

import pytest

from slimvlm.runtime.plan import Cache, Decode, Prefill, plan_prefill

# stage-3/4 methods on an SDPA LM, on a GPU at inference, at batch 1, on generate()'s dynamic cache
USUAL = dict(edits_layers=True, unmerge=False, mixed_layers=False, takes_masks=True, graphs=True, batch=1,
             lm_outputs_asked=False, use_cache=True, static_given=False)


def plan(**changes):
    return plan_prefill(**{**USUAL, **changes})


@pytest.mark.parametrize("changes, prefill, cache, decode, layer_hooks", [
    ({}, Prefill.SEGMENTS, Cache.DYNAMIC, Decode.LAYER_BY_LAYER, False),
    (dict(graphs=False), Prefill.LM, Cache.DYNAMIC, Decode.LAYER_BY_LAYER, True),
    (dict(batch=2), Prefill.LM, Cache.DYNAMIC, Decode.LAYER_BY_LAYER, True),
    (dict(lm_outputs_asked=True), Prefill.LM, Cache.DYNAMIC, Decode.LAYER_BY_LAYER, True),
    (dict(takes_masks=False), Prefill.LM, Cache.DYNAMIC, Decode.LAYER_BY_LAYER, True),
    (dict(use_cache=False), Prefill.SEGMENTS, Cache.NONE, Decode.LAYER_BY_LAYER, False),
    (dict(static_given=True), Prefill.SEGMENTS, Cache.HAND_OFF, Decode.STATIC, False),
    (dict(static_given=True, batch=2), Prefill.LM, Cache.HAND_OFF, Decode.STATIC, True),
    (dict(edits_layers=False), Prefill.SEGMENTS, Cache.DYNAMIC, Decode.LM, False),
    (dict(edits_layers=False, batch=2), Prefill.LM, Cache.DYNAMIC, Decode.LM, False),
    (dict(edits_layers=False, static_given=True), Prefill.STATIC, Cache.STATIC, Decode.STATIC, False),
    (dict(edits_layers=False, static_given=True, lm_outputs_asked=True), Prefill.LM, Cache.STATIC, Decode.STATIC,
     False),
    (dict(edits_layers=False, unmerge=True), Prefill.LM, Cache.DYNAMIC, Decode.LM, False),
    (dict(edits_layers=False, mixed_layers=True), Prefill.LM, Cache.DYNAMIC, Decode.LM, False),
    # drops on an LM of mixed layers (Gemma 3's sliding windows, Qwen3.5's linear attention): its own forward decodes,
    # building the first view's masks for each kind of layer, the hooks the later views'
    (dict(mixed_layers=True), Prefill.LM, Cache.DYNAMIC, Decode.LM, True),
    # an LM of mixed layers on a static cache: its own forward fills slimvlm's cache with its masks per kind of layer
    # (the static prefill's are causal over the prompt), or prefills on the dynamic cache after drops and hands off
    (dict(edits_layers=False, mixed_layers=True, static_given=True), Prefill.LM, Cache.STATIC, Decode.STATIC, False),
    (dict(mixed_layers=True, static_given=True), Prefill.LM, Cache.HAND_OFF, Decode.STATIC, True),
    # features added to the first layers' outputs (Qwen3-VL's DeepStack): hooks on the LM's own forward
    (dict(layer_features=True), Prefill.LM, Cache.DYNAMIC, Decode.LAYER_BY_LAYER, True),
    (dict(layer_features=True, static_given=True), Prefill.LM, Cache.HAND_OFF, Decode.STATIC, True),
    (dict(layer_features=True, edits_layers=False, static_given=True), Prefill.LM, Cache.STATIC, Decode.STATIC, False),
])
def test_a_prefill_takes_one_path_decided_by_its_conditions(changes, prefill, cache, decode, layer_hooks):
    planned = plan(**changes)
    assert (planned.prefill, planned.cache, planned.decode, planned.layer_hooks) == (prefill, cache, decode, layer_hooks)


def test_a_decode_step_follows_its_prompts_plan():
    layer_by_layer = plan(graphs=False)
    assert layer_by_layer.step(lm_outputs_asked=False).decode is Decode.LAYER_BY_LAYER
    assert not layer_by_layer.step(lm_outputs_asked=False).layer_hooks  # the step masks each layer itself
    with_outputs = layer_by_layer.step(lm_outputs_asked=True)  # only the LM's own forward takes them
    assert (with_outputs.prefill, with_outputs.decode, with_outputs.layer_hooks) == (None, Decode.LM, True)
    mixed = plan(mixed_layers=True).step(lm_outputs_asked=False)  # the hooks give the later views their masks
    assert (mixed.prefill, mixed.decode, mixed.layer_hooks) == (None, Decode.LM, True)
    assert not plan(mixed_layers=True, edits_layers=False).step(lm_outputs_asked=False).layer_hooks
    static = plan(graphs=False, static_given=True).step(lm_outputs_asked=True)
    assert (static.decode, static.layer_hooks) == (Decode.STATIC, False)  # hooks would be traced into the step


def test_virtual_unmerging_on_a_static_cache_prefills_on_the_dynamic_one_and_hands_off():
    unmerging = plan(edits_layers=False, unmerge=True, static_given=True)
    assert (unmerging.cache, unmerging.prefill, unmerging.decode) == (Cache.HAND_OFF, Prefill.LM, Decode.STATIC)
    assert plan(edits_layers=False, unmerge=True, static_given=True, use_cache=False).cache is Cache.NONE
