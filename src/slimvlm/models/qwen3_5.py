"""The Qwen3.5 adapter: Qwen3_5ForConditionalGeneration (and Qwen3_5MoeForConditionalGeneration) = Qwen3-VL's vision
side without DeepStack (qwen3_vl.py: a ViT over each image or video at its own resolution, a merger of every 2 x 2
block of patches into one token, interleaved M-RoPE, a video's temporal steps apart between their timestamps) and a
hybrid LM: three of every four layers Gated DeltaNet linear attention, the fourth full attention with a gated output.

What runs: the untouched model (`none`) and every stage-2 method (and VisionZip on the merged tokens), on the dynamic
cache: the LM then takes the shorter sequence as a whole, its linear layers included, so the recurrent state never
sees a dropped token. What is refused, and why:
- stages 3-4 (FastV, MustDrop's LLM filter and cache, virtual unmerging): they drop tokens or cache entries between
  attention layers by per-layer masks and cache cuts; a linear-attention layer keeps one recurrent state per sequence
  and no per-token entries, so a drop there must re-run the recurrence over the kept tokens, which slimvlm does not
  do yet;
- slimvlm's static cache (generate(cache_implementation="static")): it holds per-token keys and values for every
  layer, not the linear layers' convolution and recurrent states;
- Qwen's refusals for the rest (stage-1 methods inside the tower, pool, llava-mini).
"""

from __future__ import annotations

from ..method import Method, Stage
from .qwen2_vl import QwenVLAdapter
from .qwen3_vl import Qwen3VLAdapter


class Qwen3_5Adapter(Qwen3VLAdapter):
    """Qwen3.5 images and videos (see the module's docstring): Qwen3-VL's adapter without DeepStack, stages 1-2 on the
    dynamic cache."""

    family = "qwen3.5"
    name = "Qwen3.5"
    adds_layer_features = False
    whole_tower = "its merger joins each 2x2 block of patches in place into one token"
    static_cache_refusal = (
        "Qwen3.5's LM keeps a recurrent state (and a convolution state) in its linear-attention layers, which slimvlm's "
        "static cache does not hold; generate without cache_implementation='static' (the dynamic cache runs every "
        "method Qwen3.5 takes)"
    )
    instead = "visionzip (on the merged tokens) or a stage-2 method (divprune, random, uniform)"
    layer_features = QwenVLAdapter.layer_features

    @classmethod
    def refusal(cls, method: Method) -> str | None:
        reason = super().refusal(method)  # Qwen's first: a stage-1 method inside the tower, a patch grid, VTU
        if reason is None and {Stage.PREFILL, Stage.DECODE} & set(method.stages):
            return (f"{method.name} drops tokens or cache entries inside the LM (stages 3-4), and three of every four of "
                    "Qwen3.5's LM layers are linear attention (Gated DeltaNet): one recurrent state per sequence, no "
                    "per-token entries to drop, so a drop would have to re-run the recurrence over the kept tokens, "
                    f"which slimvlm does not do yet; use {cls.instead}")
        return reason
