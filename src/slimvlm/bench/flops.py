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
  Gemma 3's projector (the tower's patches average-pooled, then one linear map d_v -> D) per pooled token: 2 d_v D;
  LLM prefill (Llama, width D, H heads and H_kv key/value heads of size h, gated MLP width F), n tokens:
      4 n D H h (q, o) + 4 n D H_kv h (k, v) + 4 H h P (P query-key pairs, 2 h FLOPs for the score and 2 h
      for the value, per head) + 6 n D F (gate, up, down); plus 2 D V for the logits of the last token.
      Causal attention has P = n(n+1)/2 pairs; a sliding-window layer (a query sees the w keys up to itself)
      w(w+1)/2 + (n - w) w where n > w; each run of b visual tokens that attend to each other both ways (Gemma 3
      with token_type_ids) adds its b(b-1)/2 pairs of a token and a later one (the window bounds keys before a
      query only: transformers' AND(window, OR(causal, block))). Under
      virtual unmerging P counts the m copies the attention runs over while the rest counts n. Qwen3.5's
      full-attention layers project a gate beside each query (q twice as wide: 6 n D H h for q, o).
  Gated DeltaNet layer (Qwen3.5's linear attention; key and value heads H_k, H_v of sizes d_k, d_v, K = H_k d_k,
      V' = H_v d_v, a depthwise convolution of k taps), n tokens: 2 n D (2K + V') (q, k, v) + 2 n D V' (the
      output gate) + 4 n D H_v (the decay and write strength) + 2 n V' D (out) + 2 n k (2K + V') (convolution)
      + 6 n H_v d_k d_v (the delta rule in its recurrent form: the state read at the key, its rank-1 write and
      the read at the query) + 6 n D F; no term grows with the prompt, and a decode token costs what one
      prompt token does;
  LLM decode, per generated token, with c cache entries in a layer (the new token included):
      4 D H h + 4 D H_kv h + 4 H h c + 6 D F per layer (c at most w on a sliding-window layer), plus 2 D V.
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
    projector_layers: int = 2  # 1: one linear map to the LLM's width (Gemma 3's, after its pooling)


@dataclass(frozen=True)
class LinearAttentionShape:
    """A Gated DeltaNet layer's sizes (Qwen3.5's linear attention)."""

    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    conv_kernel: int


@dataclass(frozen=True)
class LLMShape:
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    layers: int
    layer_kinds: tuple[str, ...] = ()  # per layer, as text_config.layer_types names them; () every layer full attention
    window: int | None = None  # a sliding-window layer's: a query sees this many keys, itself included
    query_gate: bool = False  # full-attention layers project a gate beside each query (Qwen3.5)
    linear: LinearAttentionShape | None = None  # the linear-attention layers' sizes (Qwen3.5)

    def kind(self, layer: int) -> str:
        return self.layer_kinds[layer] if self.layer_kinds else "full_attention"

    def window_of(self, layer: int) -> int | None:
        return self.window if self.kind(layer) == "sliding_attention" else None


def qwen_vision_shape(v) -> VisionShape:
    """Qwen2-VL's ViT (width embed_dim, MLP embed_dim x mlp_ratio), Qwen2.5-VL's (width hidden_size, gated MLP),
    Qwen3-VL's (width hidden_size, plain MLP, a merger per DeepStack block beside the last one's) or Qwen3.5's (Qwen3-VL's
    without DeepStack)."""
    qwen2 = hasattr(v, "embed_dim")  # Qwen2-VL's vision hidden_size is the LLM's width
    deepstack = len(getattr(v, "deepstack_visual_indexes", None) or ())
    width = v.embed_dim if qwen2 else v.hidden_size
    merge = v.spatial_merge_size**2
    return VisionShape(
        width=width,
        mlp=int(width * v.mlp_ratio) if qwen2 else v.intermediate_size,
        patch=v.patch_size,
        channels=v.in_channels * v.temporal_patch_size,
        patches=None,
        mlp_matrices=3 if v.model_type == "qwen2_5_vl_vision" else 2,
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


def shapes(config) -> tuple[VisionShape, LLMShape]:
    """The sizes the formulas need, read from a LLaVA (-NeXT, -OneVision), Qwen2-VL (2.5-VL, 3-VL, 3.5), InternVL or Gemma 3
    config; a mixture of experts' MLP width is its active experts' (num_experts_per_tok x moe_intermediate_size, plus a
    shared expert's)."""
    v, t = config.vision_config, config.text_config
    if config.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
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
            projector_layers=1 if config.model_type == "gemma3" else 2,
        )
    return vision, llm_shape(t)


def llm_shape(t) -> LLMShape:
    """The LM's sizes from its text config; its layers' kinds from layer_types where it has them."""
    kinds = tuple(getattr(t, "layer_types", None) or ())
    unknown = set(kinds) - {"full_attention", "sliding_attention", "linear_attention"}
    if unknown:
        raise SlimVLMError(f"slimvlm's FLOPs count has no formula for {t.model_type}'s {sorted(unknown)} layers; "
                           "time it with slimvlm bench-generate (wall-clock, no FLOPs)")
    mlp = t.intermediate_size
    if hasattr(t, "moe_intermediate_size"):
        mlp = t.num_experts_per_tok * t.moe_intermediate_size + (getattr(t, "shared_expert_intermediate_size", None) or 0)
    linear = None
    if "linear_attention" in kinds:
        linear = LinearAttentionShape(key_heads=t.linear_num_key_heads, value_heads=t.linear_num_value_heads,
                                      key_dim=t.linear_key_head_dim, value_dim=t.linear_value_head_dim,
                                      conv_kernel=t.linear_conv_kernel_dim)
    return LLMShape(
        width=t.hidden_size,
        heads=t.num_attention_heads,
        kv_heads=t.num_key_value_heads,
        head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        mlp=mlp,
        vocab=t.vocab_size,
        layers=t.num_hidden_layers,
        layer_kinds=kinds,
        window=getattr(t, "sliding_window", None) if "sliding_attention" in kinds else None,
        query_gate=t.model_type in ("qwen3_5_text", "qwen3_5_moe_text"),
        linear=linear,
    )


def vision_layer_flops(v: VisionShape, n: int) -> int:
    return 8 * n * v.width**2 + 4 * n * n * v.width + 2 * v.mlp_matrices * n * v.width * v.mlp


def patch_embedding_flops(v: VisionShape, patches: int | None = None) -> int:
    """Of one image (v.patches), or of `patches` patches."""
    return 2 * (v.patches if patches is None else patches) * v.channels * v.patch**2 * v.width


def projector_flops(v: VisionShape, t: LLMShape, n: int) -> int:
    inputs = v.merge * v.width
    if v.projector_layers == 1:
        return v.projectors * n * 2 * inputs * t.width
    hidden = v.projector_hidden or t.width
    return v.projectors * n * (2 * inputs * hidden + 2 * hidden * t.width)


def attention_pairs(n: int, window: int | None = None) -> int:
    """Query-key pairs of n tokens' causal attention, within a window of w keys (itself included) where given."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def two_way_pairs(runs: list[int]) -> int:
    """The pairs that runs of visual tokens attending to each other both ways add to the causal count: in a run of b,
    each token's b(b-1)/2 pairs with a later one (a sliding window bounds the keys before a query, not after it)."""
    return sum(b * (b - 1) // 2 for b in runs)


def attention_projection_flops(t: LLMShape, n: int) -> int:
    """q, k, v and o of a (full or sliding) attention layer over n tokens."""
    query = 3 if t.query_gate else 2  # the query and output projections' 2 + the gate's 1, in units of 2 n D H h
    return 2 * query * n * t.width * t.heads * t.head_dim + 4 * n * t.width * t.kv_heads * t.head_dim


def linear_attention_flops(t: LLMShape, n: int) -> int:
    """A Gated DeltaNet layer's token mixing over n tokens (the module docstring's formula)."""
    s = t.linear
    keys, values = s.key_heads * s.key_dim, s.value_heads * s.value_dim
    mixed = 2 * keys + values  # the q, k, v channels the convolution runs over
    projections = 2 * n * t.width * mixed + 2 * n * t.width * values + 4 * n * t.width * s.value_heads
    projections += 2 * n * values * t.width
    return projections + 2 * n * s.conv_kernel * mixed + 6 * n * s.value_heads * s.key_dim * s.value_dim


def mlp_flops(t: LLMShape, n: int) -> int:
    return 6 * n * t.width * t.mlp


def llm_layer_prefill_flops(t: LLMShape, n: int, attended: int | None = None, layer: int = 0,
                            runs: list[int] = ()) -> int:
    """n tokens through LLM layer `layer`; `attended` tokens in its attention (more than n under virtual unmerging,
    whose attention runs over every merged token's copies); `runs`: the lengths of its runs of visual tokens that
    attend both ways."""
    if t.kind(layer) == "linear_attention":
        return linear_attention_flops(t, n) + mlp_flops(t, n)
    m = n if attended is None else attended
    window = t.window_of(layer)
    pairs = attention_pairs(m, window) + two_way_pairs(runs)
    return attention_projection_flops(t, n) + 4 * t.heads * t.head_dim * pairs + mlp_flops(t, n)


def llm_layer_decode_flops(t: LLMShape, cache_entries: int, layer: int = 0) -> int:
    """One generated token through LLM layer `layer`, whose cache holds `cache_entries` (the new token's included)."""
    if t.kind(layer) == "linear_attention":
        return linear_attention_flops(t, 1) + mlp_flops(t, 1)
    window = t.window_of(layer)
    attended = cache_entries if window is None else min(cache_entries, window)
    return attention_projection_flops(t, 1) + 4 * t.heads * t.head_dim * attended + mlp_flops(t, 1)


def two_way_runs_of(stats, layer: int) -> list:
    """Per sample, the runs of visual tokens that attend both ways in LLM layer `layer` (none on a causal LM)."""
    return stats.two_way_runs[layer] if stats.two_way_runs else [()] * len(stats.llm_tokens[layer])


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
    prefill over them; stats.two_way_runs: per LLM layer, per sample, the lengths of its runs of visual tokens that
    attend to each other both ways (none where the LM's masks are causal)."""
    v, t = shapes(config)
    if v.patches is None:  # each image its own: the first layer's segments hold every patch (no stage 1 there)
        embedding = patch_embedding_flops(v, sum(stats.vision_tokens[0]) if stats.vision_tokens else 0)
    else:
        embedding = (len(stats.vision_tokens[0]) if stats.vision_tokens else 0) * patch_embedding_flops(v)
    vision = embedding + sum(vision_layer_flops(v, n) for layer in stats.vision_tokens for n in layer)
    projector = sum(projector_flops(v, t, n) for n in stats.projector_tokens)
    attended = stats.attention_tokens or stats.llm_tokens
    llm = sum(
        llm_layer_prefill_flops(t, n, m, layer, runs)
        for layer, (tokens, attention) in enumerate(zip(stats.llm_tokens, attended))
        for n, m, runs in zip(tokens, attention, two_way_runs_of(stats, layer))
    )
    llm += len(stats.prompt_tokens) * logits_flops(t)
    # a decode step attends over the cache, or over its copies under virtual unmerging
    extra = [[m - n for n, m in zip(tokens, attention)] for tokens, attention in zip(stats.llm_tokens, attended)]
    decode = sum(
        llm_layer_decode_flops(t, c + extra[layer][sample] + 1, layer)
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
