"""Qwen3-VL (DeepStack, interleaved M-RoPE, a timestamp before each of a video's frames, a Qwen3 LM that norms
queries and keys) on tiny random models of the real classes. Qwen2-VL's tests that hold for every Qwen family run
here on Qwen3-VL (imported below, with this module's tiny_qwen): the no-op is exact (logits and text, dynamic and
static cache, left padding, images, videos, both in one prompt, beams), every method runs batched as one by one or is
refused, budgets and stats, bad inputs named. Then what is Qwen3-VL's own: DeepStack's features follow each token a
method keeps, drops or merges, checked by hand against the model's own DeepStack; a video's tokens stay between
their frames' timestamps; attention rows go through q_norm and k_norm; the MoE class."""

import pytest
import torch

import slimvlm
from conftest import QWEN3_TIMESTAMP, qwen_batch, qwen_model, qwen_select, remove_slimvlm
from test_qwen2_vl import (  # noqa: F401 (collected here, on Qwen3-VL)
    KINDS,
    RUNS,
    TOKENS,
    assert_the_static_cache_continues_the_reduced_frame,
    generate,
    rope_index,
    test_a_budget_over_an_items_tokens_is_refused,
    test_a_float_grid_is_refused_by_name,
    test_a_videos_vision_stats_count_its_frames,
    test_an_item_split_by_another_is_refused,
    test_bad_inputs_are_named,
    test_bad_inputs_are_named_before_generate_computes_positions,
    test_bad_video_inputs_are_named,
    test_batched_equals_one_by_one,
    test_every_method_is_covered,
    test_fastv_drops_its_ratio_of_each_items_tokens,
    test_generate_modes_that_repeat_the_prompt,
    test_images_and_videos_in_one_prompt,
    test_mustdrop_asks_for_its_llm_parts_alone,
    test_none_generates_the_untouched_text,
    test_none_gives_the_untouched_logits,
    test_positions_need_no_mm_token_type_ids,
    test_renumbering_is_refused,
    test_stage_2_keeps_its_budget_of_each_item,
    test_synthetic_videos_run_as_the_untouched_model,
    test_visionzip_keeps_the_units_the_last_block_attends_most,
    test_visionzip_stats_count_the_merger_on_every_unit,
    test_visionzip_takes_fractions_of_each_items_tokens,
    test_what_cannot_act_on_qwen_is_refused_with_the_fix,
)

DEEPSTACK = 3  # the tiny model's DeepStack features: added to the outputs of LM layers 0, 1 and 2


@pytest.fixture(scope="module")
def tiny_qwen():
    """The tiny Qwen3-VL, in place of conftest's Qwen2-VL families for every test of this module."""
    return qwen_model("qwen3_vl")


def test_the_adapter_is_qwen3s(fresh_qwen):
    with slimvlm.apply(fresh_qwen, "none") as handle:
        assert handle.runtime.adapter.family == "qwen3-vl"
    assert len(fresh_qwen.model.visual.deepstack_merger_list) == DEEPSTACK


@pytest.mark.parametrize("kind", KINDS)
def test_the_static_cache_continues_the_reduced_frame(kind):
    """In float64: the tiny Qwen3-VL's sharpened q/k norms make float32's cached and recomputed logits differ by up to
    2e-5 on the untouched model and 2e-4 on a reduced video prompt (1e-8 in float64)."""
    assert_the_static_cache_continues_the_reduced_frame(qwen_model("qwen3_vl", seed=1).double(), kind)


def test_the_stage_1_refusal_names_qwen3_and_deepstack(fresh_qwen):
    with pytest.raises(slimvlm.SlimVLMError, match="tome acts inside the vision encoder.*on Qwen3-VL: its merger, and "
                                                   "the DeepStack mergers"):
        slimvlm.apply(fresh_qwen, "tome:r=2")


# ---- DeepStack: the features follow the tokens ------------------------------------------------------------------
def untouched_features(model, inputs, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item's merger outputs (U, D) and DeepStack features (U, K, D), items in order, as the model makes them."""
    pixels, grids = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw")
    with torch.no_grad():
        output = model.model.get_image_features(inputs[pixels], inputs[grids])
    joined = [layer if isinstance(layer, torch.Tensor) else torch.cat(layer) for layer in output.deepstack_features]
    return torch.cat(output.pooler_output), torch.stack(joined, 1)  # (transformers < 5.25 joins them itself)


def expected_by_hand(values: torch.Tensor, sources: list[int], origins: list[int]) -> torch.Tensor:
    """An item's tokens from its units' values (U, ...) by the methods' rules: a token of one unit is that unit's; one
    of several (VisionZip's contextual token) is its target's (the unit it sits at, its origin) plus the mean of the
    others'."""
    out = []
    for token, origin in enumerate(origins):
        members = [unit for unit, source in enumerate(sources) if source == token]
        others = [unit for unit in members if unit != origin]
        out.append(values[origin] + (values[others].mean(0) if others else 0))
    return torch.stack(out)


@pytest.mark.parametrize("spec", ["random:budget=10", "visionzip:dominant=6,contextual=2"], ids=["dropped", "merged"])
@pytest.mark.parametrize("kind", KINDS)
def test_deepstack_features_follow_dropped_and_merged_tokens(fresh_qwen, kind, spec):
    """By hand: each token the LLM got carries the DeepStack features of the units it stands for, combined as its
    main features are (a kept unit's own; a merged token's target plus the mean of the others'), none of a dropped
    unit's; and the model's own DeepStack (visual_pos_masks, deepstack_visual_embeds), run on the reduced prompt put
    together by hand (each token at its origin's placeholder, at that placeholder's 3D position), gives slimvlm's
    logits."""
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind=kind)
    merged, deepstack = untouched_features(model, inputs, kind)
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        logits = model(**inputs).logits
        tokens = handle.runtime.session.tokens
        sources = handle.stats.sources
    assert tokens.layer_features.shape[2] == DEEPSTACK
    placeholder = inputs["mm_token_type_ids"] > 0
    positions = rope_index(model, inputs)
    embeds = model.model.get_input_embeddings()(inputs["input_ids"])
    start = 0
    for row, count in enumerate(TOKENS):
        units = slice(start, start + count)
        start += count
        own = sources[row][:count]
        kept = tokens.host_counts()[row]
        origins = tokens.origin[row, :kept].tolist()
        assert any(own.count(token) > 1 for token in set(own) if token >= 0) == spec.startswith("visionzip")
        assert (-1 in own) == spec.startswith("random")
        features = expected_by_hand(deepstack[units], own, origins)
        torch.testing.assert_close(tokens.layer_features[row, :kept], features, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(tokens.x[row, :kept], expected_by_hand(merged[units], own, origins), atol=1e-6, rtol=1e-6)
        # the reduced prompt by hand, through the LM with the model's own DeepStack
        slots = placeholder[row].nonzero()[:, 0]
        at = slots[torch.tensor(origins)]
        keep = inputs["attention_mask"][row].bool() & ~placeholder[row]
        keep[at] = True
        reduced = embeds[row].clone()
        reduced[at] = tokens.x[row, :kept]
        index = keep.nonzero()[:, 0]
        with torch.no_grad():
            hidden = model.model.language_model(
                inputs_embeds=reduced[index][None], position_ids=positions[:, row : row + 1, index],
                visual_pos_masks=placeholder[row, index][None],
                deepstack_visual_embeds=list(tokens.layer_features[row, :kept].unbind(1))).last_hidden_state
        torch.testing.assert_close(logits[row, -1], model.lm_head(hidden[0, -1]), atol=1e-4, rtol=1e-4)


def test_after_a_stage_3_drop_deepstack_adds_to_the_kept_tokens_alone(fresh_qwen):
    """FastV drops at layer 2's input; the tiny model adds DeepStack features after layers 0, 1 and 2. By hand, layer
    by layer: layers 0 and 1 over the whole prompt, each adding every visual token's features, then the tokens FastV
    kept (slimvlm's choice) through layers 2 and 3, layer 2 adding the kept tokens' own features: slimvlm's logits.
    The features of the first tokens in their place (as if they were packed, not followed) give other logits."""
    model = fresh_qwen
    inputs = qwen_select(qwen_batch(model.config), 0)  # one prompt: its layers attend causally, no mask
    merged, deepstack = untouched_features(model, inputs, "image")
    with torch.no_grad(), slimvlm.apply(model, "fastv:k=2,ratio=0.5") as handle:
        logits = model(**inputs).logits[0, -1]
        session = handle.runtime.session
        assert session.view_of(1).sequence.visual.sum() == TOKENS[0]
        after = session.view_of(2).sequence
        kept = after.token[after.visual]
    assert len(kept) == TOKENS[0] // 2
    lm = model.model.language_model
    visual = inputs["mm_token_type_ids"][0] > 0
    keep = ~visual
    keep[visual.nonzero()[:, 0][kept]] = True
    positions = rope_index(model, inputs)

    def by_hand(kept_features: torch.Tensor) -> torch.Tensor:
        hidden = model.model.get_input_embeddings()(inputs["input_ids"])
        hidden[0, visual] = merged
        index, where, features = torch.arange(hidden.shape[1]), visual, deepstack
        for layer_index, layer in enumerate(lm.layers):
            if layer_index == 2:  # FastV's drop
                hidden, index, where, features = hidden[:, keep], keep.nonzero()[:, 0], visual[keep], kept_features
            hidden = layer(hidden, attention_mask=None, position_embeddings=lm.rotary_emb(hidden, positions[:, :, index]))
            if layer_index < DEEPSTACK:
                hidden = hidden.clone()
                hidden[0, where] += features[:, layer_index]
        return model.lm_head(lm.norm(hidden))[0, -1]

    with torch.no_grad():
        torch.testing.assert_close(logits, by_hand(deepstack[kept]), atol=1e-4, rtol=1e-4)
        assert (logits - by_hand(deepstack[: len(kept)])).abs().max() > 1e-3


# ---- a video's frames, the LM's q/k norms, remove(), the MoE class, the benchmark's shape ------------------------
def test_a_videos_tokens_stay_between_their_frames_timestamps(fresh_qwen):
    """Each temporal step of a Qwen3-VL video is a run of its own (<timestamp><|vision_start|>...<|vision_end|>):
    after random drops the rebuilt prompt is the prompt less the dropped placeholders, in order, so each kept token
    stays in its own frame's run, after its timestamp (packed from the first placeholder on, tokens of later frames
    would sit in earlier frames' runs), at its own placeholder's 3D position."""
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind="video")
    with torch.no_grad(), slimvlm.apply(model, "random:budget=10") as handle:
        model(**inputs)
        sequence = handle.runtime.session.view_of(0).sequence
        tokens = handle.runtime.session.tokens
    positions = rope_index(model, inputs).permute(1, 2, 0)
    for row, (steps, h, w) in enumerate([(12, 2, 4), (4, 4, 4)]):
        ids = inputs["input_ids"][row]
        stamps = (ids >= QWEN3_TIMESTAMP) & (ids < QWEN3_TIMESTAMP + steps)
        frame_at = torch.where(stamps, ids - QWEN3_TIMESTAMP, -1).cummax(0).values  # the step of the last timestamp
        slots = (inputs["mm_token_type_ids"][row] > 0).nonzero()[:, 0]
        units = tokens.origin[row, sequence.token[row, sequence.visual[row]]]
        assert (frame_at[slots] == torch.arange(steps * h * w // 4) // (h * w // 4)).all()  # the prompt's frames
        assert len(set(frame_at[slots[units]].tolist())) > 1 and units.tolist() != list(range(len(units)))
        keep = inputs["attention_mask"][row].bool() & (inputs["mm_token_type_ids"][row] == 0)
        keep[slots[units]] = True
        assert torch.equal(sequence.positions[row, sequence.valid[row]], positions[row, keep])


def test_attention_rows_go_through_q_norm_and_k_norm(fresh_qwen):
    """The rows a stage-3 method scores by, computed beside SDPA, are eager attention's: the layer's q_norm and k_norm
    applied to its projected queries and keys before RoPE; without them they are not."""
    from dataclasses import replace

    from slimvlm.attention import question_rows
    from slimvlm.hooks import capture_outputs

    model = fresh_qwen
    inputs = qwen_select(qwen_batch(model.config), 0)
    lm = model.model.language_model
    hidden = torch.randn(1, inputs["input_ids"].shape[1], lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    embeddings = lm.rotary_emb(hidden, rope_index(model, inputs))
    length = hidden.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
    with slimvlm.apply(model, "none") as handle:
        parts = handle.runtime.adapter.attention_parts(1)
    assert parts.q_norm is lm.layers[1].self_attn.q_norm and parts.k_norm is lm.layers[1].self_attn.k_norm
    implementation = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        with torch.no_grad(), capture_outputs(parts.q_proj, parts.k_proj) as (projected):
            _, weights = parts.module(hidden, position_embeddings=embeddings, attention_mask=causal)
    finally:
        lm.config._attn_implementation = implementation
    index = torch.tensor([[length - 3, length - 1]])
    valid = torch.ones(1, length, dtype=torch.bool)
    adapter = handle.runtime.adapter
    with torch.no_grad():
        rows = question_rows(adapter, parts, *projected, embeddings, index, valid)
        unnormed = question_rows(adapter, replace(parts, q_norm=None, k_norm=None), *projected, embeddings, index, valid)
    torch.testing.assert_close(rows, weights[:, :, index[0]], atol=1e-6, rtol=1e-5)
    assert (unnormed - rows).abs().max() > 1e-2


def test_remove_restores_the_model_exactly(fresh_qwen):
    """After methods of every stage ran (DeepStack's hooks, drops, generate()'s patches), remove() leaves the untouched
    model: its logits bit for bit, no forward, hook or generate() patch of slimvlm's."""
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind="video")
    with torch.no_grad():
        reference = model(**inputs).logits
        for spec in ("visionzip:dominant=8,contextual=2", "divprune:budget=10", "fastv:k=2,ratio=0.5"):
            handle = slimvlm.apply(model, spec)
            generate(model, inputs, static=False)
            generate(model, inputs, static=True)
            handle.remove()
        assert torch.equal(model(**inputs).logits, reference)
    assert not {"forward", "_expand_inputs_for_generation", "_prepare_position_ids_for_generation"} & set(model.__dict__)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "forward" not in module.__dict__


@pytest.fixture(scope="module")
def tiny_moe():
    model = qwen_model("qwen3_vl_moe")
    yield model
    remove_slimvlm(model)


@pytest.mark.parametrize("kind", KINDS)
def test_the_moe_class_runs_as_qwen3_vl(tiny_moe, kind):
    """Qwen3VLMoeForConditionalGeneration (the same but for the LM's experts): 'none' is the untouched model, logits
    and text; the methods of every stage run batched as one by one."""
    from test_qwen2_vl import assert_batched_equals_one_by_one

    model = tiny_moe
    inputs = qwen_batch(model.config, kind=kind)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**inputs).logits
        text = generate(model, inputs, static=False).sequences
        with slimvlm.apply(model, "none"):
            assert (model(**inputs).logits - reference)[valid].abs().max() < 1e-5
            assert torch.equal(generate(model, inputs, static=False).sequences, text)
        for spec in ("visionzip:dominant=8,contextual=2", "divprune:budget=10", "fastv:k=2,ratio=0.5"):
            with slimvlm.apply(model, spec) as handle:
                assert_batched_equals_one_by_one(model, handle, inputs)


def test_the_moe_router_logits_are_refused_by_name(tiny_moe):
    inputs = qwen_batch(tiny_moe.config)
    with torch.no_grad(), slimvlm.apply(tiny_moe, "none"):
        with pytest.raises(slimvlm.SlimVLMError, match="output_router_logits.*pass output_router_logits=False"):
            tiny_moe(**inputs, output_router_logits=True)


def test_qwen3_vl_8b_shape():
    """shape:qwen3-vl-8b is Qwen3-VL-8B-Instruct's shape: its 8.77B parameters; its 644-px bench images are 40 x 40
    patches of 16 px, 400 tokens; the FLOPs count the DeepStack mergers beside the merger."""
    from slimvlm.bench.flops import projector_flops, shapes
    from slimvlm.bench.shapes import MODEL_CLASSES, shape_config
    from slimvlm.models import adapter_for

    config = shape_config("qwen3-vl-8b")
    with torch.device("meta"):
        model = MODEL_CLASSES[type(config)]._from_config(config)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.77
    tensors, span = adapter_for(model).synthetic_images(1, torch.Generator().manual_seed(0))
    assert span == 400 and tensors["image_grid_thw"].tolist() == [[1, 40, 40]]
    vision, llm = shapes(config)
    assert (vision.projectors, vision.mlp_matrices, llm.head_dim) == (4, 2, 128)
    one_merger = 400 * (2 * 4 * 1152 * 4608 + 2 * 4608 * 4096)
    assert projector_flops(vision, llm, 400) == 4 * one_merger
