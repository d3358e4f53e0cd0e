"""Random-weight models of published shapes, for GPU benchmarks without downloading weights."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
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

SHAPES = {"llava-1.5-7b": LLAVA_15_7B, "llava-next-7b": LLAVA_NEXT_7B}


def shape_config(name: str) -> LlavaConfig | LlavaNextConfig:
    if name not in SHAPES:
        raise SlimVLMError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    spec = SHAPES[name]
    common = dict(
        vision_config=CLIPVisionConfig(**spec["vision"]),
        text_config=LlamaConfig(**spec["text"]),
        image_token_id=spec["image_token_id"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    if "image_grid_pinpoints" in spec:
        return LlavaNextConfig(**common, image_grid_pinpoints=spec["image_grid_pinpoints"])
    return LlavaConfig(**common)


def random_model(name: str, device: torch.device, dtype: torch.dtype) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """A model of a published shape with random weights, built on `device`."""
    config = shape_config(name)
    config._attn_implementation = "sdpa"
    model_class = LlavaNextForConditionalGeneration if isinstance(config, LlavaNextConfig) else LlavaForConditionalGeneration
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()
