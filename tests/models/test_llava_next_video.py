"""LLaVA-NeXT-Video on a tiny random LlavaNextVideoForConditionalGeneration (LLaVA-NeXT's 8 x 8-patch crops; videos
of 3 frames, each pooled 2 x 2 into 16 tokens): `none` is the untouched model on images, videos and prompts holding
both; images reduce exactly as on LLaVA-NeXT; every method runs on videos (batched as one by one, with generate())
or is refused with the reason; the stats count each video's tokens."""

import pytest
import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoCausalLMOutputWithPast

import slimvlm
from conftest import NV_FRAMES, assert_visual_tokens, dymu_thresholds, nv_model, video_batch, video_batched_as_one_by_one
from slimvlm.methods.dymu import DyMU
from slimvlm.registry import methods

BATCHES = {  # per prompt, its items in order; the images' sizes follow their place (conftest.video_batch)
    "videos": [("video",), ("video",)],
    "images": [("image",), ("image",)],
    "mixed": [("image", "video"), ("video", "image")],
}
ITEMS = {  # each item's tokens, in prompt order: 48 a video (3 frames x 4 x 4), 166 or 336 an image (as on LLaVA-NeXT)
    "videos": [48, 48],
    "images": [166, 336],
    "mixed": [166, 48, 48, 166],
}
KINDS = {name: [kind for items in samples for kind in items] for name, samples in BATCHES.items()}

ON_VIDEO = {  # the methods that run on videos, with settings that reduce something there
    "none": "none",
    "random": "random:budget=20",
    "uniform": "uniform:ratio=0.25",
    "divprune": "divprune:budget=20",
    "fastv": "fastv:k=2,ratio=0.5",
    "mustdrop": "mustdrop:lsm=false,important=false,global_thr=0.02,individual_thr=0.02,layers=0;1",  # drops some
    "vtu": "vtu",
}
STAGE_1 = {  # refused on prompts with a video, run on images
    "tome": "tome:r=4",
    "visionzip": "visionzip:dominant=20,contextual=4",
    "dymu": "dymu",
    "mustdrop": "mustdrop:global_thr=0.05,individual_thr=0.05,layers=0;1",
}
REFUSED = {"pool": "pool:budget=16", "llava-mini": "llava-mini:budget=4"}  # at apply: one square grid per image


@pytest.fixture(scope="module")
def thresholds(tiny_nv):
    return dymu_thresholds(tiny_nv[0], target=30)


def stage_1(name, thresholds):
    return DyMU(thresholds=thresholds) if name == "dymu" else STAGE_1[name]


def test_every_method_is_covered_and_grid_methods_are_refused(fresh_nv):
    assert set(ON_VIDEO) | set(STAGE_1) | set(REFUSED) == set(methods())
    for name, spec in REFUSED.items():  # as on LLaVA-NeXT, before any input
        with pytest.raises(slimvlm.SlimVLMError, match=f"{name} works on one square patch grid per image.*use uniform"):
            slimvlm.apply(fresh_nv[0], spec)
    assert "forward" not in fresh_nv[0].__dict__


def untouched(model, inputs: dict, spec, **options):
    """(the untouched model's output, the output under `spec`, its stats, the largest logit gap over real tokens)."""
    with torch.no_grad():
        reference = model(**inputs)
        with slimvlm.apply(model, spec, **options) as handle:
            output = model(**inputs)
    gap = (output.logits - reference.logits)[inputs["attention_mask"].bool()].abs().max().item()
    return reference, output, handle.stats, gap


def per_modality(output, name) -> None:
    """The output carries each image's tokens in its image field and each video's in its video field."""
    for modality in ("image", "video"):
        counts = [count for count, kind in zip(ITEMS[name], KINDS[name]) if kind == modality]
        if counts:
            assert_visual_tokens(output, counts, modality)


@pytest.mark.parametrize("keep_positions", [False, True], ids=["renumbered", "kept positions"])
@pytest.mark.parametrize("name", sorted(BATCHES))
def test_none_gives_the_untouched_logits(fresh_nv, name, keep_positions):
    model, tokenizer = fresh_nv
    inputs = video_batch(model, tokenizer, BATCHES[name])
    assert inputs["attention_mask"][:, 0].tolist() == [0, 1]  # left padding
    reference, output, stats, gap = untouched(model, inputs, "none", keep_positions=keep_positions)
    assert gap < 1e-5 and stats.visual_tokens == ITEMS[name]
    assert isinstance(output, LlavaNextVideoCausalLMOutputWithPast)
    assert set(output.keys()) == set(reference.keys())  # no image field for videos alone, and the reverse
    per_modality(output, name)


def test_vtu_unmerges_nothing_on_videos(fresh_nv):
    """A video's tokens are its frames' cells, one slot each: virtual unmerging makes one copy of each."""
    model, tokenizer = fresh_nv
    assert untouched(model, video_batch(model, tokenizer, BATCHES["videos"]), "vtu")[-1] < 1e-5


@pytest.mark.parametrize("name", ["videos", "mixed"])
def test_none_generates_the_untouched_text(fresh_nv, name):
    model, tokenizer = fresh_nv
    inputs = video_batch(model, tokenizer, BATCHES[name])
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        with slimvlm.apply(model, "none"):
            assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), reference)
            static = model.generate(**inputs, max_new_tokens=8, do_sample=False, cache_implementation="static")
            assert torch.equal(static, reference)


@pytest.mark.parametrize("name", sorted(ON_VIDEO))
@pytest.mark.parametrize("batch", ["videos", "mixed"])
def test_batched_equals_one_by_one(fresh_nv, batch, name):
    model, tokenizer = fresh_nv
    counts, kept = video_batched_as_one_by_one(model, tokenizer, ON_VIDEO[name], BATCHES[batch])
    assert all(0 < count <= slots for count, slots in zip(counts, ITEMS[batch]))
    reduces = name not in ("none", "vtu")
    assert (sum(kept) < sum(ITEMS[batch])) == reduces and min(kept) > 0


@pytest.mark.parametrize("spec, expected", [
    ("divprune:budget=20", [20, 20, 20, 20]),
    ("random:budget=20", [20, 20, 20, 20]),
    ("uniform:ratio=0.25", [round(0.25 * 166), 12, 12, round(0.25 * 166)]),
])
def test_stage_2_budgets_are_per_video(fresh_nv, spec, expected):
    model, tokenizer = fresh_nv
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        model(**video_batch(model, tokenizer, BATCHES["mixed"]))
    assert handle.stats.visual_tokens == expected
    assert [layers[-1] for layers in handle.stats.kv_visual_entries] == [sum(expected[:2]), sum(expected[2:])]
    # per encoder view, in prompt order, after the projector: an image's 3 crops of 64, a video's 3 frames of 16
    assert handle.stats.projector_tokens == [64] * 3 + [16] * 3 + [16] * 3 + [64] * 3


def test_a_budget_over_a_videos_tokens_is_refused(fresh_nv):
    model, tokenizer = fresh_nv
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=60"):
        with pytest.raises(slimvlm.SlimVLMError, match="larger than the 48 tokens of a visual item of this input"):
            model(**video_batch(model, tokenizer, BATCHES["videos"]))
    # before any input, against the most a video can hold (the LM's positions), and not called an image's
    most = model.config.text_config.max_position_embeddings
    with pytest.raises(slimvlm.SlimVLMError, match=f"larger than the {most} tokens of the largest visual item this "
                                                   "model takes"):
        slimvlm.apply(model, f"divprune:budget={most + 1}")


def test_stats_count_each_video(fresh_nv):
    model, tokenizer = fresh_nv
    inputs = video_batch(model, tokenizer, BATCHES["videos"])
    with torch.no_grad():
        with slimvlm.apply(model, "none") as handle:
            model(**inputs)
            stats = handle.stats
        assert stats.vision_tokens == [[65] * 6] * 2  # two encoder layers run, on each frame's 64 patches + class token
        assert stats.projector_tokens == [16] * 6
        assert stats.sources == [list(range(48))] * 2  # each slot (a frame's cell) its own token, frame after frame
        assert [layers[0] for layers in stats.kv_visual_entries] == [48, 48]
        with slimvlm.apply(model, "divprune:budget=20") as handle:
            model(**inputs)
            stats = handle.stats
    for sources in stats.sources:
        assert len(sources) == 48 and sorted(set(sources) - {-1}) == list(range(20))
    assert [layers[-1] for layers in stats.kv_visual_entries] == [20, 20]


def test_fastv_drops_its_ratio_of_each_prompts_visual_tokens(fresh_nv):
    model, tokenizer = fresh_nv
    with torch.no_grad(), slimvlm.apply(model, "fastv:k=2,ratio=0.5") as handle:
        model(**video_batch(model, tokenizer, BATCHES["mixed"]))
    visual = 166 + 48  # an image and a video
    assert handle.stats.kv_visual_entries == [[visual] * 2 + [visual - round(0.5 * visual)] * 2] * 2


@pytest.fixture(scope="module")
def next_twin(tiny_nv):
    """LlavaNextForConditionalGeneration with the tiny LLaVA-NeXT-Video's weights (average pooling has none)."""
    model = tiny_nv[0]
    twin = LlavaNextForConditionalGeneration._from_config(LlavaNextConfig.from_dict(model.config.to_dict()),
                                                          attn_implementation="sdpa").eval()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("spec", ["none", "tome:r=4", "visionzip:dominant=20,contextual=4", STAGE_1["mustdrop"],
                                  "divprune:budget=40", "fastv:k=2,ratio=0.5", ("tome:r=4", "vtu")], ids=str)
def test_images_reduce_as_on_llava_next(fresh_nv, next_twin, spec):
    model, tokenizer = fresh_nv
    inputs = video_batch(model, tokenizer, BATCHES["images"])
    spec = list(spec) if isinstance(spec, tuple) else spec
    with torch.no_grad():
        with slimvlm.apply(next_twin, spec) as handle:
            reference = next_twin(**inputs).logits
            counts = handle.stats.visual_tokens
        with slimvlm.apply(model, spec) as handle:
            logits = model(**inputs).logits
            assert handle.stats.visual_tokens == counts
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(STAGE_1))
def test_stage_1_is_refused_on_videos_and_runs_on_images(fresh_nv, thresholds, name):
    model, tokenizer = fresh_nv
    with torch.no_grad(), slimvlm.apply(model, stage_1(name, thresholds)) as handle:
        model(**video_batch(model, tokenizer, BATCHES["images"]))
        assert all(0 < count <= slots for count, slots in zip(handle.stats.visual_tokens, ITEMS["images"]))
        for batch in ("videos", "mixed"):
            with pytest.raises(slimvlm.SlimVLMError, match=rf"{name} acts in the vision encoder \(stage 1\), but this "
                                                           "prompt holds a video.*On videos use a stage-2-4 method"):
                model(**video_batch(model, tokenizer, BATCHES[batch]))


def test_bad_video_inputs_are_named(fresh_nv):
    model, tokenizer = fresh_nv
    videos = video_batch(model, tokenizer, BATCHES["videos"])
    images = video_batch(model, tokenizer, BATCHES["images"])
    with torch.no_grad(), slimvlm.apply(model, "none"):
        fewer = {**videos, "pixel_values_videos": videos["pixel_values_videos"][:, : NV_FRAMES - 1]}  # 32 tokens each
        with pytest.raises(slimvlm.SlimVLMError, match="a run of video placeholders is not whole videos'"):
            model(**fewer)
        flat = {**videos, "pixel_values_videos": videos["pixel_values_videos"].flatten(0, 1)}
        with pytest.raises(slimvlm.SlimVLMError, match=r"takes \(videos, frames, channels, height, width\)"):
            model(**flat)
        unplaced = {**images, "pixel_values_videos": videos["pixel_values_videos"]}
        with pytest.raises(slimvlm.SlimVLMError, match=r"2 video\(s\) given but the prompts have placeholders for 0"):
            model(**unplaced)
        without = {key: value for key, value in videos.items() if key != "pixel_values_videos"}
        without["pixel_values"] = images["pixel_values"]
        without["image_sizes"] = images["image_sizes"]
        with pytest.raises(slimvlm.SlimVLMError, match="a run of video placeholders .* the videos given take none"):
            model(**without)


@pytest.mark.parametrize("mode, size, cells", [("max", 98, 9), ("conv", 112, 16)], ids=["max, 7 x 7 patches", "conv"])
def test_other_poolings(tmp_path, mode, size, cells):
    """Max and conv pooling (the model's own module pools), and a frame whose side the stride does not divide:
    7 x 7 patches pool into 3 x 3 cells, the last row and column left out as the model leaves them."""
    from slimvlm.testbed.build import make_tiny_next_video

    model, tokenizer = nv_model(make_tiny_next_video(tmp_path, seed=1, image_size=size, pool_mode=mode))
    inputs = video_batch(model, tokenizer, BATCHES["videos"])
    *_, stats, gap = untouched(model, inputs, "none")
    assert gap < 1e-5
    assert stats.visual_tokens == [NV_FRAMES * cells] * 2 and stats.projector_tokens == [cells] * 2 * NV_FRAMES
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=8") as handle:
        model(**inputs)
    assert handle.stats.visual_tokens == [8, 8]


def test_a_local_folder_loads_as_llava_next_video(tiny_nv_dir):
    from slimvlm.models.loading import load_model

    model, _ = load_model(str(tiny_nv_dir), torch.device("cpu"))
    assert type(model).__name__ == "LlavaNextVideoForConditionalGeneration"
    with slimvlm.apply(model, "none") as handle:
        assert handle.runtime.adapter.family == "llava-next-video"


def test_llava_next_video_7b_shape():
    """llava-hf/LLaVA-NeXT-Video-7B-hf's shape on the meta device: 7.06B parameters, a 32-frame video 32 x 144 tokens."""
    from slimvlm.bench.shapes import MODEL_CLASSES, shape_config
    from slimvlm.models import adapter_for

    config = shape_config("llava-next-video-7b")
    with torch.device("meta"):
        model = MODEL_CLASSES[type(config)]._from_config(config, attn_implementation="sdpa")
    assert type(model).__name__ == "LlavaNextVideoForConditionalGeneration"
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 7.06
    assert (config.image_token_id, config.video_token_id, config.spatial_pool_stride) == (32001, 32000, 2)
    adapter = adapter_for(model)
    assert adapter.synthetic_videos(1, 32, torch.Generator())[1] == 32 * 12 * 12
    assert adapter.layout_of(672, 672).slots == 2928  # its images as LLaVA-NeXT-7B's
