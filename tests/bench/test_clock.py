"""GenerateClock splits a generate() call into vision, prefill and decode, and leaves the runtime as it was."""

import time

import torch

import slimvlm
from conftest import batch
from slimvlm.bench.clock import GenerateClock


def test_the_split_adds_up_to_the_call_and_the_answer_is_unchanged(tiny):
    model, processor = tiny
    inputs = batch(processor, 2)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with slimvlm.apply(model, "tome:r=8") as handle, torch.inference_mode():
        plain = model.generate(**inputs, **settings)
        with GenerateClock(handle) as clock:
            begin = time.perf_counter()
            output, split = clock.generate(model, **inputs, **settings)
            whole = time.perf_counter() - begin
        assert "run" not in vars(handle.runtime.vision)  # the runtime's own stages 1-2 again
    assert torch.equal(output, plain)
    assert split.vision > 0 and split.prefill > 0 and split.decode > 0
    assert split.vision + split.prefill + split.decode <= whole
    assert split.vision + split.prefill + split.decode > 0.8 * whole
