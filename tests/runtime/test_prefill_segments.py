"""Batch-1 prefill in segments between drops (runtime/segments.py) on the dynamic cache, where CUDA graphs replay
them: the same text and statistics as the eager hooked prefill. Graphs run here as the functions they capture
(device_reads.graphs_replayed_as_launches), which also refuses a read inside one."""

import pytest
import torch
from conftest import batch, causal_attention_calls, next_batch, next_select, ov_batch, ov_select, qwen_batch, qwen_select, select, spy_on_segments

import slimvlm
from slimvlm.device_reads import HostReads, graphs_replayed_as_launches

SPECS = ["none", "visionzip:dominant=20,contextual=5", "fastv", "fastv:k=1,ratio=0.75", "mustdrop-llava7b-64",
         ["tome:r=8", "fastv"], "mustdrop:filter=false,cache_keep=important", "llava-mini:budget=2", "divprune:budget=40"]


def generate(model, inputs, new_tokens: int = 5):
    return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)


def assert_segments_generate_what_the_lm_does(model, inputs, spec) -> None:
    with torch.no_grad():
        with slimvlm.apply(model, spec, cuda_graphs=False):
            expected = generate(model, inputs)
        with slimvlm.apply(model, spec) as handle, HostReads() as reads, graphs_replayed_as_launches(reads):
            segments = spy_on_segments(handle)
            segmented = generate(model, inputs)
    assert segments  # the LM ran in segments
    assert torch.equal(segmented.sequences, expected.sequences)
    for a, b in zip(segmented.scores, expected.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("spec", ["none", "visionzip:dominant=8,contextual=2", "fastv:k=2,ratio=0.5",
                                  "mustdrop:lsm=false,important=false,global_thr=0.05,individual_thr=0.05,layers=0;1"])
def test_segments_on_qwen_vl_keep_its_m_rope_positions(fresh_qwen, spec, kind):
    assert_segments_generate_what_the_lm_does(fresh_qwen, qwen_select(qwen_batch(fresh_qwen.config, kind=kind), 0), spec)


def test_segments_on_llava_next_and_onevision(fresh_next, fresh_ov):
    model, processor = fresh_next
    assert_segments_generate_what_the_lm_does(model, next_select(next_batch(processor), 0), "fastv")
    model, tokenizer = fresh_ov
    assert_segments_generate_what_the_lm_does(model, ov_select(ov_batch(model, tokenizer), 1), "fastv")


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_segments_on_the_dynamic_cache_generate_what_the_hooked_prefill_does(fresh, spec):
    model, processor = fresh
    inputs = select(batch(processor, 2, seed=5), 1)
    with torch.no_grad():
        with slimvlm.apply(model, spec, cuda_graphs=False) as handle:
            expected = generate(model, inputs)
            expected_stats = handle.stats
        with slimvlm.apply(model, spec) as handle, HostReads() as reads, graphs_replayed_as_launches(reads):
            segmented = generate(model, inputs)
            stats = handle.stats
            again = generate(model, inputs)  # the next prompt's prefill reuses the scratch cache and its graphs
    for output in (segmented, again):
        assert torch.equal(output.sequences, expected.sequences)
        for a, b in zip(output.scores, expected.scores):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # tokens and cache entries per layer: the segments' widths are rounded up to 64, their padding no entry
    assert stats.llm_tokens == expected_stats.llm_tokens
    assert stats.kv_entries == expected_stats.kv_entries
    assert stats.kv_visual_entries == expected_stats.kv_visual_entries


def prefill_launches(model, inputs, graphs: bool) -> int:
    with torch.no_grad(), HostReads() as reads:
        if graphs:
            with graphs_replayed_as_launches(reads):
                model(**inputs, use_cache=True)
        else:
            model(**inputs, use_cache=True)
    return reads.ops


@pytest.mark.parametrize("spec", ["none", "mustdrop-llava7b-64"])
def test_a_batch_1_prefill_replays_the_lm_in_one_segment_per_drop_and_one_more(fresh, spec):
    model, processor = fresh
    inputs = select(batch(processor, 1), 0)
    with slimvlm.apply(model, spec, cuda_graphs=False):
        eager = prefill_launches(model, inputs, graphs=False)
    with slimvlm.apply(model, spec) as handle:
        segments = spy_on_segments(handle)
        replayed = prefill_launches(model, inputs, graphs=True)
    drops = getattr(handle.methods[0], "drop_layers", ())
    layers = model.config.text_config.num_hidden_layers
    assert segments == list(zip((0, *drops), (*drops, layers)))  # the LM's own forward did not run
    assert replayed < eager, (replayed, eager)


def test_segments_attend_causally_without_a_mask(fresh):
    """A batch of one holds no padding once rebuilt (its mask's zeros are dropped with the placeholders'
    surplus), so its segments run SDPA with is_causal and no mask (flash attention on a GPU; the rows that pad
    a segment's input come last): a prompt given with padding generates the text the LM gives it."""
    model, processor = fresh
    padded = {key: value[:1] for key, value in batch(processor, 2, seed=5).items()}
    assert not padded["attention_mask"].all()
    with torch.no_grad(), slimvlm.apply(model, "fastv") as handle, HostReads() as reads, \
            graphs_replayed_as_launches(reads), causal_attention_calls() as calls:
        segments = spy_on_segments(handle)
        model(**padded)
    assert segments and calls.count("causal") == model.config.text_config.num_hidden_layers and "masked" not in calls
    assert_segments_generate_what_the_lm_does(model, padded, "fastv")


def test_a_batch_2_prefill_keeps_the_hooked_path(fresh):
    model, processor = fresh
    inputs = batch(processor, 2, seed=5)
    with torch.no_grad(), slimvlm.apply(model, "fastv") as handle, HostReads() as reads, \
            graphs_replayed_as_launches(reads):
        segments = spy_on_segments(handle)
        model(**inputs)
    assert not segments  # drops by the layer hooks: compute, not launches, is a batch's cost


@pytest.mark.parametrize("spec", ["none", "fastv"])
def test_segments_score_labels_as_the_lm_does(fresh, spec):
    """A batch-1 forward with labels (an evaluation's loss) in segments: the same logits, loss and remapped labels."""
    model, processor = fresh
    inputs = select(batch(processor, 1), 0)
    inputs["labels"] = inputs["input_ids"].clone()
    with torch.no_grad():
        with slimvlm.apply(model, spec, cuda_graphs=False) as handle:
            expected, expected_labels = model(**inputs), handle.labels
        with slimvlm.apply(model, spec) as handle, HostReads() as reads, graphs_replayed_as_launches(reads):
            output, labels = model(**inputs), handle.labels
    torch.testing.assert_close(output.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.loss, expected.loss, atol=1e-6, rtol=1e-6)
    assert torch.equal(labels, expected_labels)


def test_segments_on_eager_attention_take_additive_masks(tiny_dir, tiny):
    """An LM loaded with attn_implementation='eager' takes additive masks: segments build those."""
    from transformers import LlavaForConditionalGeneration

    _, processor = tiny
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    assert_segments_generate_what_the_lm_does(model, select(batch(processor, 1), 0), "fastv")


def test_prompts_of_any_length_reuse_the_scratch_cache_of_the_longest(fresh):
    """The scratch cache only grows, so the segments' graphs (which write it) survive shorter prompts: a long prompt,
    a short one, the long one again, each as the LM's own forward gives it."""
    from conftest import images
    from slimvlm.testbed.build import format_prompt

    model, processor = fresh
    long = format_prompt(" ".join(["is the red circle left of the blue square ?"] * 12))  # 64+ tokens more
    prompts = [processor(images=images(1, seed), text=[text], return_tensors="pt")
               for seed, text in ((1, long), (2, format_prompt("what shape is it ?")), (3, long))]
    assert prompts[0]["input_ids"].shape[1] - prompts[1]["input_ids"].shape[1] > 64
    with torch.no_grad():
        with slimvlm.apply(model, "fastv", cuda_graphs=False):
            expected = [model(**inputs).logits[:, -1] for inputs in prompts]
        with slimvlm.apply(model, "fastv") as handle, HostReads() as reads, graphs_replayed_as_launches(reads):
            scratch = []
            for inputs, want in zip(prompts, expected):
                torch.testing.assert_close(model(**inputs).logits[:, -1], want, atol=1e-5, rtol=1e-5)
                scratch.append(handle.runtime.llm_prefill.segments._scratch)
    assert scratch[0] is scratch[1] is scratch[2]
