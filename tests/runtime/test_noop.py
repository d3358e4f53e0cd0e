"""The no-op is exact: every method set to keep every token gives the untouched model's logits."""

import pytest
import torch

import slimvlm
from conftest import batch

KEEP_ALL = [
    "none",
    "random:ratio=1",
    "uniform:ratio=1",
    "pool:budget=576",
    "divprune:ratio=1",
    "tome:r=0",
    "fastv:k=2,ratio=0.0001",  # rounds to 0 dropped: exercises the stage-3 masks and views
    ["tome:r=0", "fastv:k=1,ratio=0.0001"],
    "mustdrop:lsm=false,important=false,filter=false,output_cache=false",
    # every MustDrop part active with thresholds that keep every token: stage-1, -3 and -4 paths
    "mustdrop:threshold=1,global_thr=0,individual_thr=0,layers=0;1;2",
]


@pytest.mark.parametrize("spec", KEEP_ALL, ids=str)
def test_keep_all_gives_identical_logits(fresh, spec):
    model, processor = fresh
    inputs = batch(processor, 3)
    with torch.no_grad():
        reference = model(**inputs).logits
        with slimvlm.apply(model, spec) as handle:
            logits = model(**inputs).logits
            assert handle.stats.visual_tokens == [576, 576, 576]
    assert logits.shape == reference.shape
    valid = inputs["attention_mask"].bool()
    assert (logits - reference)[valid].abs().max().item() < 1e-4


def test_keep_all_generate_is_identical(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        for spec in ("none", "fastv:k=2,ratio=0.0001"):
            with slimvlm.apply(model, spec):
                assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), reference)


def test_remove_restores_the_model(fresh):
    model, processor = fresh
    inputs = batch(processor, 2)
    layers = model.model.language_model.layers

    def hooks():  # transformers may keep hooks of its own (output capture), installed before slimvlm's
        return [(list(layer._forward_pre_hooks), list(layer.self_attn._forward_hooks)) for layer in layers]

    with torch.no_grad():
        reference = model(**inputs).logits
        before = hooks()
        handle = slimvlm.apply(model, ["tome:r=8", "fastv"])
        during = []  # FastV's drop runs in layer hooks during a prefill, on the layers only while it runs
        spy = model.model.language_model.register_forward_pre_hook(lambda *_: during.append(hooks()))
        assert not torch.allclose(model(**inputs).logits[:, -1], reference[:, -1])
        spy.remove()
        assert during and during[0] != before and hooks() == before
        handle.remove()
        assert "forward" not in model.__dict__
        assert torch.equal(model(**inputs).logits, reference)
    assert hooks() == before


def test_visionzip_keep_all_is_exact_when_the_model_feeds_cls(tiny_dir):
    """VisionZip always passes CLS on; with 'full' feature selection the untouched model does too."""
    from transformers import LlavaForConditionalGeneration

    from conftest import images
    from slimvlm.testbed.build import load

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir, vision_feature_select_strategy="full").eval()
    _, processor = load(tiny_dir)
    pixel_values = processor.image_processor(images(2), return_tensors="pt")["pixel_values"]
    image_id = model.config.image_token_id
    input_ids = torch.tensor([[2, 7, 8] + [image_id] * 577 + [9, 10]] * 2)
    with torch.no_grad():
        reference = model(input_ids=input_ids, pixel_values=pixel_values).logits
        with slimvlm.apply(model, "visionzip:dominant=577,contextual=0") as handle:
            logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
            assert handle.stats.visual_tokens == [577, 577]
    assert (logits - reference).abs().max().item() < 1e-4
