"""Small helpers over torch module hooks, so hooks are always removed."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


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


class HookSet:
    """Hooks installed for the lifetime of a handle, removed together."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    def __bool__(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
