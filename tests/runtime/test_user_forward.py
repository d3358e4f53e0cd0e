"""apply() wraps whatever forward the model has (a user's wrapper, torch.compile's, accelerate's hook) and remove()
puts back exactly that; accelerate's hooks run on slimvlm's own paths too."""

import pytest
import torch
from conftest import batch

import slimvlm

METHODS = ["none", "divprune:budget=16", "fastv:k=2,ratio=0.5", "mustdrop-llava7b-64", ["tome:r=8", "vtu"]]


def test_remove_puts_back_the_forward_the_user_set(fresh):
    model, processor = fresh
    inner, calls = model.forward, []

    def wrapper(*args, **kwargs):
        calls.append(None)
        return inner(*args, **kwargs)

    model.forward = wrapper
    try:
        text_only = {"input_ids": torch.tensor([[2, 7, 8]])}
        with torch.no_grad(), slimvlm.apply(model, "divprune:budget=16"):
            model(**batch(processor, 1))  # slimvlm's own path
            model(**text_only)  # nothing for slimvlm to do: the forward it wrapped runs
        assert len(calls) == 1
        assert model.forward is wrapper
    finally:
        del model.forward
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("spec", METHODS)
def test_an_accelerate_hook_runs_around_every_path_and_stays(fresh, spec):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Counting(ModelHook):
        def __init__(self):
            self.pre = self.post = 0

        def pre_forward(self, module, *args, **kwargs):
            self.pre += 1
            return args, kwargs

        def post_forward(self, module, output):
            self.post += 1
            return output

    model, processor = fresh
    inputs = batch(processor, 2)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    hook = Counting()
    add_hook_to_module(model, hook)
    hooked_forward, old_forward = model.forward, model._old_forward
    try:
        with torch.no_grad(), slimvlm.apply(model, spec):
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert hook.pre == hook.post == 3  # the prefill and both decode steps went through the hook
        if spec == "none":
            assert torch.equal(out, reference)
        assert model.forward is hooked_forward and model._old_forward is old_forward
        model(**inputs)
        assert hook.pre == 4  # the hook still runs after remove()
    finally:
        remove_hook_from_module(model)
        model.__dict__.pop("forward", None)  # accelerate leaves the bound method there


def test_a_model_dispatched_over_devices_generates_what_the_whole_model_does(tiny_dir, tmp_path):
    """device_map as accelerate dispatches it: hooks on the model and its modules, two layers offloaded to disk
    (their weights loaded by their hooks at each call), as accelerate's own tests split a model on a CPU."""
    import warnings

    from accelerate import dispatch_model

    from slimvlm.testbed.build import load

    whole, processor = load(tiny_dir)
    split, _ = load(tiny_dir)
    inside = {f"model.language_model.layers.{i}": "disk" if i in (1, 2) else "cpu" for i in range(4)}
    rest = ["model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens",
            "model.language_model.norm", "model.language_model.rotary_emb", "lm_head"]
    split = dispatch_model(split, device_map={**inside, **dict.fromkeys(rest, "cpu")}, offload_dir=str(tmp_path))
    assert getattr(split, "_hf_hook", None) is not None
    inputs = batch(processor, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # llava-mini's untrained modules
        for spec in [*METHODS, "visionzip", "pool:budget=16", "llava-mini:budget=2,layers=1"]:
            outputs = []
            for model in (whole, split):
                with torch.no_grad(), slimvlm.apply(model, spec):
                    outputs.append(model.generate(**inputs, max_new_tokens=3, do_sample=False))
            assert torch.equal(*outputs), spec


def test_image_features_handed_over_in_place_of_pixels_are_refused(fresh):
    """A caller (or a generate() that read the model's own signature) passing mm_encoder_outputs would have the
    untouched forward run with every token: refused, with what to pass instead."""
    from slimvlm.errors import SlimVLMError

    model, processor = fresh
    inputs = batch(processor, 1)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    rest = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=16"):
        with pytest.raises(SlimVLMError, match="pass pixel_values, not mm_encoder_outputs"):
            model(**rest, mm_encoder_outputs=features)
