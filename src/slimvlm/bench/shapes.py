"""Random-weight models of published shapes, for GPU benchmarks without downloading weights."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from ..errors import SlimVLMError

# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px + Vicuna-7B (Llama-2-7B shape), 576 visual tokens
LLAVA_15_7B = dict(
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
    image_token_id=32000,
)

SHAPES = {"llava-1.5-7b": LLAVA_15_7B}


def shape_config(name: str) -> LlavaConfig:
    if name not in SHAPES:
        raise SlimVLMError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    spec = SHAPES[name]
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**spec["vision"]),
        text_config=LlamaConfig(**spec["text"]),
        image_token_id=spec["image_token_id"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def random_model(name: str, device: torch.device, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """A LlavaForConditionalGeneration of a published shape with random weights, built on `device`."""
    config = shape_config(name)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()
