"""CUDA graphs for the parts of a forward whose shapes are static.

At batch 1 a 7B VLM's prefill is bound by kernel launches, not by arithmetic: with VisionZip's 64
visual tokens the GPU was busy for 10.5 of the prefill's 39.3 ms (H200, scripts/profile_generate.py,
results/generate/), so fewer tokens save little until the launches go. A CUDA graph replays a captured
sequence of kernels with one launch and the same kernels as eager. slimvlm can replay stages 1-2 (the
vision tower, projector and capturable methods as one graph; else the encoder layers before the first
one a method acts at) and the LLM prefill over the reduced sequence: on a static cache (its width rounded up
so that few graphs cover all prompts), and at batch 1 on either cache in segments between a stage-3 method's
drops (runtime/segments.py).
"""

from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator

import torch

from .errors import SlimVLMError


def graphs_wanted(setting: bool | None, device: torch.device) -> bool:
    """Graphs on a GPU at inference (no autograd) unless turned off; None is on."""
    return setting is not False and device.type == "cuda" and not torch.is_grad_enabled()


@contextlib.contextmanager
def own_cublas_workspace() -> Iterator[None]:
    """cuBLAS keeps one workspace per stream, outside any graph's memory pool, and torch.compile's CUDA
    graphs free it whenever they record (torch/_inductor/cudagraph_trees.py, clear_cublass_cache): a
    graph captured over that workspace then replays into freed memory. Cleared before and after the
    capture, the workspace the graph uses is allocated in its own pool and lives as long as it does."""
    torch._C._cuda_clearCublasWorkspaces()
    try:
        yield
    finally:
        torch._C._cuda_clearCublasWorkspaces()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a graph is captured: a collection there can free an earlier
    handle's graphs, and a graph destroyed during another's capture invalidates it (seen on an H100: the third
    of several `slimvlm.apply` evaluations in one process failed with cudaErrorStreamCaptureInvalidated after
    "operation not permitted when stream is capturing (function reset)"). Collected before, paused during."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class GraphCache:
    """Replays fn(*tensors, *key) from CUDA graphs, one per distinct input shape and `key` (plain
    values the function depends on). An input may be None (the same for every call of that signature).

    fn must not read values back to the host nor let shapes depend on values. Its output lives in the
    graph's buffers, which the next replay overwrites: use it before calling again. `after_warmup`
    undoes the side effects of the eager warm-up run that capture needs (e.g. a cache it wrote)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._graphs: dict = {}
        self._pool = None

    def __call__(self, *inputs: torch.Tensor, key: tuple = (), after_warmup: Callable[[], None] | None = None):
        signature = tuple(None if t is None else (t.shape, t.dtype, t.device) for t in inputs) + key
        entry = self._graphs.get(signature)
        if entry is None:
            entry = self._graphs[signature] = self._capture(inputs, key, after_warmup)
        graph, static_inputs, output = entry
        for static, given in zip(static_inputs, inputs):
            if given is not None:
                static.copy_(given)
        graph.replay()
        return output

    def _capture(self, inputs: tuple[torch.Tensor, ...], key: tuple, after_warmup):
        static_inputs = [None if t is None else t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS workspaces, allocations) happens here
            self.fn(*static_inputs, *key)
        torch.cuda.current_stream().wait_stream(side)
        if after_warmup is not None:
            after_warmup()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool: graphs replay one at a time
        graph = torch.cuda.CUDAGraph()
        try:
            with own_cublas_workspace(), collector_paused(), torch.cuda.graph(graph, pool=self._pool):
                output = self.fn(*static_inputs, *key)
        except RuntimeError as error:  # e.g. an op that reads the device or copies from the host
            raise SlimVLMError(
                f"a CUDA graph of {getattr(self.fn, '__qualname__', self.fn)} could not be captured ({error}); "
                "slimvlm.apply(model, ..., cuda_graphs=False) runs it without graphs"
            ) from error
        return graph, static_inputs, output
