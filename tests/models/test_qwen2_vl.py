"""Qwen2-VL and Qwen2.5-VL (M-RoPE, dynamic resolution) on tiny random models of the real classes, with
images and with videos: the no-op is exact, every method runs with generate() (dynamic and static cache,
batched as one by one) or is refused, the kept tokens sit at their own 3D positions, and the stats keep the
methods' promises."""

import pytest
import torch

import slimvlm
from conftest import QWEN_GRIDS, QWEN_KINDS, QWEN_VIDEO_GRIDS, qwen_batch, qwen_model, qwen_prompts, qwen_select
from slimvlm.models.qwen2_vl import equal_segments
from slimvlm.registry import methods

TOKENS = [t * h * w // 4 for t, h, w in QWEN_GRIDS]  # 24 and 16
assert TOKENS == [t * h * w // 4 for t, h, w in QWEN_VIDEO_GRIDS]  # videos of as many: every expectation holds for both
KINDS = sorted(QWEN_KINDS)

# every registered method that runs on Qwen, with settings that reduce something on 24- and 16-token images
RUNS = {
    "none": "none",
    "random": "random:budget=10",
    "uniform": "uniform:ratio=0.5",
    "divprune": "divprune:budget=10",
    "fastv": "fastv:k=2,ratio=0.5",
    "mustdrop": "mustdrop:lsm=false,important=false,global_thr=0.05,individual_thr=0.05,layers=0;1",
    "visionzip": "visionzip:dominant=8,contextual=2",
}
REFUSED = {
    "tome": ("tome:r=2", "acts inside the vision encoder"),
    "dymu": ("dymu:target=10", "acts inside the vision encoder"),
    "pool": ("pool:budget=4", "one square patch grid per image.*use uniform"),
    "llava-mini": ("llava-mini:budget=4", "one square patch grid per image.*use uniform"),
    "vtu": ("vtu", "unmerges the tokens a stage-1 method merged"),
}


def generate(model, inputs, static: bool, new_tokens: int = 5):
    extra = {"cache_implementation": "static"} if static else {}
    return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **extra)


def rope_index(model, inputs):
    """The untouched prompt's M-RoPE positions (3, B, L), as the model computes them."""
    grids = {name: inputs[name] for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if name in inputs}
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              attention_mask=inputs["attention_mask"], **grids)
    return positions


def test_every_method_is_covered():
    assert set(RUNS) | set(REFUSED) == set(methods())


@pytest.mark.parametrize("kind", KINDS)
def test_none_gives_the_untouched_logits(fresh_qwen, kind):
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind=kind)
    assert inputs["attention_mask"][:, 0].tolist() == [1, 0]  # left padding, items of 24 and 16 tokens
    with torch.no_grad():
        reference = model(**inputs)
        with slimvlm.apply(model, "none") as handle:
            output = model(**inputs)
            assert handle.stats.visual_tokens == TOKENS
    assert type(output) is type(reference)
    valid = inputs["attention_mask"].bool()
    assert (output.logits - reference.logits)[valid].abs().max().item() < 1e-5
    if hasattr(reference, "image_outputs"):  # transformers 5.17's Qwen output classes carry no visual tokens
        assert output.image_outputs is None if kind == "video" else reference.image_outputs is not None
        assert [t.shape[0] for t in getattr(output, f"{kind}_outputs").pooler_output] == TOKENS


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("kind", KINDS)
def test_none_generates_the_untouched_text(fresh_qwen, kind, static):
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind=kind)
    with torch.no_grad():
        reference = generate(model, inputs, static)
        with slimvlm.apply(model, "none"):
            output = generate(model, inputs, static)
    assert torch.equal(output.sequences, reference.sequences)
    for ours, theirs in zip(output.scores, reference.scores):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_a_videos_temporal_positions_run_past_the_text_after_it(fresh_qwen):
    """So decoding goes on from the prompt's last token, not one past its largest position: the test above checks
    it on such a video."""
    positions = rope_index(fresh_qwen, qwen_batch(fresh_qwen.config, kind="video"))[:, 0]
    assert positions.amax() > positions[:, -1].max()


@pytest.mark.parametrize("kind", KINDS)
def test_positions_need_no_mm_token_type_ids(fresh_qwen, kind):
    """slimvlm derives the placeholders' 3D positions from input_ids (the untouched model needs
    mm_token_type_ids for them: Qwen2-VL fails without, Qwen2.5-VL falls back to 1-D positions)."""
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind=kind)
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        reference = model(**inputs).logits
        with slimvlm.apply(model, "none"):
            logits = model(**without).logits
    valid = inputs["attention_mask"].bool()
    assert (logits - reference)[valid].abs().max().item() < 1e-5


def assert_batched_equals_one_by_one(model, handle, inputs, new: int = 5) -> list[int]:
    """A batch's last logits, greedy tokens (dynamic and static cache) and items' token counts are each prompt's
    alone (whose greedy tokens are the same on both caches); returns the batch's counts."""
    batched = model(**inputs).logits[:, -1]
    counts = handle.stats.visual_tokens
    generated = generate(model, inputs, static=False, new_tokens=new).sequences[:, -new:]
    assert torch.equal(generate(model, inputs, static=True, new_tokens=new).sequences[:, -new:], generated)
    items = 0
    for index in range(len(batched)):
        single = qwen_select(inputs, index)
        torch.testing.assert_close(model(**single).logits[0, -1], batched[index], atol=1e-5, rtol=1e-5)
        own = handle.stats.visual_tokens
        assert own == counts[items : items + len(own)]
        items += len(own)
        alone = generate(model, single, static=False, new_tokens=new).sequences[0, -new:]
        assert alone.tolist() == generated[index].tolist()
        # and alone on a static cache
        assert generate(model, single, static=True, new_tokens=new).sequences[0, -new:].tolist() == alone.tolist()
    assert items == len(counts)
    return counts


@pytest.mark.parametrize("name", sorted(RUNS))
@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_one_by_one(fresh_qwen, kind, name):
    model = fresh_qwen
    with torch.no_grad(), slimvlm.apply(model, RUNS[name]) as handle:
        counts = assert_batched_equals_one_by_one(model, handle, qwen_batch(model.config, kind=kind))
    assert all(0 < count <= tokens for count, tokens in zip(counts, TOKENS))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_cannot_act_on_qwen_is_refused_with_the_fix(fresh_qwen, name):
    spec, message = REFUSED[name]
    with pytest.raises(slimvlm.SlimVLMError, match=message):
        slimvlm.apply(fresh_qwen, spec)
    assert "forward" not in fresh_qwen.__dict__


def test_mustdrop_asks_for_its_llm_parts_alone(fresh_qwen):
    with pytest.raises(slimvlm.SlimVLMError, match="mustdrop:lsm=false,important=false"):
        slimvlm.apply(fresh_qwen, "mustdrop-llava7b-64")


@pytest.mark.parametrize("spec, expected", [
    ("divprune:budget=10", [10, 10]),
    ("random:budget=10", [10, 10]),
    ("uniform:ratio=0.5", [12, 8]),
    ("divprune:ratio=1", TOKENS),
])
@pytest.mark.parametrize("kind", KINDS)
def test_stage_2_keeps_its_budget_of_each_item(fresh_qwen, kind, spec, expected):
    model = fresh_qwen
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        model(**qwen_batch(model.config, kind=kind))
    assert handle.stats.visual_tokens == expected
    assert [layers for layers in handle.stats.kv_visual_entries] == [[count] * 4 for count in expected]
    assert handle.stats.projector_tokens == TOKENS  # stage 2 selects after the merger
    assert [sum(s >= 0 for s in sources) for sources in handle.stats.sources] == expected


def test_a_videos_vision_stats_count_its_frames(fresh_qwen):
    """Per ViT block, the patches of each attention segment: a video's are its frames (here, 2.5's windows are
    as large), 12 of 2 x 4 patches, then 4 of 4 x 4."""
    model = fresh_qwen
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=10") as handle:
        model(**qwen_batch(model.config, kind="video"))
    assert handle.stats.vision_tokens == [[8] * 12 + [16] * 4] * len(model.model.visual.blocks)
    assert [len(sources) for sources in handle.stats.sources] == [24, 24]  # per video, its 2 x 2 units (-1 past its own)


@pytest.mark.parametrize("kind", KINDS)
def test_a_budget_over_an_items_tokens_is_refused(fresh_qwen, kind):
    model = fresh_qwen
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=20"):
        with pytest.raises(slimvlm.SlimVLMError, match="larger than the 16 tokens of a visual item"):
            model(**qwen_batch(model.config, kind=kind))


@pytest.mark.parametrize("kind", KINDS)
def test_fastv_drops_its_ratio_of_each_items_tokens(fresh_qwen, kind):
    model = fresh_qwen
    with torch.no_grad(), slimvlm.apply(model, "fastv:k=2,ratio=0.5") as handle:
        model(**qwen_batch(model.config, kind=kind))
    assert handle.stats.kv_visual_entries == [[n, n, n // 2, n // 2] for n in TOKENS]


@pytest.mark.parametrize("kind", KINDS)
def test_kept_tokens_sit_at_their_own_3d_positions(fresh_qwen, kind):
    """A reduced prompt, by hand: the untouched prompt's embeddings and M-RoPE positions (get_rope_index) at
    the kept tokens, through the LM (no slimvlm); the next token continues one past the prompt's last token on
    every axis, as generate() continues the untouched prompt."""
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind=kind)
    inner = model.model
    pixels, grids, type_id = QWEN_KINDS[kind]
    with torch.no_grad():
        with slimvlm.apply(model, "random:budget=10") as handle:
            logits = model(**inputs).logits
            scores = generate(model, inputs, static=False, new_tokens=2)
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        encoder = inner.get_image_features if kind == "image" else inner.get_video_features
        features = torch.cat(encoder(inputs[pixels], inputs[grids]).pooler_output)
        placeholder = inputs["mm_token_type_ids"] == type_id
        embeds = embeds.masked_scatter(placeholder[..., None], features)
        positions = rope_index(model, inputs)
        kept = torch.zeros_like(placeholder)
        for row, sources in enumerate(handle.stats.sources):
            kept[row, placeholder[row].nonzero()[:, 0][torch.tensor(sources[: TOKENS[row]]) >= 0]] = True
        keep = inputs["attention_mask"].bool() & (~placeholder | kept)
        width = int(keep.sum(1).max())
        for row in range(2):
            index = keep[row].nonzero()[:, 0]
            pad = width - len(index)
            mask = torch.tensor([[0] * pad + [1] * len(index)])
            select = torch.cat([index.new_zeros(pad), index])
            position = positions[:, row : row + 1, select].masked_fill(mask == 0, 0)
            hidden = inner.language_model(inputs_embeds=embeds[row : row + 1, select], attention_mask=mask,
                                          position_ids=position).last_hidden_state
            expected = model.lm_head(hidden[0, -1])
            assert (logits[row, -1] - expected).abs().max().item() < 1e-4
            # decoding: the first new token one past the prompt's last token, on every axis
            token = scores.sequences[row : row + 1, inputs["input_ids"].shape[1]]
            hidden = inner.language_model(
                inputs_embeds=torch.cat([embeds[row : row + 1, select], inner.get_input_embeddings()(token[None])], 1),
                attention_mask=torch.cat([mask, mask.new_ones(1, 1)], 1),
                position_ids=torch.cat([position, position[:, :, -1:] + 1], 2)).last_hidden_state
            assert (scores.scores[1][row] - model.lm_head(hidden[0, -1])).abs().max().item() < 1e-4


def test_renumbering_is_refused(fresh_qwen):
    with pytest.raises(slimvlm.SlimVLMError, match="keep_positions=False renumbers visual tokens"):
        slimvlm.apply(fresh_qwen, "divprune:budget=10", keep_positions=False)
    with slimvlm.apply(fresh_qwen, "divprune:budget=10", keep_positions=True) as handle:
        assert handle.runtime.keep_positions


def test_bad_inputs_are_named(fresh_qwen):
    model = fresh_qwen
    inputs = qwen_batch(model.config)
    with torch.no_grad(), slimvlm.apply(model, "none"):
        with pytest.raises(slimvlm.SlimVLMError, match="pass image_grid_thw"):
            model(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
        with pytest.raises(slimvlm.SlimVLMError, match=r"prompt 0 has 24 image placeholder tokens, not those of whole "
                                                       r"images: by image_grid_thw the images take 16, 24"):
            model(**{**inputs, "image_grid_thw": inputs["image_grid_thw"].flip(0)})
        with pytest.raises(slimvlm.SlimVLMError, match=r"do not hold the patches image_grid_thw"):
            model(**{**inputs, "pixel_values": inputs["pixel_values"][:-4]})
        with pytest.raises(slimvlm.SlimVLMError, match="do not mark exactly the image and video placeholders"):
            model(**{**inputs, "mm_token_type_ids": inputs["mm_token_type_ids"] * 2})  # 2: video
        with pytest.raises(slimvlm.SlimVLMError, match="pass input_ids"):
            model(inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]), pixel_values=inputs["pixel_values"],
                  image_grid_thw=inputs["image_grid_thw"])


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_are_named_before_generate_computes_positions(fresh_qwen, kind):
    """generate() computes M-RoPE positions (transformers' get_rope_index) before the first forward: the same bad
    inputs fail there with slimvlm's errors, not a shape mismatch or a bare StopIteration."""
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind=kind)
    grid = "image_grid_thw" if kind == "image" else "video_grid_thw"
    placeholder = int((inputs["mm_token_type_ids"][0] > 0).nonzero()[0])
    one_fewer = {name: torch.cat([value[:, :placeholder], value[:, placeholder + 1 :]], dim=1)
                 for name, value in inputs.items() if name in ("input_ids", "attention_mask", "mm_token_type_ids")}
    bad = [({**inputs, grid: inputs[grid].flip(0)}, "not those of whole"),  # grids in the other order
           ({**inputs, grid: inputs[grid][:1].repeat(2, 1)}, "not those of whole|do not hold the patches"),
           ({**inputs, **one_fewer}, "not those of whole")]  # a placeholder missing
    if "second_per_grid_ts" in inputs:
        bad.append(({**inputs, "second_per_grid_ts": inputs["second_per_grid_ts"][:1]}, "second_per_grid_ts gives 1 value"))
    with torch.no_grad(), slimvlm.apply(model, "none"):
        for given, message in bad:
            with pytest.raises(slimvlm.SlimVLMError, match=message):
                model.generate(**given, max_new_tokens=1, do_sample=False)


def test_bad_video_inputs_are_named(fresh_qwen):
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind="video")
    with torch.no_grad(), slimvlm.apply(model, "none"):
        with pytest.raises(slimvlm.SlimVLMError, match="pass video_grid_thw"):
            model(**{k: v for k, v in inputs.items() if k != "video_grid_thw"})
        with pytest.raises(slimvlm.SlimVLMError, match=r"prompt 0 has 24 video placeholder tokens, not those of whole "
                                                       r"videos: by video_grid_thw the videos take 16, 24"):
            model(**{**inputs, "video_grid_thw": inputs["video_grid_thw"].flip(0)})
        with pytest.raises(slimvlm.SlimVLMError, match=r"pixel_values_videos of shape \(156, \d+\) do not hold the "
                                                       r"patches video_grid_thw"):
            model(**{**inputs, "pixel_values_videos": inputs["pixel_values_videos"][:-4]})
        if "second_per_grid_ts" in inputs:  # Qwen2.5-VL
            with pytest.raises(slimvlm.SlimVLMError, match="second_per_grid_ts gives 1 value"):
                model(**{**inputs, "second_per_grid_ts": inputs["second_per_grid_ts"][:1]})


@pytest.mark.parametrize("kind", KINDS)
def test_the_static_cache_continues_the_reduced_frame(kind):
    assert_the_static_cache_continues_the_reduced_frame(qwen_model("qwen2_5_vl", seed=1), kind)


def assert_the_static_cache_continues_the_reduced_frame(model, kind: str) -> None:
    """Cached decode steps on the reduced prompt equal recomputing it with each new token (no cache)."""
    inputs = qwen_batch(model.config, seed=1, kind=kind)
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=6"):
        cached = generate(model, inputs, static=True, new_tokens=4)
        for step in range(1, 4):
            longer = cached.sequences[:, : inputs["input_ids"].shape[1] + step]
            extended = {**inputs, "input_ids": longer,
                        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, step, dtype=torch.long)], 1)}
            del extended["mm_token_type_ids"]
            logits = model(**extended, use_cache=False).logits[:, -1]
            assert torch.allclose(logits.to(cached.scores[step].dtype), cached.scores[step], atol=1e-4)  # float32 scores


@pytest.mark.parametrize("options", [dict(num_beams=2), dict(do_sample=True, top_k=5, num_return_sequences=2)],
                         ids=["beams", "sampled sequences"])
@pytest.mark.parametrize("kind", KINDS)
def test_generate_modes_that_repeat_the_prompt(fresh_qwen, kind, options):
    """generate() repeats each prompt per beam or sequence; Qwen's packed patches repeat per prompt as a whole
    (transformers 5.25 would repeat each patch row), so 'none' is the untouched model and a batch is its prompts."""
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind=kind)
    with torch.no_grad():
        torch.manual_seed(0)
        reference = model.generate(**inputs, max_new_tokens=4, **options)
        with slimvlm.apply(model, "none"):
            torch.manual_seed(0)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, **options), reference)
        if "num_beams" in options:
            with slimvlm.apply(model, "divprune:budget=6"):
                batched = model.generate(**inputs, max_new_tokens=4, **options)[:, -4:]
                for index in range(2):
                    alone = model.generate(**qwen_select(inputs, index), max_new_tokens=4, **options)[0, -4:]
                    assert alone.tolist() == batched[index].tolist()
    assert "_expand_inputs_for_generation" not in model.__dict__  # remove() restored generate's own


MIXED = [[("image", (1, 8, 12)), ("video", (4, 4, 4))], [("video", (12, 2, 4)), ("image", (1, 8, 8))]]


def test_images_and_videos_in_one_prompt(fresh_qwen):
    """Each item, image or video, is a unit of its own in prompt order: 'none' is the untouched model (logits,
    each kind's outputs, generate), and divprune keeps its budget of each item, batched as one by one."""
    model = fresh_qwen
    inputs = qwen_prompts(model.config, MIXED)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**inputs)
        untouched = generate(model, inputs, static=False).sequences
        with slimvlm.apply(model, "none") as handle:
            output = model(**inputs)
            assert handle.stats.visual_tokens == [24, 16, 24, 16]  # prompt order: image, video; video, image
            assert torch.equal(generate(model, inputs, static=False).sequences, untouched)
        assert (output.logits - reference.logits)[valid].abs().max().item() < 1e-5
        if hasattr(reference, "image_outputs"):  # each kind's items in its own order, as the untouched model has them
            assert [len(t) for t in output.image_outputs.pooler_output] == [24, 16]
            assert [len(t) for t in output.video_outputs.pooler_output] == [16, 24]
        with slimvlm.apply(model, "divprune:budget=10") as handle:
            assert assert_batched_equals_one_by_one(model, handle, inputs) == [10] * 4


def test_an_item_split_by_another_is_refused(fresh_qwen):
    """The rebuild puts each item's tokens in one run of placeholders, as the processor writes them."""
    config = fresh_qwen.config
    inputs = qwen_prompts(config, MIXED[:1])
    image, video = [config.image_token_id] * 12, [config.video_token_id] * 16
    input_ids = torch.tensor([[5, config.vision_start_token_id, *image, *video, *image, config.vision_end_token_id, 6]])
    split = {**inputs, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    del split["mm_token_type_ids"]
    with torch.no_grad(), slimvlm.apply(fresh_qwen, "none"):
        with pytest.raises(slimvlm.SlimVLMError, match="a run of image placeholders is not whole images'.*must be one run"):
            fresh_qwen(**split)


def reference_received(model, inputs, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand, the untouched tower: the last block's softmax attention within each image (transformers' own
    rotary), mean over heads, summed over queries, mean over each 2 x 2 unit, units back in raster order; and
    the unit's rotated keys' mean. What VisionZip's Qwen2.5-VL port scores by."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    pixels, grids, _ = QWEN_KINDS[kind]
    visual = model.model.visual
    attn = visual.blocks[-1].attn
    seen = {}
    handle = attn.register_forward_pre_hook(lambda _m, args, kwargs: seen.update(x=args[0], **kwargs), with_kwargs=True)
    with torch.no_grad():
        model.model.get_image_features(inputs[pixels], inputs[grids])
    handle.remove()
    n, heads = seen["x"].shape[0], attn.num_heads
    q, k, _ = attn.qkv(seen["x"]).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["position_embeddings"])
    scores = torch.zeros(n)
    bounds = seen["cu_seqlens"].tolist()
    for begin, end in zip(bounds[:-1], bounds[1:]):
        logits = torch.einsum("qhd,khd->hqk", q[begin:end], k[begin:end]) / q.shape[-1] ** 0.5
        scores[begin:end] = logits.softmax(-1).mean(0).sum(0)
    scores, keys = scores.view(-1, 4).mean(1), k.reshape(-1, 4, heads, k.shape[-1]).mean(1)
    if hasattr(visual, "fullatt_block_indexes"):
        from transformers.vision_utils import get_vision_window_index

        window, _ = get_vision_window_index(inputs[grids], 2, visual.window_size, visual.patch_size)
        scores, keys = scores[window.argsort()], keys[window.argsort()]
    return scores, keys


def test_visionzip_scores_runs_ofequal_segments_together():
    # cu_seqlens of three segments of 4 patches (frames of a video), three of 6, then one of 4 (an image)
    bounds = [0, 4, 8, 12, 18, 24, 30, 34]
    assert equal_segments(bounds, 2) == [(0, 4, 2), (8, 4, 1), (12, 6, 2), (24, 6, 1), (30, 4, 1)]
    assert equal_segments(bounds, 8) == [(0, 4, 3), (12, 6, 3), (30, 4, 1)]


@pytest.mark.parametrize("kind", KINDS)
def test_visionzip_keeps_the_units_the_last_block_attends_most(fresh_qwen, kind):
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind=kind)
    scores, keys = reference_received(model, inputs, kind)
    with torch.no_grad(), slimvlm.apply(model, "visionzip:dominant=8,contextual=2") as handle:
        adapter = handle.runtime.adapter
        pixels = adapter.views(*adapter.visual_inputs(inputs), False)
        last = adapter.visual.blocks[-1].attn
        seen = {}
        hook = last.register_forward_pre_hook(lambda _m, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
        adapter.inner.get_image_features(pixels, torch.tensor(adapter.grids))
        hook.remove()
        received, unit_keys = adapter._merged_attention(last, seen["args"][0], seen["kwargs"], torch.tensor(adapter.grids))
        tokens, _ = adapter.encode(pixels, handle.methods[0])
    torch.testing.assert_close(received, scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unit_keys, keys, atol=1e-5, rtol=1e-5)
    start = 0
    for item, count in enumerate(TOKENS):
        own = scores[start : start + count]
        sources = tokens.patch_to_token[item, :count]
        alone = [unit for unit in range(count) if (sources == sources[unit]).sum() == 1]
        assert set(own.topk(8).indices.tolist()) <= set(alone)  # the 8 most attended are kept as they are
        origins = tokens.origin[item, :10]
        assert origins.tolist() == sorted(origins.tolist())  # contextual tokens at their targets' places
        assert all(sources[origin] == token for token, origin in enumerate(origins.tolist()))
        start += count



def by_the_methods_rules(values: torch.Tensor, sources: list[int], origins: list[int]) -> torch.Tensor:
    """An item's tokens from its units' values (U, ...), by hand: a token of one unit is that unit's; one of several
    (VisionZip's contextual token) is its target's (the unit it sits at: its origin) plus the mean of the others'."""
    out = []
    for token, origin in enumerate(origins):
        others = [unit for unit, source in enumerate(sources) if source == token and unit != origin]
        out.append(values[origin] + (values[others].mean(0) if others else 0))
    return torch.stack(out)


@pytest.mark.parametrize("kind", KINDS)
def test_visionzip_features_sit_at_their_tokens_places(fresh_qwen, kind):
    """Each token VisionZip keeps has its unit's merger output, each contextual token its target's plus the mean of
    the others joining it, wherever the contextual tokens fall among the dominant ones (at their targets' places)."""
    model = fresh_qwen
    inputs = qwen_batch(model.config, kind=kind)
    pixels, grids, _ = QWEN_KINDS[kind]
    with torch.no_grad():
        merged = torch.cat(model.model.get_image_features(inputs[pixels], inputs[grids]).pooler_output)
        with slimvlm.apply(model, "visionzip:dominant=6,contextual=2") as handle:
            model(**inputs)
            tokens = handle.runtime.session.tokens
    merging = tokens.size[:, :-1] > 1
    assert (merging & (tokens.size[:, 1:] == 1)).any()  # a contextual token before a dominant one
    start = 0
    for item, count in enumerate(TOKENS):
        kept = tokens.host_counts()[item]
        expected = by_the_methods_rules(merged[start : start + count], handle.stats.sources[item][:count],
                                        tokens.origin[item, :kept].tolist())
        torch.testing.assert_close(tokens.x[item, :kept], expected, atol=1e-6, rtol=1e-6)
        start += count


def test_visionzip_stats_count_the_merger_on_every_unit(fresh_qwen):
    with torch.no_grad(), slimvlm.apply(fresh_qwen, "visionzip:dominant=8,contextual=2") as handle:
        fresh_qwen(**qwen_batch(fresh_qwen.config))
    assert handle.stats.visual_tokens == [10, 10] and handle.stats.projector_tokens == TOKENS


def test_synthetic_videos_run_as_the_untouched_model(fresh_qwen):
    """The benchmark's videos (--video-frames): frames in pairs, 644-px frames (23 x 23 tokens per pair of 14-px
    patches; 20 x 20 of 16-px ones, Qwen3-VL's)."""
    from slimvlm.bench.run import synthetic_inputs
    from slimvlm.models.qwen2_vl import SYNTHETIC_SIDE

    inputs = synthetic_inputs(fresh_qwen, 1, 8, video_frames=4)
    with torch.no_grad():
        reference = fresh_qwen(**inputs).logits
        with slimvlm.apply(fresh_qwen, "none") as handle:
            assert torch.equal(fresh_qwen(**inputs).logits, reference)
    side = SYNTHETIC_SIDE // fresh_qwen.config.vision_config.patch_size // 2
    assert handle.stats.visual_tokens == [2 * side * side]
    with pytest.raises(slimvlm.SlimVLMError, match="takes frames in pairs"):
        synthetic_inputs(fresh_qwen, 1, 8, video_frames=3)


def test_visionzip_takes_fractions_of_each_items_tokens(fresh_qwen):
    """dominant_ratio / contextual_ratio, as the authors' Qwen2.5-VL port sets its budgets: int(0.45 N) dominant
    and max(int(0.05 N), 1) contextual tokens of each item of N tokens (24 and 16)."""
    with torch.no_grad(), slimvlm.apply(fresh_qwen, "visionzip:dominant_ratio=0.45,contextual_ratio=0.05") as handle:
        fresh_qwen(**qwen_batch(fresh_qwen.config))
    assert handle.stats.visual_tokens == [int(0.45 * 24) + 1, int(0.45 * 16) + 1]
    with pytest.raises(slimvlm.SlimVLMError, match="sum to at most 1"):
        slimvlm.apply(fresh_qwen, "visionzip:dominant_ratio=0.9,contextual_ratio=0.2")


def test_bench_generate_leaves_out_the_default_runs_qwen_refuses(tmp_path, capsys):
    """The default --methods are for LLaVA-1.5: on Qwen, tome and llava-mini are left out and named; a list the user
    gives is taken whole."""
    import json

    from slimvlm.cli import main

    folder = tmp_path / "qwen"
    qwen_model("qwen2_5_vl").save_pretrained(folder)
    out = tmp_path / "generate.json"
    assert main(["bench-generate", "--model", str(folder), "--batch-sizes", "1", "--paths", "eager", "--new-tokens", "2",
                 "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)]) == 0
    assert "refused by this model: tome:r=16" in capsys.readouterr().out
    assert [r["method"] for r in json.loads(out.read_text())["results"]] == ["untouched", "none", "visionzip-64", "divprune-64",
                                                                         "untouched, again"]
    assert main(["bench-generate", "--model", str(folder), "--methods", "tome:r=16", "--batch-sizes", "1",
                 "--device", "cpu"]) != 0


def test_a_float_grid_is_refused_by_name(fresh_qwen):
    model = fresh_qwen
    inputs = qwen_batch(model.config)
    with torch.no_grad(), slimvlm.apply(model, "none"):
        with pytest.raises(slimvlm.SlimVLMError, match="image_grid_thw must be whole numbers.*not a torch.float32 tensor"):
            model(**{**inputs, "image_grid_thw": inputs["image_grid_thw"].float()})
        with pytest.raises(slimvlm.SlimVLMError, match="image_grid_thw must be whole numbers"):
            model.generate(**{**inputs, "image_grid_thw": inputs["image_grid_thw"].float()}, max_new_tokens=1)
