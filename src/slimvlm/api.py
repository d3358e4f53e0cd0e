"""The public API: apply a method (or several, one per stage) to a transformers model in place."""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import SlimVLMError
from .hooks import APPLIED
from .models import adapter_for
from .registry import build, check_compatible
from .runtime import Runtime, Stats
from .method import Method

_ATTRIBUTE = "_slimvlm_handle"


class Handle:
    """What apply() returns: `stats` of the last forward/generate, `remove()` to undo."""

    def __init__(self, model: nn.Module, runtime: Runtime) -> None:
        self.model = model
        self.runtime = runtime
        self.methods = runtime.methods

    @property
    def stats(self) -> Stats:
        return self.runtime.stats

    @property
    def labels(self):
        """The labels of the last forward, remapped to the reduced sequence its logits cover (visual
        positions -100), or None if it had no labels: what a training loop aligns logits with."""
        return self.runtime.labels

    def remove(self) -> None:
        """Restore the untouched model exactly. A handle already removed does nothing (it never touches
        what a later apply() installed)."""
        if getattr(self.model, _ATTRIBUTE, None) is not self:
            return
        self.runtime.remove()
        delattr(self.model, _ATTRIBUTE)

    def __deepcopy__(self, memo=None):
        raise SlimVLMError(APPLIED)

    def __reduce_ex__(self, protocol):
        raise SlimVLMError(APPLIED)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *_exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Handle({', '.join(map(repr, self.methods))})"


def apply(
    model: nn.Module,
    method: str | Method | list[str | Method],
    keep_positions: bool | None = None,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
    **options: Any,
) -> Handle:
    """Install token-reduction method(s) on a transformers model, in place.

    method: a name or preset ("fastv", "fastv-k2-r50"), a spec with options ("tome:r=8"), a Method
    instance, or a list of these (one per stage). options: extra options of a single method.
    keep_positions: visual tokens keep the rotary positions of the patches they cover instead of
    being renumbered without gaps (virtual unmerging always keeps them: it rebuilds the full
    sequence's positions). None (default): the family's way, renumbered on LLaVA; on Qwen2-VL/2.5-VL
    always kept (M-RoPE places an image's tokens on its grid, so renumbering means nothing; False is
    refused there).
    compile: on transformers' static cache (`generate(cache_implementation="static")`), whether the
    decode step is torch.compile'd with the model's generation_config.compile_config; None (default)
    does as generate() does: compile on a GPU unless generation_config.disable_compile is set.
    cuda_graphs: on a GPU, replay the parts whose shapes are static from CUDA graphs: stages 1-2 (the
    vision tower, the projector and capturable methods; else the encoder layers before the first one a
    method acts at) and the LLM prefill: on a static cache, and at batch 1 on either cache in segments between
    a stage-3 method's drops. None (default) is on; False keeps them eager.
    """
    if getattr(model, _ATTRIBUTE, None) is not None:
        raise SlimVLMError("slimvlm is already applied to this model; call handle.remove() first")
    specs = method if isinstance(method, list) else [method]
    if not specs:
        raise SlimVLMError("no method given; use 'none' to run the untouched model")
    if options and len(specs) > 1:
        raise SlimVLMError("keyword options apply to a single method; with a list, write them in the specs ('tome:r=8')")
    built = [build(spec, **options) for spec in specs]
    check_compatible(built)
    adapter = adapter_for(model)
    handle = Handle(model, Runtime(model, adapter, built, keep_positions, compile, cuda_graphs))
    setattr(model, _ATTRIBUTE, handle)
    return handle
