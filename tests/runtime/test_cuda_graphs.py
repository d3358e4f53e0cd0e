"""CUDA graphs (GPU only): replayed stages give what the same stages give eagerly, on fresh inputs too,
and stay valid after torch.compile's CUDA graphs record (they free cuBLAS's workspace)."""

import pytest
import torch

import slimvlm
from conftest import batch, select
from slimvlm.testbed.build import load

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

# capturable as a whole (vision tower + method + projector in one graph), then methods whose untouched
# encoder layers alone replay from a graph
SPECS = ["none", "tome:r=8", "visionzip:dominant=20,contextual=5", "divprune:budget=40", "pool:budget=36",
         ["tome:r=8", "divprune:budget=40"], "random:budget=30", "mustdrop-llava7b-64", "llava-mini:budget=2", "fastv"]


@pytest.fixture(scope="module")
def tiny_cuda(tiny_dir):
    model, processor = load(tiny_dir)
    return model.to("cuda"), processor


def on_cuda(inputs: dict) -> dict:
    return {k: v.to("cuda") for k, v in inputs.items()}


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_replayed_prefill_equals_eager(tiny_cuda, spec):
    model, processor = tiny_cuda
    for seed in (1, 2):  # the second batch replays the graphs captured for the first
        inputs = on_cuda(batch(processor, 2, seed=seed))
        with torch.inference_mode():
            with slimvlm.apply(model, spec, cuda_graphs=False):
                eager = model(**inputs).logits
            with slimvlm.apply(model, spec, cuda_graphs=True) as handle:
                replayed = model(**inputs).logits
                again = model(**inputs).logits
        torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again, eager, atol=1e-5, rtol=1e-5)
        assert handle.stats.visual_tokens


@pytest.mark.parametrize("spec", ["none", "visionzip:dominant=20,contextual=5", "divprune:budget=40", "llava-mini:budget=2",
                                  "fastv", "mustdrop-llava7b-64"])
def test_static_cache_generation_with_graphs_and_compile(tiny_cuda, spec):
    model, processor = tiny_cuda
    inputs = on_cuda(batch(processor, 2, seed=3))
    settings = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.inference_mode():
        with slimvlm.apply(model, spec, cuda_graphs=False, compile=False):
            eager = model.generate(**inputs, **settings)
        with slimvlm.apply(model, spec, cuda_graphs=True):  # graphs, then the compiled decode step records
            for _ in range(2):
                assert torch.equal(model.generate(**inputs, **settings), eager)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("spec", ["none", "fastv", "mustdrop-llava7b-64", "mustdrop:filter=false,cache_keep=important",
                                  "mustdrop-llava7b-64:threshold=0.0"])  # the last merges windows, a different number per image
def test_batch_1_prefill_segments_replayed_from_graphs_generate_what_eager_does(tiny_cuda, spec, cache):
    """At batch 1 the LM's layers run in segments between drops replayed from CUDA graphs (runtime/segments.py):
    prompts in turn, each replaying what the others captured where widths agree."""
    model, processor = tiny_cuda
    prompts = [on_cuda(select(batch(processor, 2, seed=seed), row)) for seed in (3, 4) for row in (0, 1)]
    settings = dict(max_new_tokens=6, do_sample=False, cache_implementation=None if cache == "dynamic" else "static")
    with torch.inference_mode():
        with slimvlm.apply(model, spec, cuda_graphs=False, compile=False):
            eager = [model.generate(**inputs, **settings) for inputs in prompts]
        with slimvlm.apply(model, spec, cuda_graphs=True):
            for _ in range(2):
                for inputs, expected in zip(prompts, eager):
                    assert torch.equal(model.generate(**inputs, **settings), expected)


def test_a_function_that_cannot_be_captured_names_the_way_out():
    from slimvlm.errors import SlimVLMError
    from slimvlm.graphs import GraphCache

    reads_back = GraphCache(lambda x: x * int(x.sum().item()))  # a read of the device: not capturable
    with torch.inference_mode(), pytest.raises(SlimVLMError, match="cuda_graphs=False"):
        reads_back(torch.ones(4, device="cuda"))
