"""Bad input raises a clear SlimVLMError naming the problem and the fix."""

import pytest
import torch
from torch import nn

import slimvlm
from slimvlm import SlimVLMError
from conftest import batch


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nonsense", "unknown method 'nonsense'"),
        ("tome:q=3", "has no option q; its options: r, proportional_attention"),
        ("tome:r", "write options as key=value"),
        ("fastv:ratio=0", "outside (0, 1]"),
        ("fastv:ratio=1.5", "outside (0, 1]"),
        ("divprune:budget=0", "must be at least 1 token"),
        ("divprune:budget=600", "larger than the 576 tokens"),
        ("random:budget=3,ratio=0.5", "exactly one of budget"),
        ("pool:budget=50", "square budget"),
        ("fastv:k=4", "has 4 layers"),
        ("fastv:k=0", "must be >= 1"),
        ("visionzip:dominant=500,contextual=100", "keep more tokens than the 576 of the largest visual item"),
        ("tome:r=-1", "must be >= 0"),
    ],
)
def test_bad_method_specs(fresh, spec, message):
    model, _ = fresh
    with pytest.raises(SlimVLMError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        slimvlm.apply(model, spec)
    assert "forward" not in model.__dict__


def test_incompatible_combination(fresh):
    model, _ = fresh
    with pytest.raises(SlimVLMError, match="both act at stage 1"):
        slimvlm.apply(model, ["tome:r=8", "visionzip"])
    with pytest.raises(SlimVLMError, match="both act at stage 2"):
        slimvlm.apply(model, ["divprune:budget=64", "uniform:budget=64"])


def test_model_without_adapter():
    with pytest.raises(SlimVLMError, match="no adapter for Linear; supported model classes: LlavaForConditionalGeneration"):
        slimvlm.apply(nn.Linear(2, 2), "none")


def test_prompt_without_image_placeholder(fresh):
    model, processor = fresh
    inputs = batch(processor, 1)
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, 5)
    with slimvlm.apply(model, "none"), pytest.raises(SlimVLMError, match="no image placeholder"):
        model(**inputs)


def test_placeholder_count_mismatch(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    inputs["pixel_values"] = inputs["pixel_values"][:1]
    with slimvlm.apply(model, "none"), pytest.raises(SlimVLMError, match="1 image\\(s\\) need 576"):
        model(**inputs)


def test_applied_twice_and_options_with_a_list(fresh):
    model, _ = fresh
    with slimvlm.apply(model, "none"):
        with pytest.raises(SlimVLMError, match="already applied"):
            slimvlm.apply(model, "tome")
    with pytest.raises(SlimVLMError, match="single method"):
        slimvlm.apply(model, ["tome", "fastv"], r=4)


def test_stage3_needs_an_attention_it_can_mask(fresh):
    model, _ = fresh
    model.config.text_config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(SlimVLMError, match="needs attn_implementation 'sdpa' or 'eager'"):
            slimvlm.apply(model, "fastv")
    finally:
        model.config.text_config._attn_implementation = "sdpa"


def test_methods_listing():
    listing = slimvlm.methods()
    for name in ("none", "random", "uniform", "pool", "tome", "fastv", "visionzip", "divprune"):
        assert listing[name]["description"]
    assert listing["tome"]["stages"] == ["encode"]
    assert listing["fastv"]["stages"] == ["prefill"]
    assert listing["fastv"]["options"] == {"k": 2, "ratio": 0.5}
    assert listing["visionzip"]["options"] == {"dominant": 54, "contextual": 10, "dominant_ratio": None, "contextual_ratio": None}


def test_slimvlm_methods_names_the_families_each_method_runs_on(capsys):
    from slimvlm.cli import main
    from slimvlm.registry import families_taking

    llava_families = ["Llava", "LlavaNext", "LlavaNextVideo", "LlavaOnevision"]
    qwen = ["Qwen2VL", "Qwen2_5_VL", "Qwen3VL", "Qwen3VLMoe", "Qwen3_5", "Qwen3_5Moe"]
    # per tile inside InternViT, unmerged before the pixel shuffle; per image in Gemma 3's SigLIP, before its pooling
    tome = llava_families + ["InternVL", "Gemma3"]
    assert families_taking("tome") == (tome, qwen)  # stage 1 inside Qwen's encoder
    assert families_taking("divprune") == (llava_families + qwen + ["InternVL", "Gemma3"], [])
    assert families_taking("fastv")[1] == []  # on Qwen3.5 scored at a full-attention layer (checked per checkpoint)
    assert families_taking("pool")[1] == llava_families[1:] + qwen  # one square grid per image (InternVL: per tile)
    assert main(["methods"]) == 0
    shown = capsys.readouterr().out
    assert f"families: {', '.join(tome)} (refused: {', '.join(qwen)})" in shown
