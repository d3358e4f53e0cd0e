"""Qwen3.5 (Qwen3-VL's vision without DeepStack, a hybrid LM of Gated DeltaNet linear-attention layers and gated
full-attention layers) on a tiny random model of the real class. Qwen2-VL's tests that need neither the static cache
nor stages 3-4 run here on Qwen3.5 (imported below, with this module's tiny_qwen); then what is Qwen3.5's own: the
no-op's text on the dynamic cache, every method that runs batched as one by one (images and videos), stages 3-4 and
the static cache refused by name, and the model whole after each."""

import pytest
import torch

import slimvlm
from conftest import qwen_batch, qwen_model, qwen_select
from slimvlm.errors import SlimVLMError
from slimvlm.registry import methods
from test_qwen2_vl import (  # noqa: F401 (collected here, on Qwen3.5)
    KINDS,
    generate,
    test_a_budget_over_an_items_tokens_is_refused,
    test_a_float_grid_is_refused_by_name,
    test_a_videos_vision_stats_count_its_frames,
    test_an_item_split_by_another_is_refused,
    test_bad_inputs_are_named,
    test_bad_inputs_are_named_before_generate_computes_positions,
    test_bad_video_inputs_are_named,
    test_none_gives_the_untouched_logits,
    test_positions_need_no_mm_token_type_ids,
    test_renumbering_is_refused,
    test_stage_2_keeps_its_budget_of_each_item,
    test_synthetic_videos_run_as_the_untouched_model,
    test_visionzip_keeps_the_units_the_last_block_attends_most,
    test_visionzip_stats_count_the_merger_on_every_unit,
    test_visionzip_takes_fractions_of_each_items_tokens,
)

RUNS = {
    "none": "none",
    "random": "random:budget=10",
    "uniform": "uniform:ratio=0.5",
    "divprune": "divprune:budget=10",
    "visionzip": "visionzip:dominant=8,contextual=2",
}
LINEAR = "three of every four of Qwen3.5's LM layers are linear attention"
REFUSED = {
    "fastv": ("fastv:k=2,ratio=0.5", LINEAR),
    "mustdrop": ("mustdrop:lsm=false,important=false,layers=0;1", LINEAR),
    "vtu": ("vtu", "unmerges the tokens a stage-1 method merged.*use visionzip .on the merged tokens. or a stage-2 method"),
    "tome": ("tome:r=2", "acts inside the vision encoder.*use visionzip .on the merged tokens. or a stage-2 method .divprune, random, uniform.$"),
    "dymu": ("dymu:target=10", "acts inside the vision encoder"),
    "pool": ("pool:budget=4", "one square patch grid per image"),
    "llava-mini": ("llava-mini:budget=4", "one square patch grid per image"),
}


@pytest.fixture(scope="module")
def tiny_qwen():
    """The tiny Qwen3.5, in place of conftest's Qwen2-VL families for every test of this module."""
    return qwen_model("qwen3_5")


def test_every_method_is_covered():
    assert set(RUNS) | set(REFUSED) == set(methods())


def test_the_adapter_is_qwen35s_and_the_lm_is_hybrid(fresh_qwen):
    with slimvlm.apply(fresh_qwen, "none") as handle:
        assert handle.runtime.adapter.family == "qwen3.5"
    assert fresh_qwen.config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]


@pytest.mark.parametrize("kind", KINDS)
def test_none_generates_the_untouched_text(fresh_qwen, kind):
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind=kind)
    with torch.no_grad():
        reference = generate(model, inputs, static=False)
        with slimvlm.apply(model, "none"):
            output = generate(model, inputs, static=False)
    assert torch.equal(output.sequences, reference.sequences)
    for ours, theirs in zip(output.scores, reference.scores):
        assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("name", sorted(RUNS))
@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_one_by_one(fresh_qwen, kind, name):
    """Each prompt's greedy tokens and last-step scores in the left-padded batch are its own alone; the model is
    exactly the untouched one after remove()."""
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind=kind)
    new = 4
    with torch.no_grad():
        before = model(**inputs).logits
        with slimvlm.apply(model, RUNS[name]):
            batched = generate(model, inputs, static=False, new_tokens=new)
            alone = [generate(model, qwen_select(inputs, index), static=False, new_tokens=new) for index in range(2)]
        for index, single in enumerate(alone):
            assert batched.sequences[index, -new:].tolist() == single.sequences[0, -new:].tolist()
            assert torch.allclose(batched.scores[-1][index], single.scores[-1][0], atol=1e-4)
        assert torch.equal(model(**inputs).logits, before)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_cannot_act_on_qwen35_is_refused_with_the_reason(fresh_qwen, name):
    spec, says = REFUSED[name]
    with pytest.raises(SlimVLMError, match=says):
        slimvlm.apply(fresh_qwen, spec)


def test_the_static_cache_is_refused_by_name_and_the_model_stays_whole(fresh_qwen):
    model = fresh_qwen
    inputs = qwen_batch(model.config)
    with torch.no_grad():
        reference = generate(model, inputs, static=False).sequences
        with slimvlm.apply(model, "divprune:budget=10"):
            with pytest.raises(SlimVLMError, match="linear-attention layers.*cache_implementation='static'"):
                generate(model, inputs, static=True)
        assert torch.equal(generate(model, inputs, static=False).sequences, reference)


def test_the_moe_class_runs_as_the_dense_one():
    model = qwen_model("qwen3_5_moe")
    inputs = qwen_batch(model.config)
    with torch.no_grad():
        reference = model(**inputs).logits
        untouched = generate(model, inputs, static=False).sequences
        with slimvlm.apply(model, "none"):
            assert torch.equal(model(**inputs).logits, reference)
            assert torch.equal(generate(model, inputs, static=False).sequences, untouched)
        with slimvlm.apply(model, "divprune:budget=10") as handle:
            batched = generate(model, inputs, static=False).sequences[:, -5:]
            assert handle.stats.visual_tokens == [10, 10]
            alone = [generate(model, qwen_select(inputs, index), static=False).sequences[0, -5:] for index in range(2)]
    assert [row.tolist() for row in batched] == [row.tolist() for row in alone]


def test_flops_count_the_hybrid_lms_layers(fresh_qwen):
    """`slimvlm bench`'s FLOPs on the hybrid LM: a linear-attention layer's cost grows with its tokens alone (no pair
    term), a full-attention layer's with their pairs; a stage-2 method's count is below the untouched one's, and an
    evaluation reports it."""
    from slimvlm.bench import flops
    from slimvlm.bench.evaluate import MethodResult

    model = fresh_qwen
    shape = flops.llm_shape(model.config.text_config)
    assert "linear_attention" in shape.layer_kinds and "full_attention" in shape.layer_kinds and shape.query_gate
    linear, full = shape.layer_kinds.index("linear_attention"), shape.layer_kinds.index("full_attention")
    assert flops.llm_layer_prefill_flops(shape, 20, layer=linear) == 20 * flops.llm_layer_prefill_flops(shape, 1, layer=linear)
    assert flops.llm_layer_prefill_flops(shape, 20, layer=full) > 20 * flops.llm_layer_prefill_flops(shape, 1, layer=full)
    results = {}
    for method in ("none", "divprune:budget=10"):
        with torch.no_grad(), slimvlm.apply(model, method) as handle:
            model(**qwen_batch(model.config))
        results[method] = MethodResult(method=method, records=[], stats=[handle.stats], config=model.config)
    assert 0 < results["divprune:budget=10"].prefill_flops < results["none"].prefill_flops
