"""LLaVA-NeXT (AnyRes) on a tiny random LlavaNextForConditionalGeneration: the no-op is exact, every
method runs with generate() (batched as one by one) or is refused, and the stats keep the promises."""

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import LlavaNextCausalLMOutputWithPast

import slimvlm
from conftest import assert_visual_tokens, dymu_thresholds, next_batch, next_model, next_select
from slimvlm.methods.dymu import calibrate_dymu
from slimvlm.methods.dymu import DyMU
from slimvlm.registry import methods

VIEWS = [3, 5]  # base view + 2 tiles, base view + 4 tiles
SLOTS = [166, 336]  # 64 base patches + 6 kept rows of 16 and their newlines; 64 + 16 x 17


@pytest.fixture(scope="module")
def thresholds(tiny_next):
    return dymu_thresholds(tiny_next[0], target=30)


# every registered method, with settings that reduce something on 8 x 8-patch crops
RUNS = {
    "none": "none",
    "random": "random:budget=40",
    "uniform": "uniform:ratio=0.25",
    "divprune": "divprune:budget=40",
    "tome": "tome:r=4",
    "visionzip": "visionzip:dominant=20,contextual=4",
    "mustdrop": "mustdrop:global_thr=0.05,individual_thr=0.05,layers=0;1",
    "fastv": "fastv:k=2,ratio=0.5",
    "vtu": ["tome:r=4", "vtu"],
    "dymu": "dymu",
}
REFUSED = {"pool": "pool:budget=16", "llava-mini": "llava-mini:budget=4"}


def spec_of(name, thresholds):
    return DyMU(thresholds=thresholds) if name == "dymu" else RUNS[name]


def test_every_method_is_covered():
    assert set(RUNS) | set(REFUSED) == set(methods())


@pytest.mark.parametrize("keep_positions", [False, True], ids=["renumbered", "kept positions"])
def test_none_gives_the_untouched_logits_on_336px_crops(tmp_path_factory, keep_positions):
    from slimvlm.testbed.build import make_tiny_next

    model, processor = next_model(make_tiny_next(tmp_path_factory.mktemp("next336"), seed=1, image_size=336))
    inputs = next_batch(processor, scale=3)  # 300 x 690: 1 x 2 tiles; 600 x 570: 2 x 2 tiles
    assert inputs["attention_mask"][:, 0].tolist() == [0, 1]  # left padding
    with torch.no_grad():
        reference = model(**inputs).logits
        with slimvlm.apply(model, "none", keep_positions=keep_positions) as handle:
            logits = model(**inputs).logits
            assert handle.stats.visual_tokens == (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
            assert handle.stats.projector_tokens == [576] * 8
    valid = inputs["attention_mask"].bool()
    assert (logits - reference)[valid].abs().max().item() < 1e-5


def test_none_generates_the_untouched_text(fresh_next):
    model, processor = fresh_next
    inputs = next_batch(processor)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        with slimvlm.apply(model, "none") as handle:
            out = model(**inputs)
            assert isinstance(out, LlavaNextCausalLMOutputWithPast)
            assert_visual_tokens(out, SLOTS)
            assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), reference)
            assert handle.stats.visual_tokens == SLOTS


@pytest.mark.parametrize("name", sorted(RUNS))
def test_batched_equals_one_by_one(fresh_next, thresholds, name):
    model, processor = fresh_next
    inputs = next_batch(processor)
    singles = [next_select(inputs, i) for i in range(2)]
    new = 5
    with torch.no_grad(), slimvlm.apply(model, spec_of(name, thresholds)) as handle:
        batched = model(**inputs).logits[:, -1]
        counts = handle.stats.visual_tokens
        generated = model.generate(**inputs, max_new_tokens=new, do_sample=False)[:, -new:]
        for i, single in enumerate(singles):
            torch.testing.assert_close(model(**single).logits[0, -1], batched[i], atol=1e-5, rtol=1e-5)
            assert handle.stats.visual_tokens == [counts[i]]
            alone = model.generate(**single, max_new_tokens=new, do_sample=False)[0, -new:]
            assert alone.tolist() == generated[i].tolist()
    assert all(0 < count <= slots for count, slots in zip(counts, SLOTS))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_grid_methods_are_refused_with_the_fix(fresh_next, name):
    model, _ = fresh_next
    with pytest.raises(slimvlm.SlimVLMError, match=f"{name} works on one square patch grid per image.*use uniform"):
        slimvlm.apply(model, REFUSED[name])
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("spec, expected", [
    ("divprune:budget=40", [40, 40]),
    ("random:budget=40", [40, 40]),
    ("uniform:ratio=0.25", [round(0.25 * 166), round(0.25 * 336)]),
    ("divprune:budget=300", None),  # more than the first image's 166 tokens
])
def test_stage_2_budgets_are_per_image(fresh_next, spec, expected):
    model, processor = fresh_next
    inputs = next_batch(processor)
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        if expected is None:
            with pytest.raises(slimvlm.SlimVLMError, match="larger than the 166 tokens of a visual item"):
                model(**inputs)
            return
        model(**inputs)
        assert handle.stats.visual_tokens == expected
        assert [layers[-1] for layers in handle.stats.kv_visual_entries] == expected
        assert handle.stats.projector_tokens == [64] * sum(VIEWS)  # stage 2 selects after the projector


def test_fastv_drops_its_ratio_of_each_images_tokens(fresh_next):
    model, processor = fresh_next
    with torch.no_grad(), slimvlm.apply(model, "fastv:k=2,ratio=0.5") as handle:
        model(**next_batch(processor))
    for layers, slots in zip(handle.stats.kv_visual_entries, SLOTS):
        assert layers == [slots] * 2 + [slots - round(0.5 * slots)] * 2


def test_stage_1_runs_per_crop(fresh_next):
    model, processor = fresh_next
    with torch.no_grad():
        with slimvlm.apply(model, "tome:r=4") as handle:
            model(**next_batch(processor))
            # two encoder layers run, r = 4 each, per crop (65 tokens with the class token)
            assert handle.stats.vision_tokens == [[65] * 8, [61] * 8]
            assert handle.stats.projector_tokens == [56] * 8
            tome = handle.stats.visual_tokens
        with slimvlm.apply(model, "visionzip:dominant=20,contextual=4") as handle:
            model(**next_batch(processor))
            assert handle.stats.projector_tokens == [24] * 8  # the class token, 19 dominant, 4 contextual
            visionzip = handle.stats.visual_tokens
    # the base view keeps all its tokens; tiles lose those in the cut rows; each kept row adds its newline
    assert 56 + 6 <= tome[0] < 56 * 3 + 6 and tome[1] == 56 * 5 + 16
    assert 24 + 6 <= visionzip[0] <= 24 * 3 + 6 and visionzip[1] == 24 * 5 + 16


def test_mustdrop_protects_its_important_set_found_per_crop(fresh_next):
    model, processor = fresh_next
    spec = "mustdrop:lsm=false,global_thr=1,individual_thr=1,layers=0,output_cache=false"
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        model(**next_batch(processor))
        method = handle.methods[0]
        important = handle.runtime.session.tokens.patches_from_views(method._important).sum(dim=1).tolist()
    # ceil(8% of 64) = 6 patches per crop; the base view's always land, a tile's may lie in the cut
    assert important[1] == 6 * 5 and 6 < important[0] <= 6 * 3
    assert [layers[1] for layers in handle.stats.kv_visual_entries] == important  # all else dropped after layer 0


def test_static_cache_generates_as_the_dynamic_one(fresh_next):
    model, processor = fresh_next
    inputs = next_batch(processor)
    with torch.no_grad(), slimvlm.apply(model, "tome:r=4"):
        dynamic = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        static = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_bad_inputs_are_named(fresh_next):
    model, processor = fresh_next
    inputs = next_batch(processor)
    with torch.no_grad(), slimvlm.apply(model, "none"):
        without = {k: v for k, v in inputs.items() if k != "image_sizes"}
        with pytest.raises(slimvlm.SlimVLMError, match="pass image_sizes"):
            model(**without)
        swapped = {**inputs, "image_sizes": inputs["image_sizes"].flip(0)}
        with pytest.raises(slimvlm.SlimVLMError, match="prompt 0 has 166 image placeholder tokens, not those of whole images"):
            model(**swapped)
        extra = {**inputs, "pixel_values": inputs["pixel_values"].repeat(2, 1, 1, 1, 1),
                 "image_sizes": inputs["image_sizes"].repeat(2, 1)}
        with pytest.raises(slimvlm.SlimVLMError, match=r"4 image\(s\) need 1004 \(166, 336, 166, 336 by their image_sizes\)"):
            model(**extra)
        stacked = {**inputs, "pixel_values": inputs["pixel_values"].flatten(0, 1)}  # 10 crops, 8 are wanted
        with pytest.raises(slimvlm.SlimVLMError, match=r"\[3, 5\] per image"):
            model(**stacked)
        stacked["pixel_values"] = torch.cat([inputs["pixel_values"][0, :3], inputs["pixel_values"][1]])
        model(**stacked)  # the crops of all images stacked, as the model also takes them


def test_full_feature_selection_is_refused(tiny_next):
    import copy

    model = copy.deepcopy(tiny_next[0])
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(slimvlm.SlimVLMError, match="use 'default'"):
        slimvlm.apply(model, "none")


def test_an_image_given_more_tokens_than_its_placeholders_is_refused(fresh_next):
    from slimvlm.train import DualSpeed

    model, processor = fresh_next
    dual = DualSpeed(model, pruner="divprune:ratio=1", isolator_length=4)  # within the largest image's 336 tokens
    with torch.no_grad(), slimvlm.apply(model, dual.inference_method()):
        with pytest.raises(slimvlm.SlimVLMError, match="image 0 has 170 visual tokens after the methods but 166 placeholders"):
            model(**next_batch(processor, sizes=[(100, 230)]))


def test_dymu_calibrates_on_the_crops_of_processed_images(fresh_next, tmp_path):
    from conftest import next_images

    model, processor = fresh_next
    thresholds = calibrate_dymu(model, next_images(), target=30, batch_size=2, processor=processor, progress=False)
    assert thresholds.images == sum(VIEWS)  # the encoder's views: each image's base view and tiles
    thresholds.save(tmp_path / "dymu.json")
    with torch.no_grad(), slimvlm.apply(model, f"dymu:thresholds={tmp_path / 'dymu.json'}") as handle:
        model(**next_batch(processor))
    assert len(handle.stats.vision_tokens[0]) == sum(VIEWS)
