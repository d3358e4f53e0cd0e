"""Random-weight models of published shapes, for GPU benchmarks without downloading weights."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)

from ..errors import SlimVLMError

# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px + Vicuna-7B (Llama-2-7B shape), 576 visual tokens
LLAVA_15_7B = dict(
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
    image_token_id=32000,
)
# LLaVA-NeXT-7B (llava-v1.6-vicuna-7b): the same tower and LM, AnyRes over these (height, width) grids of
# 336-px crops; a 672 x 672 image is a base view and 2 x 2 tiles, 576 + 48 x 49 = 2928 visual tokens
LLAVA_NEXT_7B = dict(LLAVA_15_7B, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
# LLaVA-NeXT-Video-7B (llava-hf/LLaVA-NeXT-Video-7B-hf): LLaVA-NeXT-7B's parts (its image token 32001, video 32000,
# Vicuna's RoPE stretched linearly by 2), frames average-pooled 2 x 2: a 32-frame video is 32 x 144 = 4608 tokens
LLAVA_NEXT_VIDEO_7B = dict(
    LLAVA_NEXT_7B,
    text=dict(LLAVA_15_7B["text"], rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    image_token_id=32001,
    video_token_id=32000,
)
# LLaVA-OneVision-7B (llava-onevision-qwen2-7b-ov-hf): SigLIP so400m-patch14-384 (27 x 27 patches, no class
# token) of which the checkpoint keeps 26 of 27 layers and reads the last (vision_feature_layer -1), Qwen2-7B,
# pinpoints of 1-6 x 1-6 crops of 384 px, anyres_max_9. The benchmark's images (the most tokens without a resize:
# 1920 x 768, 5 x 2 tiles) are 729 + 135 x 55 = 8154 visual tokens.
LLAVA_ONEVISION_7B = dict(
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                image_size=384, patch_size=14, vision_use_head=False),
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False),
    image_token_id=151646,
    video_token_id=151647,
    image_grid_pinpoints=[[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)],
)
# Qwen2.5-VL-7B-Instruct (its config.json): a 32-block ViT of width 1280 with 112-px windows but in blocks 7, 15,
# 23, 31, a merger of 2 x 2 patches to the LM's 3584, a Qwen2-7B-shape LM with M-RoPE; the bench's images are
# 644 x 644 px (models/qwen2_vl.py SYNTHETIC_SIDE): 46 x 46 patches, 529 visual tokens
QWEN25_VL_7B = dict(
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu"),
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                     use_sliding_window=False, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)
# Qwen3-VL-8B-Instruct (Qwen/Qwen3-VL-8B-Instruct, its config.json): a 27-block ViT of width 1152 with 16-px patches
# whose blocks 8, 16 and 24 feed DeepStack mergers, a merger of 2 x 2 patches to the LM's 4096, a Qwen3-8B-shape LM
# (36 layers, 32 heads, 8 KV heads of 128, q/k norms) with interleaved M-RoPE sections 24/20/20; the bench's images
# are 644 px (models/qwen2_vl.py SYNTHETIC_SIDE) cut to 40 x 40 patches of 16 px: 400 visual tokens
QWEN3_VL_8B = dict(
    vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                       num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh"),
    text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                     rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                         "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                     tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)
# InternVL3-8B (OpenGVLab/InternVL3-8B-hf, its config.json): InternViT-300M-448px-V2.5 (24 layers of width 1024, layer
# scale, no q/k norms, mean pooling: no final norm), a pixel shuffle of 2 x 2 patches and an MLP projector to a
# Qwen2.5-7B-shape LM; each 448-px tile (and an image's thumbnail) is 32 x 32 patches, 256 visual tokens
INTERNVL3_8B = dict(
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=[448, 448], patch_size=[14, 14], attention_bias=True, use_qk_norm=False,
                       norm_type="layer_norm", layer_norm_eps=1e-6, layer_scale_init_value=0.1, use_mean_pooling=True,
                       hidden_act="gelu"),
    text_config=dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=151674, max_position_embeddings=32768,
                     rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                     use_sliding_window=False, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
    image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
    vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
)
# Gemma 3 12B (google/gemma-3-12b-it, its config.json): SigLIP so400m (27 layers of width 1152, 14-px patches, no head)
# at 896 px, pooled 64 x 64 -> 16 x 16 = 256 visual tokens, and a 48-layer LM of width 3840, 16 heads, 8 KV heads of
# 256, five sliding-window layers (window 1024, rope base 1e4) to one global (rope base 1e6, linear scaling x 8)
GEMMA3_12B = dict(
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=896, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                       vision_use_head=False),
    text_config=dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                     vocab_size=262208, max_position_embeddings=131072, rms_norm_eps=1e-6,
                     hidden_activation="gelu_pytorch_tanh",
                     rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    mm_tokens_per_image=256, image_token_index=262144, boi_token_index=255999, eoi_token_index=256000,
)
# built from their spec as it is
SPEC_CONFIGS = {"qwen2.5-vl-7b": Qwen2_5_VLConfig, "qwen3-vl-8b": Qwen3VLConfig, "internvl3-8b": InternVLConfig,
                "gemma-3-12b": Gemma3Config}

SHAPES = {"llava-1.5-7b": LLAVA_15_7B, "llava-next-7b": LLAVA_NEXT_7B, "llava-next-video-7b": LLAVA_NEXT_VIDEO_7B,
          "llava-onevision-7b": LLAVA_ONEVISION_7B, "qwen2.5-vl-7b": QWEN25_VL_7B, "qwen3-vl-8b": QWEN3_VL_8B,
          "internvl3-8b": INTERNVL3_8B, "gemma-3-12b": GEMMA3_12B}
MODEL_CLASSES = {
    LlavaConfig: LlavaForConditionalGeneration,
    LlavaNextConfig: LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig: LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig: LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig: Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig: Qwen3VLForConditionalGeneration,
    InternVLConfig: InternVLForConditionalGeneration,
    Gemma3Config: Gemma3ForConditionalGeneration,
}


def shape_config(name: str) -> (LlavaConfig | LlavaNextConfig | LlavaNextVideoConfig | LlavaOnevisionConfig
                                | Qwen2_5_VLConfig | Qwen3VLConfig | InternVLConfig | Gemma3Config):
    if name not in SHAPES:
        raise SlimVLMError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    spec = SHAPES[name]
    if name in SPEC_CONFIGS:
        return SPEC_CONFIGS[name](**spec)
    if name == "llava-onevision-7b":
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**spec["vision"]),
            text_config=Qwen2Config(**spec["text"]),
            image_token_index=spec["image_token_id"],
            video_token_index=spec["video_token_id"],
            image_grid_pinpoints=spec["image_grid_pinpoints"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=False,
        )
    common = dict(
        vision_config=CLIPVisionConfig(**spec["vision"]),
        text_config=LlamaConfig(**spec["text"]),
        image_token_id=spec["image_token_id"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    if "video_token_id" in spec:
        return LlavaNextVideoConfig(**common, image_grid_pinpoints=spec["image_grid_pinpoints"], video_token_id=spec["video_token_id"],
                                    spatial_pool_mode="average", spatial_pool_stride=2)
    if "image_grid_pinpoints" in spec:
        return LlavaNextConfig(**common, image_grid_pinpoints=spec["image_grid_pinpoints"])
    return LlavaConfig(**common)


def random_model(name: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A model of a published shape with random weights, built on `device`."""
    config = shape_config(name)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = MODEL_CLASSES[type(config)]._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()
