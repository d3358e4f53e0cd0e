"""Analytic FLOPs per stage, from a model's config and the token counts a run actually had.

One multiply-add counts as 2 FLOPs. Per layer, with n tokens:
  vision encoder (CLIP, width d, MLP width f):  8 n d^2 (q, k, v, out) + 4 n^2 d (scores, values) + 4 n d f (MLP);
      Qwen2.5-VL's gated MLP 6 n d f; where attention runs per segment (Qwen: per image frame, 2.5's windowed
      blocks per window) the n^2 term is per segment (stats.vision_tokens then lists the segments);
  patch embedding, once per image: 2 P (3 p^2) d for P patches of p x p pixels (Qwen: 3 x 2 p^2, two
      frames a patch, P per image from its grid);
  projector (LLaVA MLP, vision width d_v -> LLM width D), per visual token: 2 d_v D + 2 D D; Qwen's merger
      (4 patches of width d_v joined, an MLP of width 4 d_v to D) per token: 2 (4 d_v)^2 + 2 (4 d_v) D, on
      Qwen3-VL once more per DeepStack merger (the LM's additions of their outputs are not counted); InternVL's
      (4 patches of width d_v joined by the pixel shuffle, an MLP to D) per token: 2 (4 d_v) D + 2 D D;
  LLM prefill (Llama, width D, H heads and H_kv key/value heads of size h, gated MLP width F), n tokens:
      4 n D H h (q, o) + 4 n D H_kv h (k, v) + 2 H h n (n + 1) (causal attention: n(n+1)/2 query-key
      pairs, 2 h FLOPs for the score and 2 h for the value, per head) + 6 n D F (gate, up, down);
      plus 2 D V for the logits of the last token; under virtual unmerging the attention term
      counts the m copies the attention runs over (2 H h m (m + 1)) while the rest counts n;
  LLM decode, per generated token, with c cache entries in a layer (the new token included):
      4 D H h + 4 D H_kv h + 4 H h c + 6 D F per layer, plus 2 D V.
Token merging/matching, attention-row scoring and selection are not counted: they are O(n) to
O(n r) per image and small next to the terms above.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SlimVLMError


@dataclass(frozen=True)
class VisionShape:
    width: int
    mlp: int
    patch: int
    channels: int  # values per pixel of a patch (Qwen: channels x frames a patch spans)
    patches: int | None  # per image; None where each image has its own (Qwen: from stats.vision_tokens)
    mlp_matrices: int = 2  # 3 for a gated MLP
    merge: int = 1  # encoder tokens joined into one projector input (Qwen: 2 x 2)
    projector_hidden: int | None = None  # the projector MLP's hidden width; None: the LLM's
    projectors: int = 1  # projector runs per token (Qwen3-VL: the merger and its DeepStack mergers)


@dataclass(frozen=True)
class LLMShape:
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    layers: int


def qwen_vision_shape(v) -> VisionShape:
    """Qwen2-VL's ViT (width embed_dim, MLP embed_dim x mlp_ratio), Qwen2.5-VL's (width hidden_size, gated MLP) or
    Qwen3-VL's (width hidden_size, plain MLP, a merger per DeepStack block beside the last one's)."""
    qwen2 = hasattr(v, "embed_dim")  # Qwen2-VL's vision hidden_size is the LLM's width
    deepstack = len(getattr(v, "deepstack_visual_indexes", ()))
    width = v.embed_dim if qwen2 else v.hidden_size
    merge = v.spatial_merge_size**2
    return VisionShape(
        width=width,
        mlp=int(width * v.mlp_ratio) if qwen2 else v.intermediate_size,
        patch=v.patch_size,
        channels=v.in_channels * v.temporal_patch_size,
        patches=None,
        mlp_matrices=2 if qwen2 or deepstack else 3,
        merge=merge,
        projector_hidden=merge * width,
        projectors=1 + deepstack,
    )


def internvl_vision_shape(config) -> VisionShape:
    """InternViT (a plain MLP) over each tile's patches, then the pixel shuffle: 1 / downsample_ratio squared patches
    of width d_v joined into one projector input, an MLP to the LLM's width."""
    v = config.vision_config
    (height, width), (patch, patch_width) = v.image_size, v.patch_size
    return VisionShape(width=v.hidden_size, mlp=v.intermediate_size, patch=patch, channels=v.num_channels,
                       patches=(height // patch) * (width // patch_width), merge=round(1 / config.downsample_ratio) ** 2)


def uncovered(config) -> str | None:
    """What of the model's LM the formulas here do not count, or None: a hybrid LM's linear-attention layers
    (Qwen3.5), sliding-window layers (Gemma 3: their attention spans the window, not the prompt)."""
    layer_types = set(getattr(config.text_config, "layer_types", None) or ())
    if "linear_attention" in layer_types:
        return f"the linear-attention layers of {config.model_type}'s hybrid LM"
    if "sliding_attention" in layer_types:
        return f"the sliding-window layers of {config.model_type}'s LM"
    return None


def covers(config) -> bool:
    """Whether the formulas here hold for the model (uncovered)."""
    return uncovered(config) is None


def shapes(config) -> tuple[VisionShape, LLMShape]:
    """The sizes the formulas need, read from a LLaVA (-NeXT), Qwen2-VL (2.5-VL, 3-VL) or InternVL config; a mixture of experts'
    MLP width is its active experts' (num_experts_per_tok x moe_intermediate_size)."""
    v, t = config.vision_config, config.text_config
    if not covers(config):
        raise SlimVLMError(
            f"slimvlm's FLOPs count has no formula for {uncovered(config)} yet; "
            "time it with slimvlm bench-generate (wall-clock, no FLOPs)"
        )
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    if config.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        vision = qwen_vision_shape(v)
    elif config.model_type == "internvl":
        vision = internvl_vision_shape(config)
    else:
        vision = VisionShape(
            width=v.hidden_size,
            mlp=v.intermediate_size,
            patch=v.patch_size,
            channels=v.num_channels,
            patches=(v.image_size // v.patch_size) ** 2,
        )
    llm = LLMShape(
        width=t.hidden_size,
        heads=t.num_attention_heads,
        kv_heads=t.num_key_value_heads,
        head_dim=head_dim,
        mlp=t.num_experts_per_tok * t.moe_intermediate_size if hasattr(t, "moe_intermediate_size") else t.intermediate_size,
        vocab=t.vocab_size,
        layers=t.num_hidden_layers,
    )
    return vision, llm


def vision_layer_flops(v: VisionShape, n: int) -> int:
    return 8 * n * v.width**2 + 4 * n * n * v.width + 2 * v.mlp_matrices * n * v.width * v.mlp


def patch_embedding_flops(v: VisionShape, patches: int | None = None) -> int:
    """Of one image (v.patches), or of `patches` patches."""
    return 2 * (v.patches if patches is None else patches) * v.channels * v.patch**2 * v.width


def projector_flops(v: VisionShape, t: LLMShape, n: int) -> int:
    hidden = v.projector_hidden or t.width
    return v.projectors * n * (2 * v.merge * v.width * hidden + 2 * hidden * t.width)


def llm_layer_prefill_flops(t: LLMShape, n: int, attended: int | None = None) -> int:
    """n tokens through the layer; `attended` tokens in its attention (more than n under virtual
    unmerging, whose attention runs over every merged token's copies)."""
    m = n if attended is None else attended
    projections = 4 * n * t.width * t.heads * t.head_dim + 4 * n * t.width * t.kv_heads * t.head_dim
    attention = 2 * t.heads * t.head_dim * m * (m + 1)
    return projections + attention + 6 * n * t.width * t.mlp


def llm_layer_decode_flops(t: LLMShape, cache_entries: int) -> int:
    projections = 4 * t.width * t.heads * t.head_dim + 4 * t.width * t.kv_heads * t.head_dim
    return projections + 4 * t.heads * t.head_dim * cache_entries + 6 * t.width * t.mlp


def logits_flops(t: LLMShape) -> int:
    return 2 * t.width * t.vocab


@dataclass
class StageFlops:
    """FLOPs of one forward, per stage, summed over the batch."""

    vision: int
    projector: int
    llm_prefill: int
    decode_per_token: int
    fusion: int = 0

    @property
    def prefill(self) -> int:
        """Everything before the first token: encoder + projector + stage-2 fusion + LLM prefill."""
        return self.vision + self.projector + self.fusion + self.llm_prefill


def count(config, stats) -> StageFlops:
    """FLOPs of the forward that `stats` (a slimvlm Stats) describes.

    stats.vision_tokens: per vision layer, per image (per attention segment on Qwen), tokens at its input; stats.llm_tokens: per
    LLM layer, per sample, tokens in prefill; stats.kv_entries: per sample, per layer, cache entries
    after prefill; stats.projector_tokens: per image, tokens through the projector (stage-2
    methods select after it, so they do not shrink this term); stats.fusion_tokens: per stage-2
    fusion layer (LLaVA-Mini's pre-fusion), per sample, its tokens, each costing an LLM layer's
    prefill over them."""
    v, t = shapes(config)
    if v.patches is None:  # each image its own: the first layer's segments hold every patch (no stage 1 there)
        embedding = patch_embedding_flops(v, sum(stats.vision_tokens[0]) if stats.vision_tokens else 0)
    else:
        embedding = (len(stats.vision_tokens[0]) if stats.vision_tokens else 0) * patch_embedding_flops(v)
    vision = embedding + sum(vision_layer_flops(v, n) for layer in stats.vision_tokens for n in layer)
    projector = sum(projector_flops(v, t, n) for n in stats.projector_tokens)
    attended = stats.attention_tokens or stats.llm_tokens
    llm = sum(
        llm_layer_prefill_flops(t, n, m)
        for tokens, attention in zip(stats.llm_tokens, attended)
        for n, m in zip(tokens, attention)
    )
    llm += len(stats.prompt_tokens) * logits_flops(t)
    # a decode step attends over the cache, or over its copies under virtual unmerging
    extra = [[m - n for n, m in zip(tokens, attention)] for tokens, attention in zip(stats.llm_tokens, attended)]
    decode = sum(
        llm_layer_decode_flops(t, c + extra[layer][sample] + 1)
        for sample, entries in enumerate(stats.kv_entries)
        for layer, c in enumerate(entries)
    )
    decode += len(stats.kv_entries) * logits_flops(t)
    fusion = sum(llm_layer_prefill_flops(t, n) for layer in stats.fusion_tokens for n in layer)
    return StageFlops(vision=vision, projector=projector, llm_prefill=llm, decode_per_token=decode, fusion=fusion)


def kv_bytes(config, entries: int, bytes_per_value: int) -> int:
    """Bytes of KV cache that `entries` cache entries (summed over layers) take: keys and values of
    every key/value head."""
    _, t = shapes(config)
    return entries * 2 * t.kv_heads * t.head_dim * bytes_per_value
