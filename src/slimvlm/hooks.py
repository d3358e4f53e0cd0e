"""Small helpers over torch module hooks, so hooks are always removed."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import SlimVLMError

APPLIED = ("a model with slimvlm applied cannot be copied or pickled (its patched forward and hooks belong to this "
           "process's model); copy or save it before slimvlm.apply, or call handle.remove() first and apply again")


class Installed:
    """A function slimvlm sets on a model (or one of its modules) while applied. Copying or pickling the model
    reaches it first: it refuses by name (a local function would fail there with "Can't pickle local object")."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        raise SlimVLMError(APPLIED)


@contextmanager
def capture_outputs(*modules: nn.Module) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, outputs[i] holds the last output of modules[i] (e.g. a k_proj), so a
    method can read a layer's keys without computing them twice."""
    outputs: list[torch.Tensor | None] = [None] * len(modules)
    handles = []
    for i, module in enumerate(modules):
        def keep(_module, _inputs, output, i=i):
            outputs[i] = output

        handles.append(module.register_forward_hook(keep))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_inputs(module: nn.Module) -> Iterator[dict]:
    """Within the block, captured["args"] and captured["kwargs"] hold the last call's arguments of module
    (e.g. a vision block's attention: its normed input, cu_seqlens, rotary embeddings)."""
    captured: dict = {}

    def keep(_module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    handle = module.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


class HookSet:
    """Hooks installed together, removed together."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
