"""Loading a model for the CLI: a local folder, the embedded testbed, or a random model of a published shape."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SlimVLMError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TESTBED = Path(__file__).resolve().parent.parent / "testbed" / "weights"
# by the config's model_type, for a config that names no class ("architectures"); LLaVA-1.5 otherwise
MODEL_CLASSES = {"llava_next": "LlavaNextForConditionalGeneration", "llava_next_video": "LlavaNextVideoForConditionalGeneration",
                 "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                 "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
                 "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
                 "internvl": "InternVLForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}


def resolve_device(name: str) -> torch.device:
    """The device a --device names ("auto": CUDA when there is one); SlimVLMError for a name torch
    does not know, or for CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise SlimVLMError(f"bad --device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SlimVLMError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def model_class_name(folder: Path) -> str:
    """The transformers class of the checkpoint in `folder`: the one its config names, else the one its
    model_type implies. SlimVLMError when slimvlm has no adapter for it, before any weights are read."""
    from . import ADAPTERS

    config = json.loads((folder / "config.json").read_text())
    named = config.get("architectures") or [MODEL_CLASSES.get(config.get("model_type"), "LlavaForConditionalGeneration")]
    if named[0] not in ADAPTERS:
        raise SlimVLMError(
            f"{folder}: its config names {named[0]}, which slimvlm does not support; give a checkpoint of one of "
            f"{', '.join(ADAPTERS)}"
        )
    return named[0]


def load_model(spec: str, device: torch.device, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """(model, processor or None) for 'testbed', 'shape:NAME' (random weights) or a local folder.
    attn_implementation: as transformers' from_pretrained takes it ('sdpa', 'eager', 'flash_attention_2')."""
    if dtype not in DTYPES:
        raise SlimVLMError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if spec.startswith("shape:"):
        from ..bench.shapes import random_model

        return random_model(spec.removeprefix("shape:"), device, torch_dtype), None
    folder = TESTBED if spec == "testbed" else Path(spec)
    if not (folder / "config.json").exists():
        if spec == "testbed":
            raise SlimVLMError(
                f"the testbed model is not in this install ({folder} has no config.json); pass --model DIR with a "
                "local LLaVA folder, e.g. one made by `slimvlm make-tiny DIR`"
            )
        raise SlimVLMError(f"no model at {folder} (no config.json); give a local model folder, 'testbed' or 'shape:llava-1.5-7b'")
    import transformers
    from transformers import AutoProcessor

    model_class = getattr(transformers, model_class_name(folder))
    model = model_class.from_pretrained(
        folder, dtype=torch_dtype, attn_implementation=attn_implementation, local_files_only=True
    ).to(device).eval()
    processor = None
    if (folder / "processor_config.json").exists() or (folder / "preprocessor_config.json").exists():
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
    return model, processor
