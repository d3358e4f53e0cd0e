"""generate(cache_implementation="static"): slimvlm's own static cache sized for the reduced prompt (a
length per group of layers after stage 3-4 methods), the same text as the dynamic cache, a decode step that
compiles as one graph, and clear refusals."""

import copy

import pytest
import torch
from transformers import CompileConfig, DynamicCache, StaticCache

import slimvlm
from conftest import batch, causal_attention_calls, qwen_model, spy_on_segments
from slimvlm.runtime.static_cache import CAPACITY_STEP, fill, is_recurrent, recurrent_tensors, reset, static_cache
from slimvlm.device_reads import HostReads, graphs_replayed_as_launches
from slimvlm.models.compat import cache_kwarg
from slimvlm.sequence import attention_mask_4d, padding_of_causal_mask

STAGE_1_2 = ["none", "tome:r=8", "divprune:budget=40", "visionzip:dominant=20,contextual=5", "uniform:budget=49",
             "pool:budget=36", "llava-mini:budget=2"]
STAGE_3_4 = ["fastv", "fastv:k=1,ratio=0.75", "mustdrop-llava7b-64", ["tome:r=8", "fastv"]]
UNMERGING = [["tome:r=8", "vtu"]]  # attends over copies in every layer: its prefill never runs in segments


def generate(model, inputs, static: bool, new_tokens: int = 5, **extra):
    if static:
        extra["cache_implementation"] = "static"
    return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **extra)


def assert_same_generation(first, second) -> None:
    assert torch.equal(first.sequences, second.sequences)
    for a, b in zip(first.scores, second.scores):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("spec", STAGE_1_2 + STAGE_3_4 + UNMERGING, ids=str)
def test_static_cache_generates_what_the_dynamic_cache_does(fresh, spec):
    model, processor = fresh
    inputs = batch(processor, 3, seed=1)  # left-padded prompts of different lengths
    with torch.no_grad(), slimvlm.apply(model, spec):
        assert_same_generation(generate(model, inputs, static=True), generate(model, inputs, static=False))


@pytest.mark.parametrize("spec", STAGE_3_4 + ["mustdrop:filter=false,cache_keep=important"], ids=str)
def test_a_batch_1_prefill_in_segments_generates_what_the_hooked_one_does(fresh, spec):
    """At batch 1 on a static cache with CUDA graphs (run here as the functions they capture) stage-3/4 prefill
    runs in segments between drops (runtime/segments.py): the same text, the same tokens per layer and cache
    entries as the hooked prefill on the dynamic cache without graphs."""
    model, processor = fresh
    inputs = batch(processor, 1, seed=3)
    with torch.no_grad():
        with slimvlm.apply(model, spec, cuda_graphs=False) as handle:
            dynamic = generate(model, inputs, static=False)
            dynamic_stats = handle.stats
        with slimvlm.apply(model, spec) as handle, HostReads() as reads, graphs_replayed_as_launches(reads):
            segments = spy_on_segments(handle)
            static = generate(model, inputs, static=True)
            static_stats = handle.stats
    assert segments
    assert_same_generation(static, dynamic)
    assert static_stats.llm_tokens == dynamic_stats.llm_tokens
    assert static_stats.kv_entries == dynamic_stats.kv_entries
    assert min(static_stats.kv_entries[0]) < max(static_stats.kv_entries[0])  # something was dropped


@pytest.mark.parametrize("spec", ["none", "visionzip:dominant=20,contextual=5"])
def test_the_static_prefill_attends_causally_without_a_mask(fresh, spec):
    """Each row's real tokens sit first in slimvlm's static cache and its padding after them, so every LM layer's
    prefill runs SDPA with is_causal and no mask (flash attention on a GPU), as transformers runs the untouched
    prompt on an empty static cache: left-padded prompts of different lengths."""
    model, processor = fresh
    inputs = batch(processor, 3, seed=1)
    with torch.no_grad(), slimvlm.apply(model, spec), causal_attention_calls() as calls:
        generate(model, inputs, static=True, new_tokens=2)
    assert calls.count("causal") == model.config.text_config.num_hidden_layers
    assert "masked" not in calls


@pytest.mark.parametrize("spec", ["none", "visionzip:dominant=20,contextual=5"])
def test_a_static_cache_on_eager_attention_generates_what_the_dynamic_cache_does(tiny_dir, tiny, spec):
    """Eager attention reads every slot of the static cache: its prefill's additive mask follows the slots' order."""
    from transformers import LlavaForConditionalGeneration

    _, processor = tiny
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    inputs = batch(processor, 3, seed=1)
    with torch.no_grad(), slimvlm.apply(model, spec):
        assert_same_generation(generate(model, inputs, static=True), generate(model, inputs, static=False))


def test_none_on_a_static_cache_is_the_untouched_model(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    with torch.no_grad():
        untouched = generate(model, inputs, static=True)
        with slimvlm.apply(model, "none"):
            assert_same_generation(generate(model, inputs, static=True), untouched)


def test_the_static_cache_holds_the_reduced_prompt_and_the_new_tokens(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    name = cache_kwarg(model.forward)
    with torch.no_grad():
        untouched = getattr(generate(model, inputs, static=True, new_tokens=6), name)
        with slimvlm.apply(model, "divprune:budget=40") as handle:
            first = getattr(generate(model, inputs, static=True, new_tokens=6), name)
            second = getattr(generate(model, inputs, static=True, new_tokens=6), name)
    width = max(handle.stats.kv_entries[b][0] for b in range(2))  # the reduced prompt's longest row
    padded = -(-width // CAPACITY_STEP) * CAPACITY_STEP
    room = untouched.layers[0].max_cache_len - inputs["input_ids"].shape[1]  # what generate() left for new tokens
    assert first.layers[0].max_cache_len == -(-(padded + room) // CAPACITY_STEP) * CAPACITY_STEP
    assert first.layers[0].max_cache_len < untouched.layers[0].max_cache_len
    assert second is first  # reused: a compiled step keeps its shapes


@pytest.mark.parametrize("spec", ["divprune:budget=40", "mustdrop-llava7b-64", ["tome:r=8", "vtu"]], ids=str)  # one group of
# layers; several; copies in every layer
def test_the_decode_step_compiles_as_one_graph(fresh, spec):
    model, processor = fresh
    inputs = batch(processor, 2)
    saved = model.generation_config.compile_config
    model.generation_config.compile_config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    try:
        with torch.no_grad():
            with slimvlm.apply(model, spec):
                eager = generate(model, inputs, static=True)
            with slimvlm.apply(model, spec, compile=True):  # fullgraph: a graph break raises
                assert_same_generation(generate(model, inputs, static=True), eager)
    finally:
        model.generation_config.compile_config = saved


def test_layers_after_a_drop_hold_fewer_entries_and_decode_reads_only_those(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    name = cache_kwarg(model.forward)
    with torch.no_grad():
        untouched = getattr(generate(model, inputs, static=True, new_tokens=6), name)
        with slimvlm.apply(model, "fastv:k=1,ratio=0.75") as handle:
            cache = getattr(generate(model, inputs, static=True, new_tokens=6), name)
    lengths = [layer.max_cache_len for layer in cache.layers]
    entries = handle.stats.kv_entries  # per sample, per layer, after prefill
    room = untouched.layers[0].max_cache_len - inputs["input_ids"].shape[1]  # what generate() left for new tokens
    for layer, length in enumerate(lengths):
        width = max(entries[b][layer] for b in range(2))
        assert length == -(-(width + room) // CAPACITY_STEP) * CAPACITY_STEP
    assert lengths[0] > lengths[1] == lengths[-1]  # FastV at k=1 drops 3/4 of the 576 visual tokens
    assert [int(layer.cumulative_length) for layer in cache.layers] == [max(entries[b][i] for b in range(2)) + 5
                                                                        for i in range(len(lengths))]


def test_after_a_static_generate_the_dynamic_path_still_drops(fresh):
    model, processor = fresh
    inputs = batch(processor, 2, seed=2)
    with torch.no_grad(), slimvlm.apply(model, "mustdrop-llava7b-64") as handle:
        dynamic = generate(model, inputs, static=False)
        generate(model, inputs, static=True)  # takes the layer hooks off for its decode steps
        again = generate(model, inputs, static=False)
        assert_same_generation(again, dynamic)
        assert min(handle.stats.kv_visual_entries[0]) < 64


def test_virtual_unmerging_on_a_static_cache_keeps_one_shape_of_copies(fresh):
    """The decode step's copies are one tensor shape for the whole call (the compiled step keeps it), a multiple
    of CAPACITY_STEP columns: the prompt's copies, then one per decode slot, valid once its slot is written."""
    model, processor = fresh
    inputs = batch(processor, 2, seed=3)
    with torch.no_grad(), slimvlm.apply(model, ["tome:r=8", "vtu"]) as handle:
        shapes = []
        runtime = handle.runtime
        original = runtime.decoder.static.step

        def step(*args):
            shapes.append(tuple(args[-1]["static_copies"].keys.source.shape))
            return original(*args)

        runtime.decoder.static.step = step
        generate(model, inputs, static=True, new_tokens=4)
        prompt_copies = runtime.session.copies.source.shape[1]
    assert len(shapes) == 3 and len(set(shapes)) == 1  # the first token comes from the prefill
    width = shapes[0][1]
    assert width % CAPACITY_STEP == 0 and width >= prompt_copies + 4


def test_a_static_cache_without_room_is_refused(fresh):
    model, processor = fresh
    inputs = batch(processor, 1)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=40"):
        short = StaticCache(config=model.config.text_config, max_cache_len=length)
        with pytest.raises(slimvlm.SlimVLMError, match="no more than the prompt"):
            model(**inputs, **{cache_kwarg(model.forward): short})
        cache = StaticCache(config=model.config.text_config, max_cache_len=length + 1)
        output = model(**inputs, **{cache_kwarg(model.forward): cache})
        next_token = output.logits[:, -1:].argmax(-1)
        with pytest.raises(slimvlm.SlimVLMError, match="static cache is full"):
            for _ in range(CAPACITY_STEP + 1):  # rounded up, the cache has at most CAPACITY_STEP slots of room
                output = model(input_ids=next_token, **{cache_kwarg(model.forward): cache})


def test_padding_of_a_causal_mask():
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    keys = torch.cat([padding, torch.zeros(2, 3, dtype=torch.bool)], dim=1)  # 3 empty cache slots after the prompt
    for dtype in (None, torch.float32):
        mask = attention_mask_4d(keys, 5, dtype, first_query=0)
        assert torch.equal(padding_of_causal_mask(mask, 5), padding.long())
    bidirectional = torch.ones(2, 1, 5, 8, dtype=torch.bool)
    with pytest.raises(slimvlm.SlimVLMError, match="not a causal mask"):
        padding_of_causal_mask(bidirectional, 5)
    with pytest.raises(slimvlm.SlimVLMError, match="not the causal mask of a 5-token prompt"):
        padding_of_causal_mask(torch.ones(2, 1, 1, 8, dtype=torch.bool), 5)


def test_the_padding_of_a_causal_mask_with_two_way_blocks():
    """A model whose mask also lets some pairs attend both ways (Gemma 3's image blocks) gives them: the padding is
    read where the mask is causal over padding plus those pairs, and refused where it allows other pairs."""
    padding = torch.tensor([[False, True, True, True, True]])
    block = torch.zeros(1, 5, 5, dtype=torch.bool)
    block[0, 2:4, 2:4] = True  # tokens 2 and 3: one block
    at = torch.arange(5)
    mask = (padding[:, None, :] & ((at[None, :] <= at[:, None]) | block))[:, None]
    with pytest.raises(slimvlm.SlimVLMError, match="not a causal mask"):
        padding_of_causal_mask(mask, 5)
    assert torch.equal(padding_of_causal_mask(mask, 5, block), padding.long())
    other = torch.zeros_like(block)
    other[0, 1:3, 1:3] = True
    with pytest.raises(slimvlm.SlimVLMError, match="not a causal mask"):
        padding_of_causal_mask(mask, 5, other)


def test_a_windowed_mask_sees_the_keys_less_than_the_window_before_each_query():
    """As transformers' sliding layers (kv_idx > q_idx - window): queries at slots 5 and 6 of 8, window 3, padding
    at slot 4 masked, each query seeing itself."""
    key_valid = torch.tensor([[True, True, True, True, False, True, True, False]])
    mask = attention_mask_4d(key_valid, 2, None, first_query=5, window=3)
    assert mask[0, 0].int().tolist() == [[0, 0, 0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 0]]
    additive = attention_mask_4d(key_valid, 2, torch.float32, first_query=5, window=3)
    assert torch.equal(additive[0, 0] == 0, mask[0, 0])


def test_a_cache_long_enough_is_reused_so_the_compiled_step_keeps_its_shapes(fresh):
    """slimvlm's static cache only grows, per group of layers: a shorter reduced prompt (MustDrop's and DyMU's
    counts follow the image) reuses it, as transformers reuses its own across calls."""
    from slimvlm.runtime.static_cache import LayerGroups, StaticDecoder
    from slimvlm.models import adapter_for

    model, _ = fresh
    decoder = StaticDecoder(model, adapter_for(model), compile=False)
    layers = model.config.text_config.num_hidden_layers
    given = StaticCache(config=model.config.text_config, max_cache_len=700)  # 100 slots past a 600-token prompt
    groups = (0,) + (1,) * (layers - 1)  # e.g. FastV at k=1: layer 0, then the rest

    def start(*widths):
        key_valid = [torch.ones(1, width, dtype=torch.bool) for width in widths]
        return decoder.start(given, LayerGroups(key_valid, (None,) * len(widths), groups), 600, torch.zeros(1))

    cache, steps = start(300, 130)
    assert [layer.max_cache_len for layer in cache.layers] == [448] + [256] * (layers - 1)  # 300+100, 130+100 -> 64s
    shorter, steps = start(250, 40)
    assert shorter is cache and [slot.shape[1] for slot in steps.key_valid] == [448, 256]
    assert steps.lengths == [250, 40] and steps.key_valid[1][0, 40:].any().item() is False
    longer, _ = start(250, 200)  # the second group needs 320: grown, the first keeps its 448
    assert longer is not cache and [layer.max_cache_len for layer in longer.layers] == [448] + [320] * (layers - 1)
    other, _ = decoder.start(given, LayerGroups([torch.ones(1, 250, dtype=torch.bool)], (None,), (0,) * layers), 600,
                             torch.zeros(1))
    assert [layer.max_cache_len for layer in other.layers] == [384] * layers  # one group over layers of two lengths


def test_reset_and_fill_keep_a_linear_attention_layers_states_as_transformers_does():
    """On Qwen3.5's hybrid LM slimvlm's static cache keeps transformers' LinearAttentionLayers: reset() leaves it as
    StaticCache.reset() does (states zeroed, no previous state: the next prefill starts afresh), and fill() hands it a
    prefill's convolution and recurrent states and entries, from which decoding continues."""
    model = qwen_model("qwen3_5")
    lm = model.model.language_model
    name = cache_kwarg(lm.forward)
    embeds = torch.randn(2, 7, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    dynamic = DynamicCache(config=model.config.text_config)
    ours = static_cache(model.config.text_config, (None, None, None, 64))
    with torch.no_grad():
        lm(inputs_embeds=embeds, use_cache=True, **{name: dynamic})
        lm(inputs_embeds=embeds, use_cache=True, **{name: ours})
    theirs = copy.deepcopy(ours)
    reset(ours)
    theirs.reset()
    recurrent = [index for index, layer in enumerate(ours.layers) if is_recurrent(layer)]
    assert recurrent == [0, 1, 2]
    for index in recurrent:
        assert ours.layers[index].has_previous_state == theirs.layers[index].has_previous_state == {0: False}
        for a, b in zip(recurrent_tensors(ours.layers[index]), recurrent_tensors(theirs.layers[index]), strict=True):
            assert torch.equal(a, b) and not a.any()
    fill(ours, list(dynamic.layers))
    for index in recurrent:
        assert ours.layers[index].has_previous_state == {0: True}
        states = zip(recurrent_tensors(ours.layers[index]), recurrent_tensors(dynamic.layers[index]), strict=True)
        assert all(torch.equal(a, b) and a.any() for a, b in states)
    assert torch.equal(ours.layers[3].keys[:, :, :7], dynamic.layers[3].keys)
