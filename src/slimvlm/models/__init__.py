"""Model adapters: one per family, the only code that knows a family's module names."""

from __future__ import annotations

from torch import nn

from ..errors import SlimVLMError
from .adapter import LanguageModelAdapter
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import QwenVLAdapter
from .qwen3_5 import Qwen3_5Adapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "LlavaNextVideoForConditionalGeneration": LlavaNextVideoAdapter,
    "LlavaOnevisionForConditionalGeneration": LlavaOnevisionAdapter,
    "Qwen2VLForConditionalGeneration": QwenVLAdapter,
    "Qwen2_5_VLForConditionalGeneration": QwenVLAdapter,
    "Qwen3VLForConditionalGeneration": Qwen3VLAdapter,
    "Qwen3VLMoeForConditionalGeneration": Qwen3VLAdapter,
    "Qwen3_5ForConditionalGeneration": Qwen3_5Adapter,
    "Qwen3_5MoeForConditionalGeneration": Qwen3_5Adapter,
    "InternVLForConditionalGeneration": InternVLAdapter,
    "Gemma3ForConditionalGeneration": Gemma3Adapter,
}


def adapter_for(model: nn.Module) -> LanguageModelAdapter:
    """The adapter of the model's family, or a clear error naming the supported classes."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise SlimVLMError(
            f"slimvlm has no adapter for {name}; supported model classes: {', '.join(ADAPTERS)} "
            "(load your checkpoint with one of them)"
        )
    return ADAPTERS[name](model)
