"""MustDrop (Liu et al. 2024): each part against a hand-checked example, the no-op, and generate()."""

import dataclasses
import math

import pytest
import torch

import slimvlm
from conftest import batch, select
from slimvlm.device_reads import HostReads, graphs_replayed_as_launches
from slimvlm.errors import SlimVLMError
from slimvlm.methods.mustdrop import MustDrop, dual_attention_drop, important_tokens, parse_layers, window_similarity
from slimvlm.registry import PRESETS, build
from slimvlm.sequence import Sequence
from slimvlm.method import EncoderAttention, PrefillLayer, Stage
from slimvlm.tokens import VisualTokens


def grid_tokens(images: int, side: int, dim: int = 16, seed: int = 0) -> VisualTokens:
    """CLS + side x side patch tokens with random (hence dissimilar) features."""
    torch.manual_seed(seed)
    return VisualTokens.from_patches(torch.randn(images, 1 + side * side, dim), (side, side), has_cls=True)


def window_patches(top: int, left: int, side: int, window: int = 3) -> list[int]:
    return [(top + r) * side + left + c for r in range(window) for c in range(window)]


def after_layer(layer: int = 0) -> EncoderAttention:
    return EncoderAttention(layer=layer, num_layers=2, keys=None, rows=None)


# ---- 1. local spatial merging -------------------------------------------------------------------
def test_lsm_merges_exactly_the_uniform_window():
    tokens = grid_tokens(1, 6)
    patches = window_patches(0, 3, 6)  # the top-right 3x3 window: patches 3-5, 9-11, 15-17
    base = torch.randn(16)
    x = tokens.x.clone()
    x[0, [p + 1 for p in patches]] = base * torch.linspace(0.5, 2, 9)[:, None]  # same direction: cosine 1
    tokens = tokens.with_features(x)
    similarity, windows = window_similarity(tokens.x[:, 1:], (6, 6), 3)
    assert windows.tolist()[1] == patches
    assert similarity[0, 1].item() == pytest.approx(1.0, abs=1e-5) and (similarity[0, [0, 2, 3]] < 0.8).all()

    merged = MustDrop().encode_layer(after_layer(), tokens)
    assert merged.counts.tolist() == [37 - 8]
    assert merged.is_cls[0, 0]
    token = merged.patch_to_token[0, patches]
    assert (token == token[0]).all()
    assert merged.size[0, token[0]].item() == 9 and merged.size[0].sum().item() == 37
    assert merged.origin[0, token[0]].item() == patches[0]  # spatial order: the window's top-left patch
    torch.testing.assert_close(merged.x[0, token[0]], x[0, [p + 1 for p in patches]].mean(0))
    others = [p for p in range(36) if p not in patches]
    assert sorted(merged.patch_to_token[0, others].tolist()) == sorted(set(merged.patch_to_token[0, others].tolist()))
    # inside a CUDA graph: the same tokens, the tensor's width kept (padding), no count read back
    padded = MustDrop().encode_layer(dataclasses.replace(after_layer(), keep_width=True), tokens)
    assert padded.x.shape[1] == 37 and padded.known is None and padded.counts.tolist() == [29]
    assert torch.equal(padded.x[:, :29], merged.x) and (padded.size[0, 29:] == 0).all()
    assert torch.equal(padded.patch_to_token, merged.patch_to_token)
    # only after encoder layer 0; lsm=false does nothing
    assert MustDrop().encode_layer(after_layer(1), tokens) is tokens
    assert MustDrop(lsm=False).encode_layer(after_layer(), tokens) is tokens


def test_lsm_per_image_and_the_authors_batch_minimum():
    tokens = grid_tokens(2, 6, seed=1)
    x = tokens.x.clone()
    base, noise = torch.randn(16), torch.randn(9, 16)
    for patch in window_patches(0, 0, 6):  # image 0: window 0 identical (similarity 1) ...
        x[0, patch + 1] = base
    x[0, [p + 1 for p in window_patches(3, 3, 6)]] = base + 0.3 * noise  # ... and window 3 close (about 0.9)
    x[1, [p + 1 for p in window_patches(3, 0, 6)]] = base  # image 1: window 2 only
    tokens = tokens.with_features(x)
    similarity, _ = window_similarity(tokens.x[:, 1:], (6, 6), 3)
    assert 0.8 <= similarity[0, 3].item() < 0.999
    assert MustDrop().encode_layer(after_layer(), tokens).counts.tolist() == [37 - 16, 37 - 8]
    merged = MustDrop(lsm_batch_min=True).encode_layer(after_layer(), tokens)
    assert merged.counts.tolist() == [37 - 8, 37 - 8]  # r = 1 = the fewest in the batch: image 0 merges its best window
    assert (merged.patch_to_token[0, window_patches(0, 0, 6)] == merged.patch_to_token[0, 0]).all()


# ---- 2. the important set ------------------------------------------------------------------------
def test_important_set_from_the_cls_row():
    # CLS + 5 patches + 1 padding slot; ceil(0.3 * 5) = 2 important patches
    cls_attention = torch.tensor([[0.9, 0.1, 0.3, 0.05, 0.2, 0.25, 0.8]])
    candidates = torch.tensor([[False, True, True, True, True, True, False]])
    assert important_tokens(cls_attention, candidates, 0.3).tolist() == [[False, False, True, False, False, True, False]]
    assert important_tokens(cls_attention, candidates, 1.0).tolist() == candidates.tolist()
    assert math.ceil(0.08 * 576) == 47 and important_tokens(torch.rand(1, 577), torch.ones(1, 577, dtype=torch.bool), 0.08).sum() == 47


def test_important_set_reads_the_next_layer_and_is_found_again_after_cls_is_dropped():
    tokens = VisualTokens.from_patches(torch.randn(1, 7, 4), (2, 3), has_cls=True)
    row = torch.tensor([0.0, 0.1, 0.3, 0.05, 0.2, 0.25, 0.1])  # token 2 (patch 1) and token 5 (patch 4) lead

    def next_rows(query_index):
        assert query_index.tolist() == [[0]]
        return torch.stack([2 * row, torch.zeros(7)]).view(1, 2, 1, 7)  # mean over the 2 heads = row

    def wrong_rows(query_index):
        raise AssertionError("the important set reads the layer after the feature layer when it exists")

    method = MustDrop(important_ratio=0.3)
    attention = EncoderAttention(layer=1, num_layers=2, keys=None, rows=wrong_rows, next_rows=next_rows)
    assert method.encode_output(attention, tokens) is tokens
    assert method._important.tolist() == [[False, True, False, False, True, False]]
    # the LLM sees the patches without CLS: token k is patch k; S must be found by origin, not index
    llm_tokens = tokens.drop_cls()
    visual = torch.tensor([[False, True, True, True, True, True, True, False]])
    sequence = Sequence(
        valid=torch.ones(1, 8, dtype=torch.bool), positions=torch.arange(8)[None], visual=visual,
        image=torch.where(visual, 0, -1), token=torch.where(visual, visual.long().cumsum(1) - 1, -1),
    )
    assert method.important_mask(sequence, llm_tokens).tolist() == [[False, False, True, False, False, True, False, False]]
    # without a next layer it falls back to the feature layer's own rows
    fallback = MustDrop(important_ratio=0.3)
    fallback.encode_output(EncoderAttention(1, 2, None, next_rows, next_rows=None), tokens)
    assert fallback._important.tolist() == method._important.tolist()


# ---- 3. the dual-attention filter ----------------------------------------------------------------
def filter_example():
    """[text, v0..v4, text, text]: the text after the image (positions 6, 7) are the query rows."""
    visual = torch.tensor([[False, True, True, True, True, True, False, False]])
    sequence = Sequence(
        valid=torch.ones(1, 8, dtype=torch.bool), positions=torch.arange(8)[None], visual=visual,
        image=torch.where(visual, 0, -1), token=torch.where(visual, visual.long().cumsum(1) - 1, -1),
    )
    mean = torch.zeros(3, 8)  # (queries, keys), the mean over heads
    mean[:2, 1] = torch.tensor([0.001, 0.001])  # v0: global .002 low, individual .001 low -> dropped
    mean[:2, 2] = torch.tensor([0.0, 0.015])  # v1: global .015 low, individual .015 high -> kept
    mean[:2, 3] = torch.tensor([0.009, 0.009])  # v2: global .018 high, individual .009 low -> kept
    mean[:2, 4] = torch.tensor([0.4, 0.4])  # v3: high on both -> kept
    mean[:2, 5] = torch.tensor([0.001, 0.001])  # v4: low on both but important -> kept
    mean[2, 1] = 1.0  # an invalid (padding) query row must not count
    rows = torch.stack([2 * mean, torch.zeros_like(mean)], dim=0)[None]  # (1, 2 heads, 3, 8)
    query_valid = torch.tensor([[True, True, False]])
    tokens = VisualTokens.from_patches(torch.zeros(1, 5, 1), (1, 5), has_cls=False)
    # image total of global: .002 + .015 + .018 + .8 + .002 = .837; global_thr .02 -> cut .01674
    return sequence, rows, query_valid, tokens


def test_dual_attention_filter_keep_rule():
    sequence, rows, query_valid, tokens = filter_example()
    protected = torch.tensor([[False, False, False, False, False, True, False, False]])
    drop = dual_attention_drop(rows, query_valid, sequence.visual, sequence.image, protected, 0.02, 0.01)
    assert drop.tolist() == [[False, True, False, False, False, False, False, False]]
    unprotected = dual_attention_drop(rows, query_valid, sequence.visual, sequence.image, torch.zeros_like(protected), 0.02, 0.01)
    assert unprotected[0, 5]  # v4 goes when it is not important

    method = MustDrop(global_thr=0.02, individual_thr=0.01, layers="2;6", important_ratio=0.3)
    method._important = torch.tensor([[False, False, False, False, True]])  # patch 4 = v4
    layer = PrefillLayer(3, sequence, torch.zeros(1, 8, 4), rows, torch.tensor([[6, 7, 7]]), query_valid, tokens)
    keep = method.prefill_keep(layer)
    assert keep.tolist() == [[True, False, True, True, True, True, True, True]]  # text is never dropped
    assert method.drop_layers == (3, 7) and method.queries == "text_after_image"


def test_global_threshold_is_per_image():
    # two images in one sample: each token is compared with its own image's total
    visual = torch.tensor([[True, True, True, True, False]])
    image = torch.tensor([[0, 0, 1, 1, -1]])
    mean = torch.tensor([[[0.05, 0.5, 0.001, 0.003, 0.0]]])  # one query
    rows = mean[:, None]  # one head
    drop = dual_attention_drop(rows, torch.tensor([[True]]), visual, image, torch.zeros_like(visual), 0.2, 0.1)
    # image 0 total .55 -> cut .11: .05 drops; image 1 total .004 -> cut .0008: neither drops
    assert drop.tolist() == [[True, False, False, False, False]]


# ---- 4. the output-aware cache -------------------------------------------------------------------
def test_decode_keep():
    sequence, rows, query_valid, tokens = filter_example()
    for cache_keep, expected in (
        ("final", [True, False, True, True, True, True, True, True]),  # the survivors of the last drop
        ("important", [True, False, False, False, False, True, True, True]),  # S and the text alone
    ):
        method = MustDrop(global_thr=0.02, individual_thr=0.01, layers="2;6", cache_keep=cache_keep)
        method._important = torch.tensor([[False, False, False, False, True]])
        assert method.cache_from_layer == 2  # the first pruning layer
        method.prefill_keep(PrefillLayer(3, sequence, torch.zeros(1, 8, 4), rows, torch.tensor([[6, 7, 7]]), query_valid, tokens))
        assert method.decode_keep(1, sequence, tokens) is None
        assert method.decode_keep(2, sequence, tokens).tolist() == [expected]
        assert method.decode_keep(9, sequence, tokens).tolist() == [expected]
    assert MustDrop(cache_from_layer=0).cache_from_layer == 0
    assert MustDrop().decode_keep(5, sequence, tokens) is None  # no prefill drop seen: keep everything


# ---- the no-op, presets, options -----------------------------------------------------------------
OFF = "mustdrop:lsm=false,important=false,filter=false,output_cache=false"
# every part active, thresholds that keep every token: exercises stage-1, -3 and -4 paths
ACTIVE_KEEP_ALL = "mustdrop:threshold=1,global_thr=0,individual_thr=0,layers=0;1;2"


def test_switched_off_parts_leave_no_stage():
    assert build(OFF).stages == frozenset()


def test_keep_all_generate_is_identical(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        with slimvlm.apply(model, ACTIVE_KEEP_ALL):
            assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), reference)


def test_presets_and_listing():
    for budget, (g, i) in {64: (0.011, 0.01), 128: (0.0012, 0.001), 192: (0.001, 0.001)}.items():
        method = build(f"mustdrop-llava7b-{budget}")
        assert (method.global_thr, method.individual_thr) == (g, i)
        assert method.drop_layers == (3, 7, 11, 15) and method.cache_from_layer == 2
        assert method.window == 3 and method.threshold == 0.8 and method.important_ratio == 0.08
    assert "mustdrop-llava7b-64" in PRESETS
    listing = slimvlm.methods()["mustdrop"]
    assert listing["stages"] == ["encode", "prefill", "decode"]
    assert listing["options"]["layers"] == "2;6;10;14"
    assert parse_layers("14;2,6 10") == (2, 6, 10, 14) and parse_layers(3) == (3,)
    assert repr(build("mustdrop:layers=0;2")).count("layers=0;2") == 1


@pytest.mark.parametrize("spec, message", [
    ("mustdrop:threshold=1.5", "threshold"),
    ("mustdrop:global_thr=-0.1", "global_thr"),
    ("mustdrop:individual_thr=2", "individual_thr"),
    ("mustdrop:window=1", "window"),
    ("mustdrop:window=2.5", "window"),
    ("mustdrop:important_ratio=0", "important_ratio"),
    ("mustdrop:important_ratio=1.5", "important_ratio"),
    ("mustdrop:layers=a;b", "layers"),
    ("mustdrop:layers=-1", "layers"),
    ("mustdrop:cache_keep=all", "cache_keep"),
    ("mustdrop:important=false,cache_keep=important", "important"),
    ("mustdrop:cache_from_layer=-1", "cache_from_layer"),
    ("mustdrop:lsm=3", "lsm"),
])
def test_bad_options(spec, message):
    with pytest.raises(SlimVLMError, match=message):
        build(spec)


def test_model_too_shallow_or_window_too_large(fresh):
    model, processor = fresh
    with pytest.raises(SlimVLMError, match="language model has 4 layers"):
        slimvlm.apply(model, "mustdrop:layers=3;6")  # the tiny LM has 4 layers: layer 3 has no layer after it
    with pytest.raises(SlimVLMError, match="cache_from_layer=4"):
        slimvlm.apply(model, "mustdrop:cache_from_layer=4")
    assert getattr(model, "_slimvlm_handle", None) is None
    method = build("mustdrop:layers=2;6;10;14")
    method.check_model(2, 4, 576)
    assert method.drop_layers == (3,)  # pruning layers past the model's depth are skipped
    with pytest.raises(SlimVLMError, match="window=30"):
        with slimvlm.apply(model, "mustdrop:window=30"):
            model(**batch(processor, 1))


# ---- end to end on the tiny model ----------------------------------------------------------------
# the tiny model's random weights: threshold 0.1 merges some windows (a different number per image),
# global_thr 0.0019 drops part of the tokens (its attention is nearly uniform)
E2E = "mustdrop:threshold=0.1,global_thr=0.0019,layers=1;2"  # drops at the inputs of layers 2 and 3


@pytest.mark.parametrize("cache_keep", ["final", "important"])
def test_generate_shrinks_the_cache_and_batched_equals_one_by_one(fresh, cache_keep):
    model, processor = fresh
    inputs = batch(processor, 3, seed=1)
    spec = f"{E2E},cache_keep={cache_keep}"
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        batched = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
        stats = handle.stats
        views = handle.runtime.session.distinct_views()
        assert len(views) == 2 and handle.runtime.session.view_of(1) is views[1]  # layers 1-3 hold one set: one view
        visual = stats.visual_tokens
        assert all(v < 576 for v in visual) and len(set(visual)) > 1  # LSM merged, per image
        for b in range(3):
            text = stats.llm_tokens[0][b] - visual[b]
            per_layer_visual = [stats.llm_tokens[layer][b] - text for layer in range(4)]
            assert per_layer_visual[0] == per_layer_visual[1] == visual[b]
            assert per_layer_visual[1] >= per_layer_visual[2] >= per_layer_visual[3] >= math.ceil(0.08 * visual[b])
            final = per_layer_visual[3] if cache_keep == "final" else math.ceil(0.08 * visual[b])
            # layer 0 keeps its full cache; from the first pruning layer (1) on only the kept set
            assert stats.kv_visual_entries[b] == [visual[b], final, final, final]
        assert any(stats.llm_tokens[3][b] < stats.llm_tokens[0][b] for b in range(3))  # the filter dropped some
        for index in range(3):
            alone = model.generate(**select(inputs, index), max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
            assert handle.stats.visual_tokens == [visual[index]]
            assert handle.stats.kv_visual_entries[0] == stats.kv_visual_entries[index]
            new_batched = batched.sequences[index, inputs["input_ids"].shape[1]:]
            new_alone = alone.sequences[0, select(inputs, index)["input_ids"].shape[1]:]
            assert torch.equal(new_batched, new_alone)
            for step_batched, step_alone in zip(batched.scores, alone.scores):
                assert torch.allclose(step_batched[index], step_alone[0], atol=1e-4)


def test_demo_budget_rule_uses_the_presets(tiny):
    from slimvlm.demo import budget_specs

    model, _ = tiny
    assert budget_specs(model, 64)["mustdrop"] == "mustdrop-llava7b-64"
    assert budget_specs(model, 192)["mustdrop"] == "mustdrop-llava7b-192"
    assert Stage.DECODE in build("mustdrop-llava7b-64").stages


def test_stages_1_2_replayed_as_one_graph_at_batch_1_give_what_they_give_eagerly(fresh):
    """At batch 1 on a GPU the window merge keeps the encoder's width (padding what it merges) so that the tower,
    MustDrop's stage-1 parts and the projector replay as one CUDA graph: the same logits and statistics, for a
    prompt that replays the graph another captured (images merging differently). Run here as a GPU replays
    graphs (device_reads.graphs_replayed_as_launches), reads counted (none may happen inside)."""
    model, processor = fresh
    prompts = [select(batch(processor, 2, seed=4), row) for row in (0, 1)]
    spec = "mustdrop:threshold=0.0"  # merges most windows of a random tower, a different number per image
    with torch.no_grad():
        expected = []
        with slimvlm.apply(model, spec, cuda_graphs=False) as handle:
            for inputs in prompts:
                expected.append((model(**inputs).logits, handle.stats))
        with slimvlm.apply(model, spec) as handle, HostReads() as reads, graphs_replayed_as_launches(reads):
            replayed = []
            for inputs in prompts + prompts:
                replayed.append((model(**inputs).logits, handle.stats))
    assert expected[0][1].visual_tokens[0] != expected[1][1].visual_tokens[0] and max(expected[0][1].visual_tokens) < 576
    for (logits, stats), (want_logits, want) in zip(replayed, expected + expected):
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
        for field in ("visual_tokens", "sources", "vision_tokens", "llm_tokens", "kv_entries", "projector_tokens"):
            assert getattr(stats, field) == getattr(want, field), field
