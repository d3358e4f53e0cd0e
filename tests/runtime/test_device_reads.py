"""Host reads of device values: what a batch-1 prefill waits for on a GPU, held to a budget on the CPU."""

import pytest
import torch
from conftest import batch, select

from transformers import DynamicCache, StaticCache

import slimvlm
from slimvlm.device_reads import HostReads, graphs_replayed_as_launches, read_together
from slimvlm.models.compat import cache_kwarg
from slimvlm.methods.mustdrop import MustDrop
from slimvlm.sequence import compaction


def test_read_together_returns_each_tensors_values_in_one_read():
    tensors = [torch.tensor(7), torch.tensor([1, 2, 3]), torch.tensor([[True, False], [False, True]])]
    with HostReads() as reads:
        values = read_together(tensors)
    assert values == [7, [1, 2, 3], [[1, 0], [0, 1]]]
    assert reads.total == 1


def test_host_reads_counts_every_kind_of_read_by_place():
    x = torch.tensor([0, 3, 0, 5])
    with HostReads() as reads:
        x.sum().item()
        x.tolist()
        bool(x.any())
        x.nonzero()
        x + 1  # no read
    assert reads.total == 4
    assert all("test_device_reads.py" not in place or place for place in reads.where)
    assert reads.ops >= 5


def test_compaction_packs_rows_with_one_read_and_none_when_told_the_range():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    with HostReads() as reads:
        left = compaction(keep)
    assert reads.total == 1
    assert left.index[0].tolist() == [0, 2, 3] and left.valid[0].tolist() == [True, True, True]
    assert left.index[1, 2].item() == 1 and left.valid[1].tolist() == [False, False, True]
    assert left.padded
    right = compaction(keep, right=True)
    assert right.index[1, 0].item() == 1 and right.valid[1].tolist() == [True, False, False]
    with HostReads() as reads:
        told = compaction(keep, known=(1, 3))
    assert reads.total == 0
    assert torch.equal(told.index[told.valid], left.index[left.valid])
    full = compaction(torch.ones(2, 3, dtype=torch.bool), width_step=4)
    assert full.index.shape == (2, 4) and full.padded  # rounded up to the step: padding on every row


def slimvlm_reads(model, inputs) -> HostReads:
    with torch.no_grad(), HostReads() as reads:
        model(**inputs, use_cache=True)
    return reads


def own(reads: HostReads) -> int:
    return sum(count for place, count in reads.where.items() if "slimvlm/" in place)


def test_a_prefill_reads_what_its_shapes_need_and_statistics_only_when_asked(fresh):
    model, processor = fresh
    inputs = select(batch(processor, 1), 0)
    with slimvlm.apply(model, "none") as handle:
        reads = slimvlm_reads(model, inputs)
        # the prompt's images, padding side and placeholders; the rebuilt rows' width
        assert own(reads) <= 2, reads.where
        with HostReads() as asked:
            stats = handle.stats
        assert asked.total == 1 and stats.visual_tokens == [576]
        with HostReads() as again:
            assert handle.stats is stats
        assert again.total == 0


@pytest.mark.parametrize("spec", ["mustdrop-llava7b-64", "mustdrop:layers=0;1,cache_from_layer=1"])
def test_mustdrop_reads_once_per_drop_and_once_for_its_question_and_its_cache(fresh, spec):
    model, processor = fresh
    inputs = select(batch(processor, 1), 0)
    with slimvlm.apply(model, spec) as handle:
        reads = slimvlm_reads(model, inputs)
        drops = len(handle.methods[0].drop_layers)
        assert isinstance(handle.methods[0], MustDrop) and drops >= 1
        # as for `none`, + the question's width once, + per drop its kept rows' width, + the cache's groups,
        # + the image's token count after the window merge
        assert own(reads) <= 2 + 1 + drops + 2, reads.where
        stats = handle.stats
    layers = len(stats.kv_visual_entries[0])
    assert stats.kv_visual_entries[0][layers - 1] < stats.visual_tokens[0]


def test_fastv_reads_once_for_its_drop(fresh):
    model, processor = fresh
    with slimvlm.apply(model, "fastv"):
        reads = slimvlm_reads(model, select(batch(processor, 1), 0))
    assert own(reads) <= 2 + 1, reads.where  # as for `none`, + the kept rows' width


def decode_step(model, inputs) -> tuple[float, float]:
    """(ops, reads) of one greedy decode step: generate(6 new tokens) less generate(2), over the 4 steps between."""
    counted = []
    for new in (2, 6):
        with torch.no_grad(), HostReads() as reads:
            model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        counted.append(reads)
    return (counted[1].ops - counted[0].ops) / 4, (counted[1].total - counted[0].total) / 4


@pytest.mark.parametrize("spec", ["none", "fastv", "mustdrop-llava7b-64"])
def test_a_batch_1_decode_step_costs_what_the_untouched_models_does(fresh, spec):
    """Layers after a drop attend to every key of their unpadded view: no mask to build per step, no read."""
    model, processor = fresh
    inputs = select(batch(processor, 1), 0)
    ops, reads = decode_step(model, inputs)
    with slimvlm.apply(model, spec):
        method_ops, method_reads = decode_step(model, inputs)
    assert method_reads == reads and method_ops <= ops + 6, (method_ops, ops)


def test_a_decode_step_given_an_all_ones_mask_runs_as_one_given_none(fresh):
    """generate() of transformers < 5.25 passes its 2D mask every step: one read finds the new column all ones,
    and the layers after FastV's drop attend without the per-view masks a padded step builds (tens of ops)."""
    model, processor = fresh
    inputs = select(batch(processor, 1), 0)
    runs = []
    with torch.no_grad(), slimvlm.apply(model, "fastv"):
        for given_mask in (False, True):
            cache = DynamicCache(config=model.config.text_config)
            token = model(**inputs, use_cache=True, **{cache_kwarg(model.forward): cache}).logits[:, -1:].argmax(-1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
            with HostReads() as reads:
                step = model(input_ids=token, use_cache=True, **{cache_kwarg(model.forward): cache},
                             **({"attention_mask": mask} if given_mask else {}))
            runs.append((step.logits, reads))
    (plain, plain_reads), (masked, masked_reads) = runs
    assert torch.equal(masked, plain)
    assert masked_reads.total == plain_reads.total + 1
    assert masked_reads.ops <= plain_reads.ops + 5, (masked_reads.ops, plain_reads.ops)


def static_prefill_launches(model, inputs, **extra) -> HostReads:
    """Ops and reads of a batch-1 prefill on a static cache, slimvlm's CUDA graphs counted as one launch each."""
    cache = StaticCache(config=model.config.text_config, max_cache_len=inputs["input_ids"].shape[1] + 8)
    with torch.no_grad(), HostReads() as reads, graphs_replayed_as_launches(reads):
        model(**inputs, use_cache=True, **{cache_kwarg(model.forward): cache}, **extra)
    return reads


@pytest.mark.parametrize("spec", ["fastv", "mustdrop-llava7b-64"])
def test_a_batch_1_static_prefill_launches_its_segments_as_graphs(fresh, spec):
    """Stage-3 layers run in segments replayed as CUDA graphs (nothing inside them reads the device, or the count
    raises); what launches beside `none`'s graphs is the drops' bookkeeping, not the LLM's layers."""
    model, processor = fresh
    inputs = select(batch(processor, 1), 0)
    with slimvlm.apply(model, spec):
        segmented = static_prefill_launches(model, inputs)
        hooked = static_prefill_launches(model, inputs, output_hidden_states=False)  # the LM's own outputs: hooks
    layers = model.config.text_config.num_hidden_layers
    # a hooked LM layer launches its ops one by one (over 80 each here); segments launch once each
    assert segmented.ops + 50 * layers <= hooked.ops, (segmented.ops, hooked.ops)
    assert segmented.total <= hooked.total
