"""The Qwen3.5 adapter: Qwen3_5ForConditionalGeneration (and Qwen3_5MoeForConditionalGeneration) = Qwen3-VL's vision
side without DeepStack (qwen3_vl.py: a ViT over each image or video at its own resolution, a merger of every 2 x 2
block of patches into one token, interleaved M-RoPE, a video's temporal steps apart between their timestamps) and a
hybrid LM: three of every four layers Gated DeltaNet linear attention (a causal convolution, then a gated delta-rule
recurrence; its cache is a convolution state and a recurrent state per sequence, no per-token entries), the fourth full
attention whose query projection also gives a gate on its output, with M-RoPE on part of each head.

What runs, on the dynamic cache:
- the untouched model (`none`), every stage-2 method and VisionZip on the merged tokens: the LM takes the shorter
  sequence as a whole, its linear layers included, so the recurrent state never sees a dropped token;
- stage-3 drops (FastV, MustDrop's dual-attention filter): a drop at layer k hands every later layer the kept tokens
  alone, so each later linear layer's recurrence runs over them only and ends prefill in their state, from which
  decoding continues; each later full-attention layer attends causally over them at their own M-RoPE positions. Their
  scores are attention rows, which only the full-attention layers have: a method must score at one (a drop at k reads
  layer k - 1), and the rows are softmax(Q K^T) of each head's query (q_proj's first half; the gate, its second half,
  scales the attention's output, not its probabilities) after q_norm and the partial rotary (AttentionParts).
  After a drop each kind of layer gets the mask the model's own forward gives it: the causal mask of the kept tokens on
  full attention, the 2D padding mask (None without padding, or in a one-token decode step) on linear attention;
- all of the above on slimvlm's static cache (generate(cache_implementation="static")): its linear layers keep
  transformers' LinearAttentionLayer (convolution and recurrent states), filled by the LM's own forward or handed over
  from the dynamic cache after a drop, and take no mask in a decode step (runtime/static_cache.py).
What is refused, and why:
- stage 4 (MustDrop's output-aware cache): it cuts the cache of each layer after prefill, but a linear-attention
  layer's state mixes every token the layer ran over, with no entries to cut, and no state without them is at hand;
- Qwen's refusals for the rest (stage-1 methods inside the tower, pool, llava-mini, vtu).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers.masking_utils import create_recurrent_attention_mask

from ..errors import SlimVLMError
from ..method import Method, Stage
from ..sequence import Sequence
from .adapter import AttentionParts
from .qwen2_vl import QwenVLAdapter
from .qwen3_vl import Qwen3VLAdapter

FULL = "full_attention"
LINEAR = "linear_attention"
BEFORE_THE_LM = "visionzip (on the merged tokens) or a stage-2 method (divprune, random, uniform)"


class Qwen3_5Adapter(Qwen3VLAdapter):
    """Qwen3.5 images and videos (see the module's docstring): Qwen3-VL's adapter without DeepStack; stage-3 drops
    scored at full-attention layers, each kind of layer masked as the LM masks it."""

    family = "qwen3.5"
    name = "Qwen3.5"
    adds_layer_features = False
    masks_layer_kinds = True
    whole_tower = "its merger joins each 2x2 block of patches in place into one token"
    instead = (f"{BEFORE_THE_LM}, or a stage-3 drop scored at a full-attention layer (fastv, or "
               "mustdrop:lsm=false,important=false,output_cache=false: its LLM filter)")
    layer_features = QwenVLAdapter.layer_features

    @classmethod
    def refusal(cls, method: Method) -> str | None:
        reason = super().refusal(method)  # Qwen's first: a stage-1 method inside the tower, a patch grid, VTU
        if reason is None and Stage.DECODE in method.stages:
            return (f"{method.name} cuts each LLM layer's cache after prefill (stage 4), but Qwen3.5's linear-attention "
                    "layers (Gated DeltaNet) hold one recurrent state per sequence that mixes every token the layer ran "
                    f"over: no entries to cut; use {cls.instead}")
        return reason

    def check_method(self, method: Method) -> None:
        """Qwen's checks, then a stage-3 method's scoring layers: only full-attention layers have attention rows."""
        super().check_method(method)
        if method.queries is None:
            return
        for drop in method.drop_layers:
            if self.layer_kinds[drop - 1] != FULL:
                raise SlimVLMError(self._linear_scoring(method, drop))

    def _linear_scoring(self, method: Method, drop: int) -> str:
        """Why `method` cannot drop at `drop`, naming the full-attention layers it could score at instead."""
        last = len(self.layer_kinds) - 1  # a drop needs a layer after its scoring layer
        scoring = [layer for layer, kind in enumerate(self.layer_kinds) if kind == FULL and layer < last]
        reason = (f"{method.name} drops tokens at LLM layer {drop} by the attention rows of layer {drop - 1}, but layer "
                  f"{drop - 1} of {self.name}'s LM is linear attention (Gated DeltaNet: a recurrent state, no attention "
                  "rows); ")
        if not scoring:
            return reason + ("none of its full-attention layers has a layer after it to drop at, so no stage-3 drop runs "
                             f"on this checkpoint; use {BEFORE_THE_LM}")
        return reason + (f"score at a full-attention layer: {', '.join(map(str, scoring))} (a drop at the layer after: "
                         f"{', '.join(str(layer + 1) for layer in scoring)})")

    def attention_parts(self, layer: int) -> AttentionParts:
        """A full-attention layer's parts: its q_proj gives each head a query and an output gate."""
        return replace(super().attention_parts(layer), gated_query=True)

    # ---- the masks of each kind of layer after a drop ---------------------------------------------
    def view_prefill_mask(self, sequence: Sequence, hidden: torch.Tensor, mask_dtype: torch.dtype | None,
                          mask_inputs: dict) -> dict:
        """After a drop, per kind of layer, what the LM's own forward would give it over the kept tokens alone."""
        causal = super().view_prefill_mask(sequence, hidden, mask_dtype, mask_inputs)
        return self._per_kind(causal, sequence.valid, hidden)

    def view_decode_mask(self, view, steps: int, mask_dtype: torch.dtype | None, session, positions: torch.Tensor) -> dict:
        """A decode step's masks per kind of layer of the view: causal over the view's entries on full attention."""
        causal = super().view_decode_mask(view, steps, mask_dtype, session, positions)
        like = torch.empty(view.key_valid.shape[0], steps, 0, device=view.key_valid.device)
        return self._per_kind(causal, view.key_valid, like)

    def _per_kind(self, causal: torch.Tensor, valid: torch.Tensor, like: torch.Tensor) -> dict:
        """Full attention's causal mask beside linear attention's: the model's own 2D padding mask of the new tokens
        (`like`'s length), None where there is no padding or one token a row, as its forward makes it."""
        return {FULL: causal, LINEAR: create_recurrent_attention_mask(self.text_config, like, valid.long())}
