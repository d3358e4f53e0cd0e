"""Qwen3.5 (Qwen3-VL's vision without DeepStack, a hybrid LM of Gated DeltaNet linear-attention layers and gated
full-attention layers) on a tiny random model of the real class. Qwen2-VL's tests that need neither the static cache
nor stages 3-4 run here on Qwen3.5 (imported below, with this module's tiny_qwen); then what is Qwen3.5's own: the
no-op's text on the dynamic cache, every method that runs batched as one by one (images and videos), stage 4 refused by
name, and the model whole after each; then stage 3 on an LM with a full-attention layer every
other layer: FastV against FastV by hand (the linear layers' recurrence over the kept tokens; prefill, a decode step,
a follow-up turn), the attention rows of a gated full-attention layer, batched = one by one, a drop scored at a
linear-attention layer refused naming it; then slimvlm's static cache on it: `none` the untouched model on
transformers' static cache, every method the dynamic path's tokens, batched = one by one, remove() after static
generations, the decode step traced as one graph, no host read a step beyond the untouched model's."""

import copy

import pytest
import torch

import slimvlm
from conftest import (QWEN_KINDS, assert_remove_restores, qwen_batch, qwen_model, qwen_select, remove_slimvlm,
                      spy_on_segments)
from slimvlm.errors import SlimVLMError
from slimvlm.registry import methods
from test_qwen2_vl import (  # noqa: F401 (collected here, on Qwen3.5)
    KINDS,
    TOKENS,
    generate,
    rope_index,
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
INSTEAD = ("use visionzip .on the merged tokens. or a stage-2 method .divprune, random, uniform., or a stage-3 drop scored "
           "at a full-attention layer .fastv, or mustdrop:lsm=false,important=false,output_cache=false: its LLM filter.$")
REFUSED = {  # on the tiny model's LM: three linear-attention layers, then its only full-attention one
    "fastv": ("fastv:k=2,ratio=0.5", "fastv drops tokens at LLM layer 2 by the attention rows of layer 1, but layer 1 of "
              "Qwen3.5's LM is linear attention .*none of its full-attention layers has a layer after it to drop at"),
    "mustdrop": ("mustdrop:lsm=false,important=false,layers=0;1", "mustdrop cuts each LLM layer's cache after prefill "
                 ".stage 4., but Qwen3.5's linear-attention layers .* no entries to cut; " + INSTEAD),
    "vtu": ("vtu", "unmerges the tokens a stage-1 method merged.*" + INSTEAD),
    "tome": ("tome:r=2", "acts inside the vision encoder.*" + INSTEAD),
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


# ---- stage 3 on the hybrid LM ---------------------------------------------------------------------------------------
HYBRID = dict(num_hidden_layers=6, full_attention_interval=2)  # linear, full, linear, full, linear, full
STAGE_3 = {
    "fastv": "fastv:k=2,ratio=0.5",
    "mustdrop": "mustdrop:lsm=false,important=false,output_cache=false,global_thr=0.05,individual_thr=0.05,layers=1;3",
}


@pytest.fixture(scope="module")
def hybrid_qwen():
    """The tiny Qwen3.5 with a full-attention layer every other layer: drops scored at layers 1 and 3 hand the kept
    tokens to linear-attention and full-attention layers after them. Its padding token embeds as a random vector, as a
    real checkpoint's does (not as the zero row of nn.Embedding's padding_idx, which every layer keeps at zero): padding
    that leaks into a linear layer's recurrence shows."""
    model = qwen_model("qwen3_5", **HYBRID)
    assert model.config.text_config.layer_types == ["linear_attention", "full_attention"] * 3
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.text_config.pad_token_id].normal_(
            generator=torch.Generator().manual_seed(0))
    return model


@pytest.fixture
def fresh_hybrid(hybrid_qwen):
    yield hybrid_qwen
    remove_slimvlm(hybrid_qwen)


@pytest.fixture(scope="module")
def eager_hybrid(hybrid_qwen):
    """The same weights on eager attention, which returns its attention probabilities."""
    model = copy.deepcopy(hybrid_qwen)
    model.set_attn_implementation("eager")
    return model


def eager_rows(eager, inputs: dict, layer: int) -> torch.Tensor:
    """(H, L, L) the attention probabilities of LM layer `layer` (full attention) on one prompt, as eager attention
    returns them."""
    captured = []
    attention = eager.model.language_model.layers[layer].self_attn
    hook = attention.register_forward_hook(lambda _module, _args, output: captured.append(output[1]))
    try:
        with torch.no_grad():
            eager(**inputs)
    finally:
        hook.remove()
    return captured[0][0]


def fastv_by_hand(model, eager, inputs: dict, kind: str, k: int, ratio: float, appended: list[int] = ()) -> torch.Tensor:
    """FastV written out on one unpadded prompt (then `appended` tokens, as decode steps add them), layer by layer, the
    last position's logits: the untouched prompt's embeddings (each item's merger outputs at its placeholders) and M-RoPE
    positions (get_rope_index; each appended token one further on every axis); layers 0..k-1 on every token; the last
    prompt token's attention in layer k-1 (full attention), as the eager model returns it, averaged over heads, ranks the
    visual tokens and the round(ratio x n) lowest go (ties: the earlier); then layers k.. on the kept tokens alone: each
    linear-attention layer's convolution and recurrence over them from a zero state, each full-attention layer causal
    over them at their own positions."""
    lm = model.model.language_model
    pixels, grids, type_id = QWEN_KINDS[kind]
    encoder = model.model.get_image_features if kind == "image" else model.model.get_video_features
    with torch.no_grad():
        rows = eager_rows(eager, inputs, k - 1)[:, -1].mean(dim=0)  # (L,)
        visual = inputs["mm_token_type_ids"][0] == type_id
        hidden = lm.embed_tokens(inputs["input_ids"])
        hidden[0, visual] = torch.cat(encoder(inputs[pixels], inputs[grids]).pooler_output)
        hidden = torch.cat([hidden, lm.embed_tokens(torch.tensor([list(appended)], dtype=torch.long))], dim=1)
        positions = rope_index(model, inputs)  # (3, 1, L)
        positions = torch.cat([positions, positions[:, :, -1:] + torch.arange(1, len(appended) + 1)], dim=2)
        order = rows.masked_fill(~visual, float("inf")).argsort(stable=True)
        keep = torch.ones(hidden.shape[1], dtype=torch.bool)
        keep[order[: round(ratio * int(visual.sum()))]] = False
        for part, layers in ((torch.ones_like(keep), range(k)), (keep, range(k, len(lm.layers)))):
            hidden, positions = hidden[:, part], positions[:, :, part]
            embeddings = lm.rotary_emb(hidden, positions)
            causal = torch.ones(hidden.shape[1], hidden.shape[1], dtype=torch.bool).tril()[None, None]
            for index in layers:
                full = lm.config.layer_types[index] == "full_attention"
                hidden = lm.layers[index](hidden, position_embeddings=embeddings, attention_mask=causal if full else None)
        return model.lm_head(lm.norm(hidden))[0, -1]


@pytest.mark.parametrize("kind", KINDS)
def test_fastv_is_fastv_by_hand(fresh_hybrid, eager_hybrid, kind):
    """fastv:k=2 scores at layer 1 (full attention) and hands layers 2-5 (linear, full, linear, full) the kept half of
    the 24 visual tokens: the prefill's logits and the first decode step's (the linear layers continuing from the kept
    tokens' states, the full ones from their cached entries) are those of FastV by hand."""
    model = fresh_hybrid
    inputs = qwen_select(qwen_batch(model.config, kind=kind), 0)
    with torch.no_grad(), slimvlm.apply(model, "fastv:k=2,ratio=0.5") as handle:
        out = generate(model, inputs, static=False, new_tokens=2)
        kept = handle.stats.kv_visual_entries[0]
    assert kept == [TOKENS[0]] * 2 + [TOKENS[0] // 2] * 4
    first = out.sequences[0, -2].item()
    torch.testing.assert_close(out.scores[0][0], fastv_by_hand(model, eager_hybrid, inputs, kind, 2, 0.5), atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(out.scores[1][0], fastv_by_hand(model, eager_hybrid, inputs, kind, 2, 0.5, [first]),
                               atol=1e-4, rtol=1e-4)


def test_a_follow_up_turn_after_fastv_is_fastv_by_hand(fresh_hybrid, eager_hybrid):
    """A follow-up turn on the cache FastV left: its 4 new tokens in one step (the last generated and 3 more), each
    linear layer's convolution and recurrence continuing from its state over them, each full-attention layer attending
    over the entries of its view; the last logits are FastV by hand on the whole conversation with the first turn's
    drops."""
    from slimvlm.models.compat import cache_kwarg

    model = fresh_hybrid
    inputs = qwen_select(qwen_batch(model.config), 0)
    more = [11, 12, 13]
    with torch.no_grad(), slimvlm.apply(model, "fastv:k=2,ratio=0.5"):
        out = generate(model, inputs, static=False, new_tokens=2)
        conversation = torch.cat([out.sequences, torch.tensor([more])], dim=1)
        name = cache_kwarg(type(model).forward)  # the output's field and the forward's keyword, by release
        follow_up = model(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                          **{name: getattr(out, name)}).logits[0, -1]
    turn = out.sequences[0, -2:].tolist() + more
    torch.testing.assert_close(follow_up, fastv_by_hand(model, eager_hybrid, inputs, "image", 2, 0.5, turn), atol=1e-4,
                               rtol=1e-4)


def test_attention_rows_are_the_gated_layers_query_half_after_q_norm_and_partial_rotary(fresh_hybrid, eager_hybrid):
    """The rows a stage-3 method scores by, computed beside SDPA from a full-attention layer's projections, are eager
    attention's: each head's query is the first half of its q_proj output (the second, the gate, scales the attention's
    output), normed by q_norm and rotated on part of its channels (partial rotary: half here), as are the keys."""
    from slimvlm.attention import question_rows
    from slimvlm.hooks import capture_outputs

    model = fresh_hybrid
    inputs = qwen_select(qwen_batch(model.config), 0)
    length = inputs["input_ids"].shape[1]
    with slimvlm.apply(model, "none") as handle:
        adapter = handle.runtime.adapter
        parts = adapter.attention_parts(1)
    assert parts.gated_query and parts.q_proj.out_features == 2 * parts.num_heads * parts.head_dim
    lm = model.model.language_model
    rotated = lm.rotary_emb(torch.zeros(1), rope_index(model, inputs))[0].shape[-1]
    assert rotated < parts.head_dim  # a part of each head rotates
    captured = {}
    hook = lm.layers[1].register_forward_pre_hook(lambda _module, _args, kwargs: captured.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad(), capture_outputs(parts.q_proj, parts.k_proj) as projected:
            model(**inputs)
    finally:
        hook.remove()
    index = torch.tensor([[length - 3, length - 1]])
    with torch.no_grad():
        rows = question_rows(adapter, parts, *projected, captured["position_embeddings"], index,
                             torch.ones(1, length, dtype=torch.bool))
    torch.testing.assert_close(rows[0], eager_rows(eager_hybrid, inputs, 1)[:, index[0]], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(STAGE_3))
@pytest.mark.parametrize("kind", KINDS)
def test_stage_3_batched_equals_one_by_one(fresh_hybrid, kind, name):
    """Left-padded prompts of 24 and 16 visual tokens: each prompt's greedy tokens and every step's scores in the batch
    are its own alone (after a drop the rows keep different counts, so the linear layers take the padding mask); the
    method dropped tokens."""
    model = fresh_hybrid
    inputs = qwen_batch(model.config, kind=kind)
    new = 4
    with torch.no_grad(), slimvlm.apply(model, STAGE_3[name]) as handle:
        batched = generate(model, inputs, static=False, new_tokens=new)
        kept = [layers[-1] for layers in handle.stats.kv_visual_entries]
        alone = [generate(model, qwen_select(inputs, index), static=False, new_tokens=new) for index in range(2)]
    assert all(0 < count < tokens for count, tokens in zip(kept, TOKENS)) and kept[0] - kept[1] != TOKENS[0] - TOKENS[1]
    for index, single in enumerate(alone):
        assert batched.sequences[index, -new:].tolist() == single.sequences[0, -new:].tolist()
        for together, own in zip(batched.scores, single.scores, strict=True):
            torch.testing.assert_close(together[index], own[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", ["divprune:budget=10", STAGE_3["fastv"]])
def test_a_batch_1_prefill_with_cuda_graphs_runs_the_lms_own_forward(fresh_hybrid, spec):
    """Where CUDA graphs are wanted (replayed here as the functions they capture) a batch of one would run the LM in
    segments of layers attending causally into a cache of keys, which linear-attention layers do not keep: the LM's
    own forward runs instead, and generates what it does without graphs."""
    from slimvlm.device_reads import HostReads, graphs_replayed_as_launches

    model = fresh_hybrid
    inputs = qwen_select(qwen_batch(model.config), 0)
    with torch.no_grad():
        with slimvlm.apply(model, spec, cuda_graphs=False):
            expected = generate(model, inputs, static=False)
        with slimvlm.apply(model, spec) as handle, HostReads() as reads, graphs_replayed_as_launches(reads):
            segments = spy_on_segments(handle)
            replayed = generate(model, inputs, static=False)
    assert segments == []
    assert torch.equal(replayed.sequences, expected.sequences)
    for ours, theirs in zip(replayed.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_the_moe_class_drops_as_the_dense_one():
    model = qwen_model("qwen3_5_moe", **HYBRID)
    inputs = qwen_batch(model.config)
    with torch.no_grad(), slimvlm.apply(model, "fastv:k=2,ratio=0.5") as handle:
        batched = generate(model, inputs, static=False).sequences[:, -5:]
        assert [layers[-1] for layers in handle.stats.kv_visual_entries] == [tokens // 2 for tokens in TOKENS]
        alone = [generate(model, qwen_select(inputs, index), static=False).sequences[0, -5:] for index in range(2)]
    assert [row.tolist() for row in batched] == [row.tolist() for row in alone]


def test_remove_restores_the_model_after_stage_3(fresh_hybrid):
    model = fresh_hybrid
    inputs = qwen_batch(model.config)
    assert_remove_restores(model, inputs, list(STAGE_3.values()), lambda: generate(model, inputs, static=False))


@pytest.mark.parametrize("spec, layer, drop", [
    ("fastv:k=3,ratio=0.5", 2, 3),
    ("mustdrop:lsm=false,important=false,output_cache=false,layers=1;4", 4, 5),
])
def test_a_drop_scored_at_a_linear_layer_is_refused_naming_it(fresh_hybrid, spec, layer, drop):
    """The refusal names the method, the linear-attention layer it would score at and the full-attention layers it
    could score at (those with a layer after them to drop at: 1 and 3, not 5)."""
    method = spec.split(":")[0]
    says = (f"{method} drops tokens at LLM layer {drop} by the attention rows of layer {layer}, but layer {layer} of "
            r"Qwen3.5's LM is linear attention \(Gated DeltaNet: a recurrent state, no attention rows\); score at a "
            r"full-attention layer: 1, 3 \(a drop at the layer after: 2, 4\)$")
    with pytest.raises(SlimVLMError, match=says):
        slimvlm.apply(fresh_hybrid, spec)
    assert "forward" not in fresh_hybrid.__dict__


# ---- slimvlm's static cache on the hybrid LM ------------------------------------------------------------------------
STATIC_RUNS = {**RUNS, **STAGE_3}


def generate_with_logits(model, inputs: dict, new: int, static: bool):
    """Greedy generation of `new` tokens with each step's logits, on transformers' static cache where `static`."""
    extra = {"cache_implementation": "static"} if static else {}
    return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **extra)


def assert_same_text_and_logits(first, second) -> None:
    """The same greedy tokens, each step's logits within float32's rounding (1e-4, as this module's other tests): a linear
    layer's recurrence runs in float32 whatever the model's dtype (in float64 the paths still differ by 1e-6)."""
    assert torch.equal(first.sequences, second.sequences)
    for a, b in zip(first.logits, second.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_none_on_the_static_cache_is_the_untouched_model(fresh_hybrid, kind):
    """generate(cache_implementation="static") under `none` against the untouched model on transformers' static cache
    (its linear layers' LinearAttentionLayers, its full-attention layers' StaticLayers): 12 new tokens on two
    left-padded prompts; the steps ran on slimvlm's static cache, whose linear layers hold states."""
    from slimvlm.runtime.static_cache import is_recurrent

    model = fresh_hybrid
    inputs = qwen_batch(model.config, kind=kind)
    assert not inputs["attention_mask"].all()
    with torch.no_grad():
        untouched = generate_with_logits(model, inputs, 12, static=True)
        with slimvlm.apply(model, "none") as handle:
            ours = generate_with_logits(model, inputs, 12, static=True)
            session = handle.runtime.session
    assert session.static is not None
    assert [is_recurrent(layer) for layer in session.cache.layers] == [True, False] * 3
    assert_same_text_and_logits(ours, untouched)


@pytest.mark.parametrize("name", sorted(STATIC_RUNS))
@pytest.mark.parametrize("kind", KINDS)
def test_the_static_cache_generates_what_the_dynamic_cache_does(fresh_hybrid, kind, name):
    """Every method Qwen3.5 runs, 12 new tokens on two left-padded prompts: the same tokens and logits on
    slimvlm's static cache as on the dynamic one (after a stage-3 drop the static cache takes the prefill's entries
    and its linear layers' convolution and recurrent states from the dynamic cache)."""
    model = fresh_hybrid
    inputs = qwen_batch(model.config, kind=kind)
    with torch.no_grad(), slimvlm.apply(model, STATIC_RUNS[name]) as handle:
        dynamic = generate_with_logits(model, inputs, 12, static=False)
        static = generate_with_logits(model, inputs, 12, static=True)
        assert handle.runtime.session.static is not None
    assert_same_text_and_logits(static, dynamic)


@pytest.mark.parametrize("name", sorted(STATIC_RUNS))
def test_the_static_cache_batched_equals_one_by_one(fresh_hybrid, name):
    """On slimvlm's static cache each left-padded prompt's greedy tokens and logits (within 1e-4, as on the dynamic cache) are its own alone:
    the padding enters neither a linear layer's states nor a full-attention layer's mask."""
    model = fresh_hybrid
    inputs = qwen_batch(model.config)
    new = 6
    with torch.no_grad(), slimvlm.apply(model, STATIC_RUNS[name]):
        batched = generate_with_logits(model, inputs, new, static=True)
        for index in range(2):
            alone = generate_with_logits(model, qwen_select(inputs, index), new, static=True)
            assert alone.sequences[0, -new:].tolist() == batched.sequences[index, -new:].tolist()
            for together, single in zip(batched.logits, alone.logits, strict=True):
                torch.testing.assert_close(together[index], single[0], atol=1e-4, rtol=1e-4)


def test_remove_restores_the_model_after_static_generations(fresh_hybrid):
    model = fresh_hybrid
    inputs = qwen_batch(model.config)
    assert_remove_restores(model, inputs, ["divprune:budget=10", *STAGE_3.values()],
                           lambda: generate(model, inputs, static=True))


def test_the_static_decode_step_compiles_as_one_graph(fresh_hybrid):
    """Linear layers without a mask beside full-attention layers with their group's, traced as one graph (fullgraph: a
    break raises) with CompileConfig's eager backend (no compiler on this machine): the eager step's text, under
    `none` and FastV (the full-attention layers' groups before and after its drop)."""
    from transformers import CompileConfig

    model = fresh_hybrid
    inputs = qwen_batch(model.config)
    saved = model.generation_config.compile_config
    model.generation_config.compile_config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        with torch.no_grad():
            for spec in ("none", STAGE_3["fastv"]):
                with slimvlm.apply(model, spec):
                    eager = generate_with_logits(model, inputs, 6, static=True)
                with slimvlm.apply(model, spec, compile=True) as handle:
                    compiled = generate_with_logits(model, inputs, 6, static=True)
                    assert handle.runtime.decoder.static._compiled is not None  # the steps ran compiled
                assert torch.equal(compiled.sequences, eager.sequences)
                for a, b in zip(compiled.logits, eager.logits, strict=True):
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2  # one a spec, no break
    finally:
        model.generation_config.compile_config = saved
        torch._dynamo.reset()


@pytest.mark.parametrize("spec", ["none", STAGE_3["fastv"]])
def test_a_static_decode_step_reads_what_the_untouched_models_does(fresh_hybrid, spec):
    """A decode step reads back from the device what the untouched model's step on its static cache reads (generate()'s
    own stopping check), at batch 1: the linear layers' states stay where they are, no mask is made for them."""
    from slimvlm.device_reads import HostReads

    model = fresh_hybrid
    inputs = qwen_select(qwen_batch(model.config), 0)

    def reads_per_step() -> float:
        """Reads a step, from two generations after a first: the first allocates slimvlm's static cache, whose reuse
        after a reset holds the offset that the prefill's masks read once (a prefill's read, not a step's)."""
        counted = []
        with torch.no_grad():
            generate_with_logits(model, inputs, 6, static=True)
        for new in (2, 6):
            with torch.no_grad(), HostReads() as reads:
                generate_with_logits(model, inputs, new, static=True)
            counted.append(reads.total)
        return (counted[1] - counted[0]) / 4

    untouched = reads_per_step()
    with slimvlm.apply(model, spec):
        assert reads_per_step() == untouched
