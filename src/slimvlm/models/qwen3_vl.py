"""The Qwen3-VL adapter: Qwen3VLForConditionalGeneration (and Qwen3VLMoeForConditionalGeneration, the same but
for the LM's MLPs) = Qwen2-VL's layout (qwen2_vl.py: a ViT over each image or video at its own resolution, a merger
of every 2 x 2 block of patches into one LLM token, M-RoPE positions every kept token keeps), with:

- DeepStack: mergers on some ViT blocks (deepstack_visual_indexes) give each token K more features, which the LM
  adds to the outputs of its first K layers at the visual positions. They ride with the tokens
  (VisualTokens.layer_features): kept, dropped and merged as the tokens are by stages 1-2 (VisionZip's merge, a
  stage-2 selection), and hooks on those layers add them to the tokens each layer sees (runtime/layer_features.py),
  so after a stage-3 drop at layer k the layers before k add them to every token, those from k to the kept ones;
- interleaved M-RoPE (mrope_section spread over the rotary pairs in turn): the rotary embedding is the model's own,
  the positions its get_rope_index's, as on Qwen2-VL;
- a video's temporal steps are runs of placeholders of their own, a timestamp as text before each
  (<t seconds><|vision_start|>...<|vision_end|>), each at the 3D positions of a one-step grid: the rebuild puts each
  kept token at its own placeholder (tokens_at_origin), so every frame's tokens stay between its timestamps;
- a Qwen3 LM, whose attention norms queries and keys per head before RoPE (q_norm, k_norm): the attention rows
  that stage-3 methods score by go through them (AttentionParts.normed).

The methods that run and those refused are Qwen2-VL's, for the same reasons.
"""

from __future__ import annotations

import torch

from ..errors import SlimVLMError
from .qwen2_vl import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL images and videos (see the module's docstring): Qwen2-VL's adapter with DeepStack's features, a
    video's frames apart and each kept token at its own placeholder."""

    family = "qwen3-vl"
    name = "Qwen3-VL"
    frames_apart = True
    tokens_at_origin = True
    adds_layer_features = True
    whole_tower = ("its merger, and the DeepStack mergers on intermediate blocks, join each 2x2 block of patches in "
                   "place into one token")

    def check_inputs(self, arguments: dict) -> None:
        super().check_inputs(arguments)
        asked = arguments.get("output_router_logits")
        if asked is None:
            asked = getattr(self.text_config, "output_router_logits", False)
        if asked:
            raise SlimVLMError(
                "output_router_logits: slimvlm runs the LM on the reduced sequence and does not return Qwen3-VL-MoE's "
                "router logits or their auxiliary loss; pass output_router_logits=False (and leave the text config's "
                "off) while slimvlm is applied"
            )

    def synthetic_span(self, tokens: int, video_frames: int) -> list[int]:
        """A video's temporal steps each a run of its own between <|vision_start|> and <|vision_end|>, as the
        processor writes them (less the timestamp text before each, which benchmarks do without)."""
        if not video_frames:
            return super().synthetic_span(tokens, video_frames)
        steps = video_frames // self.vision_config.temporal_patch_size
        frame = [self.config.vision_start_token_id] + [self.config.video_token_id] * (tokens // steps)
        return (frame + [self.config.vision_end_token_id]) * steps

    def layer_features(self, output) -> list[torch.Tensor]:
        """Per item, its tokens' DeepStack features (n, K, D), one per LM layer they are added to. transformers
        before 5.25 hands each layer's features of all items joined: they are split as the items are."""
        sizes = [len(item) for item in output.pooler_output]
        per_layer = [torch.split(f, sizes) if isinstance(f, torch.Tensor) else f for f in output.deepstack_features]
        return [torch.stack(item, dim=1) for item in zip(*per_layer)]
