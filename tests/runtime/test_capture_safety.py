"""Methods that declare themselves capturable run stages 1-2 without reading the device back or copying
host values to it: what a CUDA graph needs (tests/runtime/test_cuda_graphs.py replays them on a GPU)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import slimvlm
from conftest import batch, select
from slimvlm.registry import build

CAPTURABLE = ["none", "tome:r=8", "visionzip:dominant=20,contextual=5", "divprune:budget=40", "pool:budget=36",
              ["tome:r=8", "divprune:budget=40"], "mustdrop-llava7b-64:threshold=0.0"]


class NoHostTraffic(TorchDispatchMode):
    """Refuses an index assignment of a host scalar (a host-to-device copy on a GPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.index_put_.default and args[2].dim() == 0:
            raise AssertionError("index assignment of a host scalar: use index_fill_ or masked_fill_")
        return func(*args, **(kwargs or {}))


def refuse(*_args, **_kwargs):
    raise AssertionError("a value read back from the device")


@pytest.mark.parametrize("spec", CAPTURABLE, ids=str)
def test_capturable_stages_read_nothing_back(fresh, spec, monkeypatch):
    model, processor = fresh
    inputs = batch(processor, 2)
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        runtime = handle.runtime
        assert all(method.capturable for method in runtime.methods if method.stages)
        images = ((inputs["input_ids"] == model.config.image_token_id).sum(1) // 576).tolist()
        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        with NoHostTraffic():  # as a CUDA graph runs them: widths kept where counts follow the image
            tokens, *_ = runtime.vision.encode(inputs["pixel_values"], tuple(images), True)
        monkeypatch.undo()
        varying = any(method.varying_lengths for method in runtime.methods)
        assert (tokens.known is None) == varying  # MustDrop's merge: counted after the graph, by the rebuild


def test_a_method_that_reads_back_is_caught(fresh, monkeypatch):
    model, processor = fresh
    inputs = batch(processor, 1)
    spec = "mustdrop-llava7b-64:lsm_batch_min=true"  # the batch's fewest qualifying windows are read back
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        monkeypatch.setattr(torch.Tensor, "tolist", refuse)
        monkeypatch.setattr(torch.Tensor, "item", refuse)
        with pytest.raises(AssertionError, match="read back"):
            handle.runtime.vision.encode(inputs["pixel_values"], (1,), True)
    assert not build(spec).capturable


def test_the_vision_graph_is_one_per_pixel_shape_whatever_the_prompt(fresh, monkeypatch):
    """Stages 1-2 replay from a graph keyed by the pixels' shape and images per sample alone: prompts of other
    lengths replay it (a graph per prompt length would be captured anew for most requests and kept)."""
    from slimvlm.device_reads import HostReads, graphs_replayed_as_launches
    from slimvlm.graphs import GraphCache

    model, processor = fresh
    inputs = batch(processor, 2)
    prompts = [select(inputs, row) for row in (0, 1)]
    assert prompts[0]["input_ids"].shape != prompts[1]["input_ids"].shape
    signatures = []
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=40") as handle, HostReads() as reads, \
            graphs_replayed_as_launches(reads):
        vision = handle.runtime.vision.graphs
        replay = GraphCache.__call__  # the helper's: it runs the function
        monkeypatch.setattr(GraphCache, "__call__", lambda cache, *args, **kwargs: (
            signatures.append((tuple(t.shape for t in args), kwargs.get("key"))) if cache is vision else None)
            or replay(cache, *args, **kwargs))
        for prompt in prompts:
            model(**prompt)
    assert len(signatures) == 2 and signatures[0] == signatures[1]
