"""Stage 4: a method that thins the KV cache after prefill; generate() keeps working."""

import torch

import slimvlm
from conftest import batch, select


class ThinCache(slimvlm.Method):
    """Test method: in odd LLM layers keep every `step`-th visual cache entry (step 1 keeps all)."""

    name = "test-thin-cache"
    stages = frozenset({slimvlm.Stage.DECODE})

    def __init__(self, step: int = 2):
        self.step = step

    def decode_keep(self, layer, sequence, tokens):
        if layer % 2 == 0:
            return None
        rank = sequence.visual.long().cumsum(dim=1) - 1
        return ~sequence.visual | (rank % self.step == 0)


def test_keep_all_cache_is_identical(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        with slimvlm.apply(model, ThinCache(step=1)):
            assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), reference)


def test_thinned_cache_generates_and_is_batch_consistent(fresh):
    model, processor = fresh
    inputs = batch(processor, 2, seed=3)
    with torch.no_grad(), slimvlm.apply(model, ["fastv:k=1,ratio=0.5", ThinCache(step=2)]) as handle:
        batched = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
        # layer 0: all 576; layers >= 1: fastv keeps 288, odd layers then keep every 2nd of those
        assert handle.stats.kv_visual_entries[0] == [576, 144, 288, 144]
        assert handle.stats.llm_tokens[1][0] == handle.stats.llm_tokens[0][0] - 288
        for index in range(2):
            alone = model.generate(**select(inputs, index), max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
            for step_batched, step_alone in zip(batched.scores, alone.scores):
                assert torch.allclose(step_batched[index], step_alone[0], atol=1e-4)
