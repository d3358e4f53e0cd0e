"""The LLM prefill at batch 1 with CUDA graphs, run in segments of layers between a stage-3 method's drops,
each replayed from a graph (where the runtime takes this path: plan.py; the loop over segments: prefill.py).

Elsewhere the LM's own forward runs the prefill (with layer hooks for stages 3-4: prefill_layers.py). At batch 1 a
prefill is paid in kernel launches, and that forward launches every op of every layer one by one; here the
runtime runs the layers itself. Each segment is a function of tensors (its input hidden states, mask, rotary
embeddings and, where the next layer drops tokens, the question rows to score) that writes its layers' keys
and values to a scratch static cache and returns its output hidden states and the attention rows the method
asked for. On a GPU it replays from a CUDA graph per segment and shape; its inputs are padded to a multiple of
CAPACITY_STEP (at their end: no real row sees them) so that a few graphs cover every
prompt, and its outputs cut back, so the sequence the runtime keeps has no padding. What stays eager is the
drop between segments (the method's choice and the compaction, whose width is read back) and moving the
entries to the cache decoding continues on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import question_rows
from ..graphs import GraphCache
from ..hooks import capture_outputs
from ..sequence import attention_mask_4d
from .static_cache import CAPACITY_STEP


@dataclass
class LayerEntries:
    """One LLM layer's keys and values (B, H, W, d) after the prefill."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class PrefillEntries:
    """What the segments left per LLM layer (views of the scratch cache), until they are moved to the cache
    decoding continues on: shaped as a cache's `layers`."""

    layers: list[LayerEntries]


def padded_width(width: int) -> int:
    return -(-width // CAPACITY_STEP) * CAPACITY_STEP


class SegmentedPrefill:
    """The scratch cache and the segments' CUDA graphs of one applied model."""

    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self._capacity = 0  # the scratch cache's slots: each layer's attention runs over all of them, masked
        self._scratch = None
        self._scratch_key: tuple | None = None
        self._graphs: GraphCache | None = None

    def start(self, batch: int, width: int, like: torch.Tensor) -> PrefillEntries:
        """Ready the scratch cache for a prompt of `width` tokens; the entries are filled as segments run. The
        scratch only grows (to the longest prompt yet, padded): shorter prompts attend over its slots masked, and
        the graphs, which write its buffers and are made anew with it, stay valid whatever the prompt's length."""
        from transformers import StaticCache

        key = (batch, like.dtype, like.device)
        if key != self._scratch_key or padded_width(width) > self._capacity:
            self._scratch = self._graphs = None  # free the old buffers before allocating
            self._capacity = padded_width(width)
            self._scratch = StaticCache(config=self.adapter.text_config, max_cache_len=self._capacity)
            self._graphs = GraphCache(self._segment)
            self._scratch_key = key
        return PrefillEntries([None] * len(self.adapter.llm_layers))

    def run(self, entries: PrefillEntries, start: int, end: int, hidden: torch.Tensor, key_valid: torch.Tensor,
            position_embeddings: tuple[torch.Tensor, torch.Tensor], mask_dtype: torch.dtype | None,
            query_index: torch.Tensor | None, final: bool, graphs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LLM layers [start, end) over hidden (B, W, D), whose real tokens key_valid (B, W) marks: (their output,
        normed if `final`; where query_index (B, Q) is given, the attention rows (B, H, Q, W) of those queries in
        layer end - 1). Their entries go to `entries`. Replayed from a CUDA graph when `graphs` (the outputs are
        the graph's: use them before the next prefill)."""
        width = hidden.shape[1]
        more = padded_width(width) - width
        slots = F.pad(key_valid, (0, self._capacity - width))  # no real query sees a slot past the prompt's
        mask = None  # SDPA: is_causal (flash attention); a batch of one holds no padding but these rows, last
        if mask_dtype is not None:
            mask = attention_mask_4d(slots, width + more, mask_dtype, first_query=0)
        cos, sin = (F.pad(part, (0, 0, 0, more)) for part in position_embeddings)
        inputs = (F.pad(hidden, (0, 0, 0, more)), mask, cos, sin, query_index,
                  None if query_index is None else slots[:, : width + more])
        if graphs:
            output, rows = self._graphs(*inputs, key=(start, end, final))
        else:
            output, rows = self._segment(*inputs, start, end, final)
        for layer in range(start, end):
            scratch = self._scratch.layers[layer]
            entries.layers[layer] = LayerEntries(scratch.keys[:, :, :width], scratch.values[:, :, :width])
        return output[:, :width], None if rows is None else rows[..., :width]

    def _segment(self, hidden, mask, cos, sin, query_index, key_valid, start: int, end: int, final: bool):
        parts = self.adapter.decode_parts()
        rows = None
        for layer in range(start, end):
            self._scratch.layers[layer].reset()  # in the graph: this prefill's entries start at slot 0
            if query_index is not None and layer == end - 1:
                attention = self.adapter.attention_parts(layer)
                with capture_outputs(attention.q_proj, attention.k_proj) as outputs:
                    hidden = self._layer(parts, layer, hidden, mask, cos, sin)
                rows = question_rows(self.adapter, attention, *outputs, (cos, sin), query_index, key_valid)
            else:
                hidden = self._layer(parts, layer, hidden, mask, cos, sin)
        return (parts.norm(hidden) if final else hidden), rows

    def _layer(self, parts, layer: int, hidden, mask, cos, sin):
        return parts.layers[layer](hidden, attention_mask=mask, position_embeddings=(cos, sin), use_cache=True,
                                   **{self.adapter.cache_kwarg: self._scratch})
