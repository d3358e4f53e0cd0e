"""Gemma 3 (SigLIP, a projector that pools each image's patches, an LM of sliding-window and global layers whose image
tokens attend to each other both ways) on a tiny random Gemma3ForConditionalGeneration: the no-op is exact (logits
with and without token_type_ids, text, left padding, two images in a prompt), remove() restores the model, every
method runs batched as one by one or is refused with the reason; then what is Gemma 3's own: the two-way block of an
image's kept tokens (against the model's own masks on the reduced prompt), merged patches unmerged before the
pooling, per-image budgets, VisionZip on the pooled tokens and MustDrop's important set on them, FastV on the
sliding-window layers (against FastV by hand: prefill, decode step, follow-up turn), slimvlm's static cache (the
untouched model's tokens and logits under `none`, the dynamic path's under every method, its window crossed before and
during decoding, compiled as one graph, no host read a step), and shape:gemma-3-12b"""

import json

import pytest
import torch

import slimvlm
from conftest import (GEMMA3_IDS, GEMMA3_TOKENS, assert_remove_restores, assert_visual_tokens, gemma3_batch, gemma3_model,
                      gemma3_select, remove_slimvlm, visual_tokens_out)
from slimvlm.errors import SlimVLMError
from slimvlm.methods.dymu import DyMU, calibrate_dymu
from slimvlm.registry import methods

IMAGE = GEMMA3_IDS["image_token_index"]
RUNS = {
    "none": "none",
    "random": "random:budget=6",
    "uniform": "uniform:ratio=0.25",
    "divprune": "divprune:budget=6",
    "pool": "pool:budget=4",
    "tome": "tome:r=8",
    "dymu": "dymu:vtu=false",
    "fastv": "fastv:k=2,ratio=0.5",
    "visionzip": "visionzip:dominant=5,contextual=2",
    "mustdrop": "mustdrop:global_thr=0.05,individual_thr=0.05,layers=0;1,output_cache=false",
}
REFUSED = {
    "mustdrop": ("mustdrop:lsm=false,important=false,layers=0;1",
                 "mustdrop cuts each LLM layer's KV cache after prefill .stage 4.*sliding-window layers keep only their "
                 "window's entries.*mustdrop:output_cache=false"),
    "vtu": (["tome:r=8", "vtu"], "vtu unmerges in the LLM.*undone before the projector's pooling.*nothing stays merged"),
    "llava-mini": ("llava-mini:budget=4", "llava-mini's modules are laid out.*projector's pooling joins each block"),
}


@pytest.fixture(scope="module")
def thresholds(tiny_gemma3):
    side = tiny_gemma3.config.vision_config.image_size
    crops = torch.randn(16, 3, side, side, generator=torch.Generator().manual_seed(0))
    return calibrate_dymu(tiny_gemma3, [crops], target=40, batch_size=16, progress=False)


def generate(model, inputs: dict, new: int = 5, **options):
    """Greedy generation of `new` tokens (the tiny model may end a prompt at once), with each step's scores and
    logits (before min_new_tokens masks the end token)."""
    return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_scores=True,
                          output_logits=True, return_dict_in_generate=True, **options)


def spec_of(name: str, thresholds):
    return DyMU(thresholds=thresholds, vtu=False) if name == "dymu" else RUNS[name]


def test_every_method_is_covered():
    assert set(RUNS) | set(REFUSED) == set(methods())


@pytest.mark.parametrize("images", [(1, 1), (2, 1)])
def test_none_gives_the_untouched_logits_and_text(fresh_gemma3, images):
    """Left padding, prompts longer than the window, with token_type_ids (each image's run two-way) and without (the
    model's plain causal masks, whose logits differ: the test sees which mask ran); (2, 1): two images in a prompt."""
    model = fresh_gemma3
    inputs = gemma3_batch(images)
    causal = {name: value for name, value in inputs.items() if name != "token_type_ids"}
    assert not inputs["attention_mask"].all() and inputs["input_ids"].shape[1] > 8  # left padding, past the window
    with torch.no_grad():
        reference, untyped = model(**inputs).logits, model(**causal).logits
        text = generate(model, inputs).sequences
        with slimvlm.apply(model, "none") as handle:
            out = model(**inputs)
            assert type(out).__name__ == "Gemma3CausalLMOutputWithPast"
            assert_visual_tokens(out, [GEMMA3_TOKENS] * sum(images))
            assert handle.stats.visual_tokens == [GEMMA3_TOKENS] * sum(images)
            assert torch.equal(generate(model, inputs).sequences, text)
            plain = model(**causal).logits
    valid = inputs["attention_mask"].bool()
    assert (reference - untyped)[valid].abs().max() > 1e-2  # the two-way block changes the logits
    assert (out.logits - reference)[valid].abs().max() < 1e-5
    assert (plain - untyped)[valid].abs().max() < 1e-5


def test_remove_restores_the_model_exactly(fresh_gemma3, thresholds):
    """After methods of stages 1-3 ran (generate() too, on the dynamic and the static cache), remove() leaves the
    untouched model: its logits bit for bit, no forward of slimvlm's, only the hooks the model had."""
    model = fresh_gemma3
    inputs = gemma3_batch()
    specs = ("tome:r=8", "divprune:budget=6", "pool:budget=4", DyMU(thresholds=thresholds, vtu=False),
             "fastv:k=2,ratio=0.5")

    def run():
        generate(model, inputs)
        generate(model, inputs, cache_implementation="static")

    assert_remove_restores(model, inputs, specs, run)


@pytest.fixture(scope="module")
def double_gemma3():
    """The tiny Gemma 3 in float64: in float32 the rounding that batching changes grows through the sharpened attention
    past 1e-4 on some decode step (MustDrop: 1.6e-4 on one step of five); in float64 nothing hides a real difference."""
    model = gemma3_model().double()
    yield model
    remove_slimvlm(model)


@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", sorted(RUNS))
def test_batched_equals_one_by_one(double_gemma3, thresholds, name, cache):
    """Greedy tokens equal and each step's logits within 1e-8, prompt by prompt, on two images in the first prompt
    and one in the second (left padding: the prompts' reduced lengths differ; the decode steps' masks are the views'),
    on the dynamic cache and on slimvlm's static one (whose slots a row's padding fills in part)."""
    model = double_gemma3
    images = (2, 1)
    inputs = gemma3_batch(images)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad(), slimvlm.apply(model, spec_of(name, thresholds)) as handle:
        batched = generate(model, inputs, **cache)
        counts = handle.stats.visual_tokens
        for index in range(len(images)):
            alone = generate(model, gemma3_select(inputs, index, images), **cache)
            first = sum(images[:index])
            assert handle.stats.visual_tokens == counts[first : first + images[index]]
            assert alone.sequences[0, -5:].tolist() == batched.sequences[index, -5:].tolist()
            for together, single in zip(batched.logits, alone.logits, strict=True):
                torch.testing.assert_close(together[index], single[0], atol=1e-8, rtol=1e-8)
    assert len(counts) == sum(images) and all(0 < count <= GEMMA3_TOKENS for count in counts)


@pytest.mark.parametrize("spec, expected", [("divprune:budget=6", 6), ("random:budget=3", 3), ("pool:budget=4", 4),
                                            ("uniform:ratio=0.25", 4), ("tome:r=8", GEMMA3_TOKENS)])
def test_budgets_are_per_image(fresh_gemma3, spec, expected):
    """Stage 2 keeps its budget of each image's 16 pooled tokens; stage 1 merges patches in the tower and the LLM
    still gets every image's 16 (the merges undone before the pooling)."""
    with torch.no_grad(), slimvlm.apply(fresh_gemma3, spec) as handle:
        fresh_gemma3(**gemma3_batch((2, 1)))
    assert handle.stats.visual_tokens == [expected] * 3
    assert handle.stats.projector_tokens == [GEMMA3_TOKENS] * 3


def test_a_kept_all_budget_is_the_untouched_model(fresh_gemma3):
    inputs = gemma3_batch((2, 1))
    with torch.no_grad():
        reference = fresh_gemma3(**inputs).logits
        with slimvlm.apply(fresh_gemma3, f"divprune:budget={GEMMA3_TOKENS}"):
            kept_all = fresh_gemma3(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert (kept_all - reference)[valid].abs().max() < 1e-5


@pytest.mark.parametrize("token_types", [True, False])
def test_an_images_kept_tokens_attend_both_ways_as_the_models_own(fresh_gemma3, token_types):
    """The reference is the model itself on the reduced prompt: 6 placeholders an image, their embeddings the tokens
    DivPrune kept (as the output carries them), through the model's own masks (two-way within each image's run with
    token_type_ids, causal without); two images in the prompt, so two blocks."""
    model = fresh_gemma3
    inputs = gemma3_select(gemma3_batch((2, 1), token_types=token_types), 0, (2, 1))
    with torch.no_grad():
        with slimvlm.apply(model, "divprune:budget=6"):
            out = model(**inputs)
        kept = visual_tokens_out(out)
        ids = inputs["input_ids"][0].tolist()
        at = ids.index(IMAGE)
        second = ids.index(IMAGE, at + GEMMA3_TOKENS)
        reduced = torch.tensor([ids[:at] + [IMAGE] * 6 + ids[at + GEMMA3_TOKENS : second] + [IMAGE] * 6
                                + ids[second + GEMMA3_TOKENS :]])
        embeds = model.get_input_embeddings()(reduced)
        embeds[reduced == IMAGE] = torch.cat(kept)
        typed = {"token_type_ids": (reduced == IMAGE).long()} if token_types else {}
        reference = model(inputs_embeds=embeds, attention_mask=torch.ones_like(reduced), **typed).logits
        other = model(inputs_embeds=embeds, attention_mask=torch.ones_like(reduced),
                      **({} if token_types else {"token_type_ids": (reduced == IMAGE).long()})).logits
    assert [len(tokens) for tokens in kept] == [6, 6] and reduced.shape[1] == out.logits.shape[1]
    assert (out.logits - reference).abs().max() < 1e-5
    assert (out.logits - other).abs().max() > 1e-2  # the other mask would show


def test_merged_patches_are_unmerged_before_the_pooling(tiny_gemma3):
    """By hand, on one image: patches 0 and 9 (both in pooled token 0: patches 0, 1, 8, 9) merged into one token, and
    patch 4 with 3 (pooled tokens 1 and 2). The projector gets each patch with its token's features: the model's own
    pooling and projection of the patches so replaced."""
    from slimvlm.models.gemma3 import Gemma3Adapter
    from slimvlm.tokens import VisualTokens

    adapter = Gemma3Adapter(tiny_gemma3)
    features = torch.randn(1, 64, tiny_gemma3.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(1))
    assign = torch.tensor([[0, 1, 2, 3, 3] + list(range(4, 8)) + [0] + list(range(8, 62))])
    merged = VisualTokens.from_patches(features, (8, 8), has_cls=False).regroup(assign, 62)
    replaced = features.clone()
    replaced[0, [0, 9]] = features[0, [0, 9]].mean(dim=0)
    replaced[0, [3, 4]] = features[0, [3, 4]].mean(dim=0)
    projector, norm = tiny_gemma3.model.multi_modal_projector, adapter.vision.post_layernorm
    with torch.no_grad():
        ours = adapter.project(merged).x
        model, untouched = projector(norm(replaced)), projector(norm(features))
    torch.testing.assert_close(ours, model, atol=1e-5, rtol=1e-5)
    assert (ours - untouched)[0, :3].abs().amax(dim=-1).min() > 1e-4  # pooled tokens 0, 1, 2 changed
    torch.testing.assert_close(ours[0, 3:], untouched[0, 3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_cannot_act_on_gemma3_is_refused_with_the_reason(fresh_gemma3, name):
    from slimvlm.registry import families_taking

    spec, says = REFUSED[name]
    with pytest.raises(SlimVLMError, match=says):
        slimvlm.apply(fresh_gemma3, spec)
    assert "forward" not in fresh_gemma3.__dict__
    assert "Gemma3" in families_taking(name)[1]  # `slimvlm methods` lists it as refused


def test_dymus_virtual_unmerging_is_refused_with_the_fix(fresh_gemma3, thresholds):
    with pytest.raises(SlimVLMError, match=r"dymu unmerges in the LLM.*dymu:vtu=false"):
        slimvlm.apply(fresh_gemma3, DyMU(thresholds=thresholds))


# ---- slimvlm's static cache on the sliding-window LM ---------------------------------------------------------------
@pytest.fixture(scope="module", params=[8, 32], ids=["prompts-past-the-window", "decoding-crosses-the-window"])
def windowed_gemma3(request):
    """The tiny Gemma 3 in float64 with a window of 8 (every prompt is longer) or 32 (the prompts, 25 and 27 tokens with
    an image each, fit in it, reduced or not; the tokens generated after them cross it)."""
    model = gemma3_model(window=request.param).double()
    yield model
    remove_slimvlm(model)


def windowed_batch(token_types: bool = True) -> dict:
    inputs = gemma3_batch(token_types=token_types)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return inputs


def assert_same_text_and_logits(first, second) -> None:
    assert torch.equal(first.sequences, second.sequences)
    for a, b in zip(first.logits, second.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("token_types", [True, False])
def test_none_on_the_static_cache_is_the_untouched_model(windowed_gemma3, token_types):
    """generate(cache_implementation="static") under `none` against the untouched model on transformers' static cache
    (its sliding layers roll their window's entries): 12 new tokens, left padding, the sliding layers' window reached
    in the prompt or while decoding; with token_type_ids (generate() hands the prefill its two-way image blocks in a
    4D mask) and without."""
    model = windowed_gemma3
    inputs = windowed_batch(token_types)
    window = model.config.text_config.sliding_window
    assert not inputs["attention_mask"].all() and inputs["input_ids"].shape[1] + 12 > window
    with torch.no_grad():
        untouched = generate(model, inputs, 12, cache_implementation="static")
        with slimvlm.apply(model, "none") as handle:
            ours = generate(model, inputs, 12, cache_implementation="static")
            assert handle.runtime.session.static is not None  # decoded on slimvlm's static cache
    assert_same_text_and_logits(ours, untouched)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_the_static_cache_generates_what_the_dynamic_cache_does(windowed_gemma3, thresholds, name):
    """Every method Gemma 3 runs, 24 new tokens on two left-padded prompts, every layer's reduced prompt and new tokens
    past the window: the same tokens and logits (within 1e-8) on slimvlm's static cache as on the dynamic one, whose
    sliding layers keep their window's entries alone (after a stage-3 drop the static cache takes the prefill's entries
    from them)."""
    model = windowed_gemma3
    inputs = windowed_batch()
    new = 24
    with torch.no_grad(), slimvlm.apply(model, spec_of(name, thresholds)) as handle:
        dynamic = generate(model, inputs, new)
        static = generate(model, inputs, new, cache_implementation="static")
        assert handle.runtime.session.static is not None
        entries = handle.stats.kv_entries  # per sample, per layer, after the prefill
    assert min(min(row) for row in entries) + new > model.config.text_config.sliding_window
    assert_same_text_and_logits(static, dynamic)


def test_the_static_decode_step_compiles_as_one_graph(fresh_gemma3):
    """On every kind of layer its own mask and rotary embedding, traced as one graph (fullgraph: a break raises), with
    CompileConfig's eager backend (no compiler on this machine): the eager step's text, under `none` (a group per
    kind of layer) and FastV (the kinds' groups before and after its drop)."""
    from transformers import CompileConfig

    model = fresh_gemma3
    inputs = gemma3_batch()
    saved = model.generation_config.compile_config
    model.generation_config.compile_config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        with torch.no_grad():
            for spec in ("none", "fastv:k=2,ratio=0.5"):
                with slimvlm.apply(model, spec):
                    eager = generate(model, inputs, 6, cache_implementation="static")
                with slimvlm.apply(model, spec, compile=True) as handle:
                    compiled = generate(model, inputs, 6, cache_implementation="static")
                    assert handle.runtime.decoder.static._compiled is not None  # the steps ran compiled
                assert torch.equal(compiled.sequences, eager.sequences)
                for a, b in zip(compiled.logits, eager.logits, strict=True):
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2  # one a spec, no break
    finally:
        model.generation_config.compile_config = saved
        torch._dynamo.reset()


@pytest.mark.parametrize("spec", ["none", "fastv:k=2,ratio=0.5"])
def test_the_static_cache_on_eager_attention_generates_what_the_dynamic_cache_does(spec):
    """Eager attention takes additive masks: each kind of layer's decode mask in that form, the window in it. In float32
    (in float64 transformers' eager masks give a padding row all -inf in its float32 softmax: NaN, the untouched model's
    too), so the logits within 1e-3 (the sharpened attention's rounding)."""
    model = gemma3_model()
    model.set_attn_implementation("eager")
    inputs = gemma3_batch()
    with torch.no_grad(), slimvlm.apply(model, spec):
        static, dynamic = generate(model, inputs, 12, cache_implementation="static"), generate(model, inputs, 12)
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("spec", ["none", "fastv:k=2,ratio=0.5"])
def test_a_static_decode_step_reads_what_the_untouched_models_does(fresh_gemma3, spec):
    """The per-kind masks are made on the device from what the host knows (each group's length): a decode step reads
    back what the untouched model's step on its static cache reads (generate()'s own stopping check), at batch 1."""
    from slimvlm.device_reads import HostReads

    model = fresh_gemma3
    inputs = gemma3_select(gemma3_batch(), 0)

    def reads_per_step() -> float:
        counted = []
        for new in (2, 6):
            with torch.no_grad(), HostReads() as reads:
                generate(model, inputs, new, cache_implementation="static")
            counted.append(reads.total)
        return (counted[1] - counted[0]) / 4

    untouched = reads_per_step()
    with slimvlm.apply(model, spec):
        assert reads_per_step() == untouched


def test_a_local_folder_loads_by_its_model_type(tmp_path):
    from slimvlm.models.loading import model_class_name

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    assert model_class_name(tmp_path) == "Gemma3ForConditionalGeneration"


def test_flops_count_the_pairs_the_models_own_masks_allow(fresh_gemma3):
    """bench/flops.py's attention term, per kind of layer, is the query-key pairs the model's own prefill masks allow:
    the window on sliding layers, each image's block both ways with token_type_ids (AND(window, OR(causal, block))),
    causal without; counted here from the masks transformers builds for the prompt (two images in one, left padding)."""
    from transformers.models.gemma3 import modeling_gemma3

    from slimvlm.bench import flops

    model, config = fresh_gemma3, fresh_gemma3.config.text_config
    shape = flops.llm_shape(config)
    assert shape.layer_kinds.count("sliding_attention") == 5 and shape.window == 8
    for token_types in (True, False):
        inputs = gemma3_batch(images=(1, 2), token_types=token_types)
        with torch.no_grad(), slimvlm.apply(model, "none") as handle:
            model(**inputs)
        stats = handle.stats
        assert stats.two_way_runs == ([[[GEMMA3_TOKENS], [GEMMA3_TOKENS] * 2]] * 6 if token_types else [])
        valid = inputs["attention_mask"].bool()
        image = (inputs["input_ids"] == IMAGE).long() if token_types else torch.zeros_like(inputs["input_ids"])
        masks = modeling_gemma3.create_masks_for_vision_model(
            config, torch.zeros(*valid.shape, 1), inputs["attention_mask"], None, (valid.cumsum(1) - 1).clamp(min=0),
            modeling_gemma3.get_block_sequence_ids_for_mask(image))
        for layer, kind in enumerate(shape.layer_kinds):
            allowed = [int(mask[0][row][:, row].sum()) for mask, row in zip(masks[kind], valid)]
            counted = [flops.attention_pairs(n, shape.window_of(layer))
                       + flops.two_way_pairs(stats.two_way_runs[layer][sample] if token_types else [])
                       for sample, n in enumerate(stats.llm_tokens[layer])]
            assert counted == allowed, (layer, kind, token_types)
        assert flops.count(model.config, stats).llm_prefill > 0


def test_two_way_runs_follow_the_kept_tokens(fresh_gemma3):
    """After FastV's drop at layer 2 the runs the FLOPs count are those of each image's kept tokens: they sum to the
    visual entries each later layer holds; before it, every image's 16."""
    with torch.no_grad(), slimvlm.apply(fresh_gemma3, "fastv:k=2,ratio=0.5") as handle:
        fresh_gemma3(**gemma3_batch(images=(1, 2)))
    stats = handle.stats
    assert stats.two_way_runs[:2] == [[[GEMMA3_TOKENS], [GEMMA3_TOKENS] * 2]] * 2
    for layer in range(2, 6):
        assert [sum(runs) for runs in stats.two_way_runs[layer]] == [entries[layer] for entries in stats.kv_visual_entries]
    assert [sum(runs) for runs in stats.two_way_runs[2]] == [GEMMA3_TOKENS // 2, GEMMA3_TOKENS]


# ---- stage 3 on the sliding-window LM ------------------------------------------------------------------------------
def fastv_by_hand(model, eager, inputs: dict, k: int, ratio: float, appended: list[int] = ()) -> torch.Tensor:
    """FastV written out on one unpadded prompt (then `appended` tokens, as decode steps add them), layer by layer, the
    last position's logits: the model's own embeddings and masks (two-way image blocks with token_type_ids, the window
    on sliding layers), layers 0..k-1 on every token; the last prompt token's attention in layer k-1, as the eager model
    returns it, averaged over heads, ranks the visual tokens and the round(ratio x n) lowest go (ties: the earlier);
    then layers k.. on the kept tokens at their own positions, the masks made anew for them, each kind of layer with
    its own rotary embedding."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

    lm, config = model.model.language_model, model.config.text_config
    ids = inputs["input_ids"]
    with torch.no_grad():
        rows = eager(**inputs, output_attentions=True).attentions[k - 1][0, :, -1].mean(dim=0)  # (L,)
        ids = torch.cat([ids, torch.tensor([list(appended)], dtype=ids.dtype)], dim=1)
        hidden = lm.embed_tokens(ids)
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        hidden[ids == IMAGE] = features.reshape(-1, features.shape[-1])
        visual = ids[0] == IMAGE
        order = rows.masked_fill(~visual[: rows.shape[0]], float("inf")).argsort(stable=True)
        dropped = order[: round(ratio * int(visual.sum()))]
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        keep[dropped] = False
        positions = torch.arange(ids.shape[1])[None]
        for part, layers in ((torch.ones_like(keep), range(k)), (keep, range(k, len(lm.layers)))):
            hidden, positions, ids = hidden[:, part[: hidden.shape[1]]], positions[:, part[: positions.shape[1]]], ids[:, part[: ids.shape[1]]]
            mask = torch.ones_like(ids)
            if "token_type_ids" in inputs:
                masks = create_masks_for_vision_model(config, hidden, mask, None, positions,
                                                      get_block_sequence_ids_for_mask((ids == IMAGE).long()))
            else:
                masks = {"full_attention": create_causal_mask(config, hidden, mask, None, positions),
                         "sliding_attention": create_sliding_window_causal_mask(config, hidden, mask, None, positions)}
            for index in layers:
                kind = config.layer_types[index]
                hidden = lm.layers[index](hidden, attention_mask=masks[kind], position_ids=positions,
                                          position_embeddings=lm.rotary_emb(hidden, positions, kind))
        return model.lm_head(lm.norm(hidden))[0, -1]


@pytest.mark.parametrize("token_types", [True, False])
def test_fastv_on_the_sliding_window_layers_is_fastv_by_hand(fresh_gemma3, token_types):
    """fastv:k=2: its score layer (1) and the layers after the drop (2-4) are sliding-window layers, 5 global; the prompt
    (two images) is longer than the window, so the last token's attention in layer 1 reaches only the last 8 tokens.
    The prefill's logits and the first decode step's (after the prefill's drops) are those of FastV by hand."""
    model = fresh_gemma3
    eager = gemma3_model()
    eager.set_attn_implementation("eager")
    inputs = gemma3_select(gemma3_batch((2, 1), token_types=token_types), 0, (2, 1))
    with torch.no_grad(), slimvlm.apply(model, "fastv:k=2,ratio=0.5") as handle:
        out = generate(model, inputs, new=2)
        kept = handle.stats.kv_visual_entries[0]
    assert kept[:2] == [2 * GEMMA3_TOKENS] * 2 and kept[2:] == [GEMMA3_TOKENS] * 4  # half of 32 from layer 2 on
    first = out.sequences[0, -2].item()
    torch.testing.assert_close(out.logits[0][0], fastv_by_hand(model, eager, inputs, 2, 0.5), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits[1][0], fastv_by_hand(model, eager, inputs, 2, 0.5, [first]), atol=1e-4,
                               rtol=1e-4)


def test_a_follow_up_turn_after_fastv_is_fastv_by_hand(fresh_gemma3):
    """A follow-up turn on the cache FastV left: its 4 new tokens in one step (the last generated and 3 more), each
    sliding layer's mask over its window of the view it holds; the last logits are FastV by hand on the whole
    conversation with the first turn's drops."""
    from slimvlm.models.compat import cache_kwarg

    model = fresh_gemma3
    eager = gemma3_model()
    eager.set_attn_implementation("eager")
    inputs = gemma3_select(gemma3_batch((2, 1)), 0, (2, 1))
    more = [11, 12, 13]
    with torch.no_grad(), slimvlm.apply(model, "fastv:k=2,ratio=0.5"):
        out = generate(model, inputs, new=2)
        conversation = torch.cat([out.sequences, torch.tensor([more])], dim=1)
        name = cache_kwarg(type(model).forward)  # the output's field and the forward's keyword, by release
        follow_up = model(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                          **{name: getattr(out, name)}).logits[0, -1]
    turn = out.sequences[0, -2:].tolist() + more
    torch.testing.assert_close(follow_up, fastv_by_hand(model, eager, inputs, 2, 0.5, turn), atol=1e-4, rtol=1e-4)


def test_mustdrops_important_set_lands_on_the_pooled_tokens(fresh_gemma3):
    """Found on each image's 8 x 8 patches by the attention they receive (no class token); a pooled token (2 x 2
    patches) is in the important set where any of its patches is."""
    spec = "mustdrop:lsm=false,global_thr=1,individual_thr=1,layers=0,output_cache=false"
    with torch.no_grad(), slimvlm.apply(fresh_gemma3, spec) as handle:
        fresh_gemma3(**gemma3_batch((2, 1)))
        method = handle.methods[0]
        moved = handle.runtime.session.tokens.patches_from_views(method._important)
    patches = method._important.view(-1, 4, 2, 4, 2)  # (images, pooled row, row in it, pooled col, col in it)
    assert torch.equal(moved, patches.any(dim=4).any(dim=2).flatten(1))
    assert method._important.sum(dim=1).tolist() == [6] * 3  # ceil(8% of 64) patches an image


def test_gemma_3_12b_shape():
    """shape:gemma-3-12b is google/gemma-3-12b-it's shape: its 12.19B parameters, 256 tokens an 896-px image pooled
    from 64 x 64 patches, five sliding-window layers (window 1024) to one global, each kind its rope."""
    from slimvlm.bench.shapes import MODEL_CLASSES, shape_config
    from slimvlm.models import adapter_for

    config = shape_config("gemma-3-12b")
    with torch.device("meta"):
        model = MODEL_CLASSES[type(config)]._from_config(config)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 12.19
    assert config.text_config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert config.text_config.sliding_window == 1024
    adapter = adapter_for(model)
    tensors, span = adapter.synthetic_images(2, torch.Generator().manual_seed(0))
    assert span == 256 and tensors["pixel_values"].shape == (2, 3, 896, 896)
    assert adapter.grid == (64, 64) and adapter.units == (16, 16) and adapter.tokens_per_image == 4096


def test_visionzip_keeps_the_pooled_tokens_whose_patches_receive_the_most_attention(fresh_gemma3):
    """Dominant tokens are pooled tokens kept whole (each one of the untouched model's image features), in spatial
    order: those whose 4 patches receive the most attention in SigLIP's last layer, as the eager tower returns it,
    averaged over heads and queries (no class token to ask), then over the 4 patches."""
    model = fresh_gemma3
    eager = gemma3_model()
    eager.set_attn_implementation("eager")
    inputs = gemma3_batch((2, 1))
    with torch.no_grad():
        untouched = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (images, 16, D)
        received = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-1]
        with slimvlm.apply(model, "visionzip:dominant=5,contextual=2") as handle:
            out = model(**inputs)
    score = received.mean(dim=(1, 2)).view(-1, 4, 2, 4, 2).mean(dim=(2, 4)).flatten(1)  # per pooled token
    expected = score.topk(5, dim=1).indices.sort(dim=1).values
    assert handle.stats.visual_tokens == [7] * 3 and handle.stats.projector_tokens == [GEMMA3_TOKENS] * 3
    for image, kept in enumerate(visual_tokens_out(out)):
        distance = torch.cdist(kept[:5], untouched[image])  # dominant tokens first, in spatial order
        assert (distance.min(dim=1).values < 1e-5).all()
        assert distance.argmin(dim=1).tolist() == expected[image].tolist()


def test_bench_and_bench_generate_run_on_a_local_gemma3_folder(tiny_gemma3, tmp_path):
    """bench-generate (wall-clock) times the folder's model with its methods on synthetic images, their token_type_ids
    from the adapter, on the eager and the static path; bench (FLOPs too) counts the LM's image blocks attending both
    ways."""
    from slimvlm.bench import flops
    from slimvlm.cli import main

    tiny_gemma3.save_pretrained(tmp_path)
    out = tmp_path / "generate.json"
    assert main(["bench-generate", "--model", str(tmp_path), "--methods", "none,divprune:budget=6,fastv:k=2,ratio=0.5",
                 "--batch-sizes", "2", "--paths", "eager,static", "--new-tokens", "2", "--repeats", "1", "--warmup",
                 "0", "--device", "cpu", "--json", str(out)]) == 0
    rows = {(row["path"], row["method"]): row["visual_tokens_mean"] for row in json.loads(out.read_text())["results"]}
    expected = {"untouched": GEMMA3_TOKENS, "none": GEMMA3_TOKENS, "divprune:budget=6": 6,
                "fastv:k=2,ratio=0.5": GEMMA3_TOKENS, "untouched, again": GEMMA3_TOKENS}
    assert rows == {(path, method): tokens for path in ("eager", "static") for method, tokens in expected.items()}
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tmp_path), "--methods", "divprune:budget=6", "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "2", "--device", "cpu", "--json", str(out)]) == 0
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert results["none"]["visual_tokens_mean"] == GEMMA3_TOKENS and results["none"]["flops_ratio"] == 1.0
    assert 0 < results["divprune:budget=6"]["flops_ratio"] < 1
    vision, _ = flops.shapes(tiny_gemma3.config)
    per_image = flops.projector_flops(vision, flops.llm_shape(tiny_gemma3.config.text_config), GEMMA3_TOKENS)
    assert results["none"]["flops"]["projector"] == results["divprune:budget=6"]["flops"]["projector"]
    assert results["none"]["flops"]["projector"] % per_image == 0  # whole images of pooled tokens, one matrix each


def test_a_pooling_that_does_not_tile_the_patch_grid_is_refused(tiny_gemma3, monkeypatch):
    monkeypatch.setattr(tiny_gemma3.config, "mm_tokens_per_image", 8)  # no square number of tokens
    with pytest.raises(SlimVLMError, match="mm_tokens_per_image=8 on a 8 x 8 patch grid.*use a checkpoint"):
        slimvlm.apply(tiny_gemma3, "none")
    assert "forward" not in tiny_gemma3.__dict__
