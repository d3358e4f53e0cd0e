"""load_model takes the class the checkpoint's config names, and refuses one slimvlm has no adapter for before
reading any weights."""

import json

import pytest
import torch

from slimvlm.errors import SlimVLMError
from slimvlm.models.loading import load_model, model_class_name


def test_the_class_comes_from_the_config(tiny_dir):
    model, _ = load_model(str(tiny_dir), torch.device("cpu"), attn_implementation="eager")
    assert model_class_name(tiny_dir) == type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config._attn_implementation == "eager"


def test_an_unsupported_class_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Idefics2ForConditionalGeneration"],
                                                      "model_type": "idefics2"}))
    with pytest.raises(SlimVLMError, match="Idefics2ForConditionalGeneration.*LlavaForConditionalGeneration"):
        load_model(str(tmp_path), torch.device("cpu"))
