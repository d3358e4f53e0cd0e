"""Reads of device values on the host. On a GPU each one waits for every kernel queued before it, and
at batch 1 the GPU then idles while the host queues the next ones: a prefill pays for each read. So
slimvlm reads what it must together, and what it only reports (statistics) when it is asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections import Counter
from typing import Iterator

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import graphs
from .graphs import GraphCache


def read_together(tensors: list[torch.Tensor]) -> list:
    """The values of several tensors as (nested) lists, in one transfer: one host sync, not one each."""
    if not tensors:
        return []
    device = tensors[0].device
    host = np.asarray(torch.cat([t.reshape(-1).to(device, torch.long) for t in tensors]).tolist(), dtype=np.int64)
    ends = np.cumsum([t.numel() for t in tensors])
    return [host[end - t.numel():end].reshape(t.shape).tolist() for end, t in zip(ends, tensors)]


# ops whose result the host waits for (item, bool(), nonzero's size); tolist is counted apart: it dispatches no op
_READ_OPS = frozenset({"aten.item.default", "aten._local_scalar_dense.default", "aten.is_nonzero.default",
                       "aten.nonzero.default", "aten.nonzero_numpy.default", "aten.equal.default",
                       "aten.masked_select.default", "aten._unique2.default", "aten.unique_consecutive.default"})


class HostReads(TorchDispatchMode):
    """Counts, inside a `with` block, the reads of device values on the host (what would be a host sync
    on a GPU; counted on any device, so a CPU test can hold a GPU path to its budget) and every op
    dispatched (each a kernel launch on a GPU), each read by the line of slimvlm or transformers that made it.

        with HostReads() as reads:
            model(**inputs)
        reads.total, reads.ops, reads.where.most_common(5)

    A measuring tool: while active it replaces Tensor.tolist (which dispatches no op) to count it, in every thread.
    """

    def __init__(self) -> None:
        super().__init__()
        self.where: Counter = Counter()
        self.ops = 0
        self._tolist = torch.Tensor.tolist

    @property
    def total(self) -> int:
        return sum(self.where.values())

    def __enter__(self) -> "HostReads":
        counted, original = self, self._tolist

        def tolist(tensor, *args):
            counted._count("tolist")
            return original(tensor, *args)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = str(func)
        if name in _READ_OPS or (name == "aten.index.Tensor" and _boolean_index(args)):
            self._count(name)
        return func(*args, **(kwargs or {}))

    def _count(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2]
                  if ("slimvlm" in f.filename or "transformers" in f.filename) and not f.filename.endswith("device_reads.py")]
        place = f"{frames[-1].filename.rsplit('site-packages/', 1)[-1].rsplit('src/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.where[f"{what} at {place}"] += 1


def _boolean_index(args) -> bool:
    """x[mask] with a bool mask: its result's size is read back."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


@contextlib.contextmanager
def graphs_replayed_as_launches(counted: HostReads) -> Iterator[None]:
    """Within the block, slimvlm's CUDA graphs run on any device as a GPU replays them, and count in `counted` as
    it launches them: one op per replay (the function runs, its ops uncounted). As on a GPU, each input shape's
    first call keeps its inputs' buffers and its output, and later calls write their inputs into those buffers and
    return that same output object with its tensors overwritten. A graphed function that reads the device raises:
    it could not be captured. A measuring tool, like HostReads: it swaps graphs.graphs_wanted (the switch the runtime
    looks up at each call) while active."""
    captured: dict = {}

    def replay(cache: GraphCache, *inputs, key: tuple = (), after_warmup=None):
        ops, reads = counted.ops, counted.total
        signature = (id(cache),) + tuple(None if t is None else (t.shape, t.dtype, t.device) for t in inputs) + key
        if signature not in captured:  # the capture
            buffers = [None if t is None else t.clone() for t in inputs]
            captured[signature] = (cache, buffers, cache.fn(*buffers, *key))  # the cache: its id stays its own
        else:  # a replay
            _, buffers, output = captured[signature]
            for buffer, given in zip(buffers, inputs):
                if given is not None:
                    buffer.copy_(given)
            overwrite(output, cache.fn(*buffers, *key))
        output = captured[signature][2]
        if counted.total != reads:
            raise RuntimeError(f"{cache.fn.__qualname__} reads the device: a CUDA graph could not capture it")
        counted.ops = ops + 1
        return output

    wanted, call = graphs.graphs_wanted, GraphCache.__call__
    graphs.graphs_wanted = lambda setting, device: setting is not False and not torch.is_grad_enabled()
    GraphCache.__call__ = replay
    try:
        yield
    finally:
        graphs.graphs_wanted, GraphCache.__call__ = wanted, call


def overwrite(kept, new) -> None:
    """Write the tensors of `new` into those of `kept` (the same structure: tensors in tuples, lists, dicts and
    dataclasses), as a graph's replay overwrites its output buffers and leaves everything else as it was."""
    if isinstance(kept, torch.Tensor):
        kept.copy_(new)
    elif type(kept) is not type(new):  # a plain value the host set since (e.g. a count it cached): stays
        return
    elif isinstance(kept, (list, tuple)):
        for old, fresh in zip(kept, new):
            overwrite(old, fresh)
    elif isinstance(kept, dict):
        for name in kept:
            overwrite(kept[name], new[name])
    elif dataclasses.is_dataclass(kept):
        for entry in dataclasses.fields(kept):
            overwrite(getattr(kept, entry.name), getattr(new, entry.name))
