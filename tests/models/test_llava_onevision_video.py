"""Videos on a tiny random LLaVA-OneVision (SigLIP frames of 6 x 6 patches, projected, resized bilinearly to 3 x 3,
one newline after the last frame: 3 frames = 28 tokens): the layout is the model's, `none` is the untouched model
on videos and on prompts holding images and videos (a resized image too), stages 2-4 run on videos batched as
one by one, stage 1 is refused there, the stats count each video."""

import pytest
import torch

import slimvlm
from conftest import (NV_FRAMES, OV_RESIZED, assert_visual_tokens, remove_slimvlm, sharpened, video_batch,
                      video_batched_as_one_by_one)
from slimvlm.models import adapter_for
from slimvlm.models.video import ResizedVideoLayout, VideoLayout

BATCHES = {"videos": [("video",), ("video",)], "mixed": [("image", "video"), ("video", "image")]}
VIDEO = NV_FRAMES * 9 + 1  # 3 frames of 3 x 3 tokens, then the newline
ITEMS = {"videos": [VIDEO, VIDEO], "mixed": [188, VIDEO, VIDEO, 188]}  # an image of 100 x 230 px: 36 + 8 x 19
ON_VIDEO = {
    "none": "none",
    "random": "random:budget=12",
    "uniform": "uniform:ratio=0.25",
    "divprune": "divprune:budget=12",
    "fastv": "fastv:k=2,ratio=0.5",
    "mustdrop": "mustdrop:lsm=false,important=false,global_thr=0.035,individual_thr=0.035,layers=0;1",
    "vtu": "vtu",
}
STAGE_1 = {"tome": "tome:r=4", "visionzip": "visionzip:dominant=10,contextual=2",
           "mustdrop": "mustdrop:global_thr=0.05,individual_thr=0.05,layers=0;1"}


@pytest.fixture(scope="module")
def tiny_ov_sharp(tiny_ov_dir):
    """The tiny LLaVA-OneVision with sharper LM attention (so that attention-ranked drops take some tokens)."""
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_ov_dir, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True)
    return sharpened(model).eval(), AutoTokenizer.from_pretrained(tiny_ov_dir, local_files_only=True)


@pytest.fixture
def fresh_ov(tiny_ov_sharp):
    yield tiny_ov_sharp
    remove_slimvlm(tiny_ov_sharp[0])


@pytest.mark.parametrize("side, per_side, along", [
    (6, 3, [0, 0, 1, 1, 2, 2]),
    (7, 4, [0, 0, 1, 2, 2, 3, 3]),  # sampling points 0.375, 2.125, 3.875, 5.625: patch 3 ties, takes the first
])
def test_a_resized_frames_patches_land_on_the_nearest_sampling_point(side, per_side, along):
    layout = ResizedVideoLayout(frames=2, side=side, stride=2)
    assert layout.per_side == per_side and layout.token_along_side().tolist() == along
    assert layout.slots == 2 * per_side**2 + 1 and layout.newline_slots().tolist() == [2 * per_side**2]
    assert layout.view_slots()[1, 0].item() == per_side**2  # frame 1 starts after frame 0's tokens
    assert VideoLayout(frames=2, side=7, stride=2).newline_slots().tolist() == []  # LLaVA-NeXT-Video: no newline


def test_untouched_frames_pack_into_the_models_own_video_features(tiny_ov):
    model, tokenizer = tiny_ov
    inputs = video_batch(model, tokenizer, BATCHES["videos"])
    adapter = adapter_for(model)
    videos = inputs["pixel_values_videos"]
    with torch.no_grad():
        views = adapter.views(*adapter.visual_inputs(inputs), False)
        packed = adapter.pack(adapter.project(adapter.encode(views, None)[0]))
        reference = model.model.get_video_features(videos).pooler_output.reshape(len(videos), -1, packed.x.shape[-1])
    newline = model.model.image_newline
    for mine, theirs in zip(packed.split(), reference):
        if len(theirs) == VIDEO - 1:  # transformers 5.17 adds the newline in forward
            theirs = torch.cat([theirs, newline[None]])
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sizes", [None, [OV_RESIZED]], ids=["kept canvases", "a resized canvas"])
@pytest.mark.parametrize("name", sorted(BATCHES))
def test_none_is_the_untouched_model(fresh_ov, name, sizes):
    model, tokenizer = fresh_ov
    inputs = video_batch(model, tokenizer, BATCHES[name], **({"sizes": sizes} if sizes else {}))
    assert inputs["attention_mask"][:, 0].tolist() == [0, 1]  # left padding
    placeholders = {kind: (inputs["input_ids"] == getattr(model.config, f"{kind}_token_id")).sum().item()
                    for kind in ("image", "video")}
    with torch.no_grad():
        reference = model(**inputs).logits
        text = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with slimvlm.apply(model, "none") as handle:
            out = model(**inputs)
            assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), text)
            static = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static")
    valid = inputs["attention_mask"].bool()
    assert (out.logits - reference)[valid].abs().max().item() < 1e-5 and torch.equal(static, text)
    counts = handle.stats.visual_tokens
    assert sum(counts) == placeholders["image"] + placeholders["video"] and counts.count(VIDEO) == 2
    assert_visual_tokens(out, [VIDEO, VIDEO], "video")


@pytest.mark.parametrize("name", sorted(ON_VIDEO))
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_stages_2_to_4_run_on_videos_batched_as_one_by_one(fresh_ov, batch, name):
    model, tokenizer = fresh_ov
    counts, kept = video_batched_as_one_by_one(model, tokenizer, ON_VIDEO[name], BATCHES[batch])
    assert all(0 < count <= slots for count, slots in zip(counts, ITEMS[batch]))
    assert (sum(kept) < sum(ITEMS[batch])) == (name not in ("none", "vtu")) and min(kept) > 0


def test_a_stage_2_budget_is_per_video_and_the_stats_count_each(fresh_ov):
    model, tokenizer = fresh_ov
    inputs = video_batch(model, tokenizer, BATCHES["mixed"])
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=12") as handle:
        model(**inputs)
    stats = handle.stats
    assert stats.visual_tokens == [12] * 4
    # per encoder view in prompt order: an image's 7 crops of 36 patches, a video's 3 frames of 9 tokens
    assert stats.projector_tokens == [36] * 7 + [9] * 3 + [9] * 3 + [36] * 7
    video_sources = stats.sources[1][:VIDEO]
    assert sorted(set(video_sources) - {-1}) == list(range(12))


@pytest.mark.parametrize("name", sorted(STAGE_1))
def test_stage_1_is_refused_on_prompts_with_a_video(fresh_ov, name):
    model, tokenizer = fresh_ov
    with torch.no_grad(), slimvlm.apply(model, STAGE_1[name]):
        with pytest.raises(slimvlm.SlimVLMError, match=rf"{name} acts in the vision encoder \(stage 1\), but this "
                                                       "prompt holds a video, whose frames the model pools into 9 "
                                                       "tokens each.*On videos use a stage-2-4 method"):
            model(**video_batch(model, tokenizer, BATCHES["mixed"]))


def test_bench_clis_take_videos(tiny_ov_dir, tmp_path):
    """--video-frames: each prompt a video of that many random frames (4 frames of 3 x 3 tokens and the newline)."""
    import json

    from slimvlm.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_ov_dir), "--methods", "divprune:budget=12,fastv", "--video-frames", "4",
                 "--json", str(out), "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--device", "cpu"]) == 0
    payload = json.loads(out.read_text())
    results = {r["method"]: r for r in payload["results"]}
    assert payload["video_frames"] == 4 and results["none"]["visual_tokens_mean"] == 4 * 9 + 1
    assert results["divprune:budget=12"]["visual_tokens_max"] == 12
    out = tmp_path / "generate.json"
    assert main(["bench-generate", "--model", str(tiny_ov_dir), "--methods", "divprune:budget=12", "--batch-sizes", "2",
                 "--paths", "static", "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                 "--video-frames", "4", "--json", str(out)]) == 0
    assert [r["visual_tokens_mean"] for r in json.loads(out.read_text())["results"]] == [4 * 9 + 1, 12, 4 * 9 + 1]


def test_synthetic_videos_are_refused_where_a_family_takes_none(tiny):
    from slimvlm.bench.run import synthetic_inputs

    with pytest.raises(slimvlm.SlimVLMError, match="LlavaForConditionalGeneration takes no videos"):
        synthetic_inputs(tiny[0], 1, 8, video_frames=4)
