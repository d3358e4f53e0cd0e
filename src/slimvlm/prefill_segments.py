"""The LLM prefill of stage-3/4 methods on the static path, run in segments of layers between a method's drops.

On any other path layer hooks drive the prefill (runtime.py). Before a static-cache decode the prefill's
entries are handed over anyway, so here the runtime runs the layers itself: each segment is a function of
tensors (its input hidden states, mask, rotary embeddings and, where the next layer drops tokens, the
question rows to score) that writes its layers' keys and values to a scratch static cache of the prompt's
width and returns its output hidden states and the attention rows the method asked for. On a GPU each
segment replays from a CUDA graph, one per segment and width (widths are rounded up to CAPACITY_STEP, so
a few graphs cover every image): a batch-1 prefill is paid in kernel launches, and a hooked prefill launched
every op of its 32 layers one by one. What stays eager is the drop between segments (the method's choice and
the compaction, whose width is read back) and the hand-off of the kept entries to the decode cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import question_rows
from .graphs import GraphCache
from .hooks import capture_outputs


@dataclass
class LayerEntries:
    """One LLM layer's keys and values (B, H, W, d) after the prefill."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class PrefillEntries:
    """What the segments left per LLM layer (views of the scratch cache), until the hand-off copies it to
    the decode cache: shaped as a cache's `layers`."""

    layers: list[LayerEntries]


class SegmentedPrefill:
    """The scratch cache and the segments' CUDA graphs of one applied model."""

    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self.capacity = 0  # the scratch cache's slots: each layer's attention runs over all of them, masked
        self._scratch = None
        self._scratch_key: tuple | None = None
        self._graphs: GraphCache | None = None

    def start(self, batch: int, width: int, like: torch.Tensor) -> PrefillEntries:
        """Ready the scratch cache for a prompt of `width` (reused while the batch, width and dtype stay:
        the graphs write its buffers); the entries are filled as segments run."""
        from transformers import StaticCache

        key = (batch, width, like.dtype, like.device)
        self.capacity = width
        if key != self._scratch_key:
            self._scratch = self._graphs = None  # free the old buffers before allocating
            self._scratch = StaticCache(config=self.adapter.text_config, max_cache_len=width)
            self._graphs = GraphCache(self._segment)
            self._scratch_key = key
        return PrefillEntries([None] * len(self.adapter.llm_layers))

    def run(self, entries: PrefillEntries, start: int, end: int, hidden: torch.Tensor, mask: torch.Tensor,
            position_embeddings: tuple[torch.Tensor, torch.Tensor], probe: tuple[torch.Tensor, torch.Tensor] | None,
            final: bool, graphs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LLM layers [start, end) over hidden (B, W, D) with mask (B, 1, W, capacity): (their output, normed if
        `final`; the rows of layer end - 1's attention from the queries at probe = (query index (B, Q), key_valid
        (B, W)), else None).
        Their entries go to `entries`. Replayed from a CUDA graph when `graphs` (the outputs are the graph's:
        use them before the next prefill)."""
        cos, sin = position_embeddings
        index, key_valid = probe if probe is not None else (None, None)
        inputs = (hidden, mask, cos, sin, index, key_valid)
        if graphs:
            output, rows = self._graphs(*inputs, key=(start, end, final))
        else:
            output, rows = self._segment(*inputs, start, end, final)
        width = hidden.shape[1]
        for layer in range(start, end):
            scratch = self._scratch.layers[layer]
            entries.layers[layer] = LayerEntries(scratch.keys[:, :, :width], scratch.values[:, :, :width])
        return output, rows

    def _segment(self, hidden, mask, cos, sin, index, key_valid, start: int, end: int, final: bool):
        parts = self.adapter.decode_parts()
        rows = None
        for layer in range(start, end):
            self._scratch.layers[layer].reset()  # in the graph: this prefill's entries start at slot 0
            if index is not None and layer == end - 1:
                attention = self.adapter.attention_parts(layer)
                with capture_outputs(attention.q_proj, attention.k_proj) as outputs:
                    hidden = self._layer(parts, layer, hidden, mask, cos, sin)
                rows = question_rows(self.adapter, attention, *outputs, (cos, sin), index, key_valid)
            else:
                hidden = self._layer(parts, layer, hidden, mask, cos, sin)
        return (parts.norm(hidden) if final else hidden), rows

    def _layer(self, parts, layer: int, hidden, mask, cos, sin):
        return parts.layers[layer](hidden, attention_mask=mask, position_embeddings=(cos, sin), use_cache=True,
                                   **{self.adapter.cache_kwarg: self._scratch})
