"""LLaVA-OneVision on a tiny random LlavaOnevisionForConditionalGeneration (SigLIP crops of 6 x 6 patches, no
class token; Qwen2 LM): the layout is the model's, `none` is the untouched model, every method runs (batched as
one by one, with generate() on the dynamic and the static cache) or is refused with the reason, and the stats
count each image's tokens."""

import copy

import pytest
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionCausalLMOutputWithPast,
    image_size_to_num_patches,
)

import slimvlm
from conftest import OV_RESIZED, OV_SIZES, assert_visual_tokens, dymu_thresholds, ov_batch, ov_select
from slimvlm.attention import QUERY_CHUNK, received_attention
from slimvlm.methods.dymu import DyMU
from slimvlm.methods.visionzip import VisionZip
from slimvlm.models import adapter_for
from slimvlm.registry import methods

SLOTS = [106, 192]  # 36 base patches + 10 kept rows of 6 and their newlines; 36 + 12 x 13
CROPS = [3, 5]  # base view + 2 x 1 tiles, base view + 2 x 2 tiles
RESIZED_BATCH = [OV_RESIZED, OV_SIZES[0]]  # 36 + 19 x 17 = 359 slots (13 crops), then 106

RUNS = {  # every registered method, with settings that reduce something on 6 x 6-patch crops
    "none": "none",
    "random": "random:budget=40",
    "uniform": "uniform:ratio=0.25",
    "divprune": "divprune:budget=40",
    "fastv": "fastv:k=2,ratio=0.5",
    "tome": "tome:r=4",
    "visionzip": "visionzip:dominant=10,contextual=2",
    "mustdrop": "mustdrop:global_thr=0.05,individual_thr=0.05,layers=0;1",
    "vtu": ["tome:r=4", "vtu"],
    "dymu": "dymu",
}
IN_THE_ENCODER = {"tome", "visionzip", "mustdrop", "vtu", "dymu"}  # refused on an image the model resizes
REFUSED = {"pool": "pool:budget=16", "llava-mini": "llava-mini:budget=4"}


@pytest.fixture(scope="module")
def thresholds(tiny_ov):
    return dymu_thresholds(tiny_ov[0], target=20)


def spec_of(name, thresholds):
    return DyMU(thresholds=thresholds) if name == "dymu" else RUNS[name]


def test_every_method_is_covered():
    assert set(RUNS) | set(REFUSED) == set(methods())


RESIZED = {OV_RESIZED, (336, 300)}  # 4 x 3 and 4 x 4 tiles; 3 x 3 (250 x 250) stays under 1.1^2 x 9 crops' worth


@pytest.mark.parametrize("size", [(100, 60), (60, 100), (80, 80), (150, 150), (250, 250), *sorted(RESIZED)], ids=str)
def test_layout_counts_the_models_own_tokens_and_crops(tiny_ov, size):
    model, tokenizer = tiny_ov
    layout = adapter_for(model).layout_of(*size)
    inputs = ov_batch(model, tokenizer, [size])  # placeholders by the model's own packing
    assert layout.slots == int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert layout.views == image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, 84)
    assert (layout.resized is not None) == (size in RESIZED)


@pytest.mark.parametrize("sizes", [OV_SIZES, RESIZED_BATCH], ids=["kept canvases", "a resized canvas"])
def test_untouched_crops_pack_into_the_models_own_image_features(tiny_ov, sizes):
    model, tokenizer = tiny_ov
    inputs = ov_batch(model, tokenizer, sizes)
    adapter = adapter_for(model)
    with torch.no_grad():
        tokens, _ = adapter.encode(adapter.views(*adapter.visual_inputs(inputs), False), None)
        packed = adapter.pack(adapter.project(tokens))
        reference = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert not tokens.has_cls and tokens.x.shape[1] == 36  # SigLIP: patches only
    assert packed.known == [len(image) for image in reference]
    for mine, theirs in zip(packed.split(), reference):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    for image, count in enumerate(packed.known):  # one token per slot, in slot order
        assert packed.origin[image, :count].tolist() == list(range(count))
        assert packed.size[image, :count].eq(1).all()


@pytest.mark.parametrize("keep_positions", [False, True], ids=["renumbered", "kept positions"])
@pytest.mark.parametrize("sizes", [OV_SIZES, RESIZED_BATCH], ids=["kept canvases", "a resized canvas"])
def test_none_is_the_untouched_model(fresh_ov, sizes, keep_positions):
    model, tokenizer = fresh_ov
    inputs = ov_batch(model, tokenizer, sizes)
    assert sorted(inputs["attention_mask"][:, 0].tolist()) == [0, 1]  # one prompt is padded on the left
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    with torch.no_grad():
        reference = model(**inputs).logits
        text = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with slimvlm.apply(model, "none", keep_positions=keep_positions) as handle:
            out = model(**inputs)
            assert isinstance(out, LlavaOnevisionCausalLMOutputWithPast)
            assert_visual_tokens(out, placeholders)
            assert handle.stats.visual_tokens == placeholders
            assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), text)
            static = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static")
    valid = inputs["attention_mask"].bool()
    assert (out.logits - reference)[valid].abs().max().item() < 1e-5
    assert torch.equal(static, text)


def batched_and_alone(model, inputs: dict, spec, static: bool) -> tuple[list[int], list[list[int]]]:
    """Under `spec`: the visual tokens of the batch's images, and generate()'s new tokens for the batch and for
    each prompt alone (the static cache's too where asked), after checking that the last logits agree."""
    singles = [ov_select(inputs, i) for i in range(len(inputs["input_ids"]))]
    paths = [{}, {"cache_implementation": "static"}] if static else [{}]
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        last = model(**inputs).logits[:, -1]
        counts = handle.stats.visual_tokens
        texts = [model.generate(**inputs, max_new_tokens=5, do_sample=False, **path)[:, -5:].tolist() for path in paths]
        for i, single in enumerate(singles):
            torch.testing.assert_close(model(**single).logits[0, -1], last[i], atol=1e-5, rtol=1e-5)
            assert handle.stats.visual_tokens == [counts[i]]
            for path, text in zip(paths, texts):
                assert model.generate(**single, max_new_tokens=5, do_sample=False, **path)[0, -5:].tolist() == text[i]
    return counts, texts


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_method_runs_batched_as_one_by_one(fresh_ov, thresholds, name):
    model, tokenizer = fresh_ov
    inputs = ov_batch(model, tokenizer)
    virtual = name in ("vtu", "dymu")  # its copies are not in a static cache: refused there (tested below)
    counts, texts = batched_and_alone(model, inputs, spec_of(name, thresholds), static=not virtual)
    assert all(0 < count <= slots for count, slots in zip(counts, SLOTS))
    if not virtual:
        assert texts[0] == texts[1]  # the static cache generates what the dynamic one does


@pytest.mark.parametrize("name", ["vtu", "dymu"])
def test_virtual_unmerging_on_a_static_cache_generates_what_the_dynamic_cache_does(fresh_ov, thresholds, name):
    model, tokenizer = fresh_ov
    inputs = ov_batch(model, tokenizer)
    with torch.no_grad(), slimvlm.apply(model, spec_of(name, thresholds)):
        static, dynamic = (model.generate(**inputs, max_new_tokens=3, do_sample=False, **extra)
                           for extra in ({"cache_implementation": "static"}, {}))
        assert torch.equal(static, dynamic)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_resized_image_takes_stages_2_to_4_and_refuses_stage_1(fresh_ov, thresholds, name):
    model, tokenizer = fresh_ov
    inputs = ov_batch(model, tokenizer, RESIZED_BATCH)
    if name not in IN_THE_ENCODER:
        counts, _ = batched_and_alone(model, inputs, spec_of(name, thresholds), static=True)
        assert 0 < counts[0] <= 359 and 0 < counts[1] <= 106
        return
    method = "tome" if name == "vtu" else name
    with torch.no_grad(), slimvlm.apply(model, spec_of(name, thresholds)):
        with pytest.raises(slimvlm.SlimVLMError, match=rf"{method} acts in the vision encoder, per crop, but image 0 "
                           r"\(300 x 250 px\) has a canvas of 22 x 18 patches that the model resizes bilinearly to 19 x 16"):
            model(**inputs)
        model(**ov_select(inputs, 1))  # the other image keeps its canvas: the method runs on it


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_grid_methods_are_refused_with_the_fix(fresh_ov, name):
    model, _ = fresh_ov
    with pytest.raises(slimvlm.SlimVLMError, match=f"{name} works on one square patch grid per image, but a LLaVA-OneVision image.*use uniform"):
        slimvlm.apply(model, REFUSED[name])
    assert "forward" not in model.__dict__


def test_stats_count_each_images_tokens(fresh_ov):
    model, tokenizer = fresh_ov
    inputs = ov_batch(model, tokenizer)
    with torch.no_grad():
        with slimvlm.apply(model, "tome:r=4") as handle:
            model(**inputs)
            # three SigLIP layers, r = 4 each, per crop: nothing is protected (no class token)
            assert handle.stats.vision_tokens == [[36] * 8, [32] * 8, [28] * 8]
            assert handle.stats.projector_tokens == [24] * 8
            tome = handle.stats.visual_tokens
        with slimvlm.apply(model, "visionzip:dominant=10,contextual=2") as handle:
            model(**inputs)
            assert handle.stats.projector_tokens == [12] * 8  # 10 dominant patches, 2 contextual: no class token
            visionzip = handle.stats.visual_tokens
        with slimvlm.apply(model, "divprune:budget=40") as handle:
            model(**inputs)
            assert handle.stats.visual_tokens == [40, 40] == [layers[-1] for layers in handle.stats.kv_visual_entries]
        with slimvlm.apply(model, "fastv:k=2,ratio=0.5") as handle:
            model(**inputs)
            assert handle.stats.kv_visual_entries == [[slots] * 2 + [slots - round(0.5 * slots)] * 2 for slots in SLOTS]
        with slimvlm.apply(model, "none") as handle:
            model(**inputs)
            assert [sum(source >= 0 for source in slots) for slots in handle.stats.sources] == SLOTS
    # the base view keeps its tokens; tiles lose those in the cut rows; each kept row adds its newline
    assert 24 + 10 <= tome[0] < 24 * 3 + 10 and tome[1] == 24 * 5 + 12
    assert 12 + 10 <= visionzip[0] <= 12 * 3 + 10 and visionzip[1] == 12 * 5 + 12


def test_received_attention_is_the_mean_over_heads_and_valid_queries():
    n = QUERY_CHUNK * 2 + 44  # three chunks of queries
    probabilities = torch.randn(2, 3, n, n, generator=torch.Generator().manual_seed(0)).softmax(dim=-1)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, -50:] = False  # padding queries of image 1 count for nothing

    def rows(index):
        return probabilities.gather(2, index[:, None, :, None].expand(-1, 3, -1, n))

    expected = torch.stack([probabilities[0].mean(0).mean(0), probabilities[1, :, : n - 50].mean(0).mean(0)])
    torch.testing.assert_close(received_attention(rows, valid), expected)


def test_dominant_and_important_tokens_are_those_the_feature_layer_attends_most(tiny_ov):
    """VisionZip's dominant patches and MustDrop's important set, without a class token: the top patches by the
    attention they receive at the last SigLIP layer (eager attention of the model's own weights, here)."""
    model, tokenizer = tiny_ov
    adapter = adapter_for(model)
    inputs = ov_batch(model, tokenizer)
    crops = adapter.views(*adapter.visual_inputs(inputs), False)
    with torch.no_grad():
        before_last = model.model.vision_tower(crops, output_hidden_states=True).hidden_states[-2]
        attn = adapter.vision.encoder.layers[-1].self_attn
        normed = adapter.vision.encoder.layers[-1].layer_norm1(before_last)

        def heads(x):
            return x.view(len(crops), 36, attn.num_heads, attn.head_dim).transpose(1, 2)

        logits = heads(attn.q_proj(normed)) @ heads(attn.k_proj(normed)).transpose(-1, -2)
        received = (logits * attn.scale).softmax(dim=-1).mean(dim=1).mean(dim=1)  # (crops, 36)
        tokens, _ = adapter.encode(crops, VisionZip(dominant=10, contextual=0))
        mustdrop = slimvlm.registry.build("mustdrop:lsm=false,important_ratio=0.25")
        adapter.encode(crops, mustdrop)
    top = received.topk(10, dim=1).indices.sort(dim=1).values
    assert torch.equal(tokens.origin, top)  # the dominant patches, in spatial order
    assert torch.equal(mustdrop._important, torch.zeros_like(received, dtype=torch.bool).scatter_(
        1, received.topk(9, dim=1).indices, True))  # ceil(25% of 36) per crop


def test_dymu_calibrated_on_this_models_crops_runs_per_crop(fresh_ov, thresholds):
    model, tokenizer = fresh_ov
    assert thresholds.identity["tokens_per_image"] == 36 and thresholds.identity["vision_layers_run"] == 3
    with torch.no_grad(), slimvlm.apply(model, DyMU(thresholds=thresholds, vtu=False)) as handle:
        model(**ov_batch(model, tokenizer))
    assert len(handle.stats.vision_tokens) == 3 and len(handle.stats.vision_tokens[0]) == sum(CROPS)
    assert all(count < 36 for count in handle.stats.projector_tokens)


def test_inputs_it_cannot_honour_are_refused(fresh_ov):
    model, tokenizer = fresh_ov
    inputs = ov_batch(model, tokenizer)
    with torch.no_grad(), slimvlm.apply(model, "divprune:budget=40"):
        with pytest.raises(slimvlm.SlimVLMError, match="batch_num_images counts 3 image.*image_sizes 2"):
            model(**{**inputs, "batch_num_images": torch.tensor([2, 1])})
        with pytest.raises(slimvlm.SlimVLMError, match="a run of image placeholders is not whole images'"):  # untiled: 37 each
            model(**{**inputs, "batch_num_images": torch.tensor([2])})
        with pytest.raises(slimvlm.SlimVLMError, match="vision_aspect_ratio='anyres_max_4' differs"):
            model(**inputs, vision_aspect_ratio="anyres_max_4")
        without = {k: v for k, v in inputs.items() if k != "image_sizes"}
        with pytest.raises(slimvlm.SlimVLMError, match="pass image_sizes"):
            model(**without)


@pytest.mark.parametrize("setting, value, expected", [
    ("vision_feature_select_strategy", "default", "SigLIP has none.*use 'full'"),
    ("vision_aspect_ratio", "anyres", "lays images out by 'anyres_max_N'"),
])
def test_configs_it_cannot_lay_out_are_refused(tiny_ov, setting, value, expected):
    model = copy.deepcopy(tiny_ov[0])
    setattr(model.config, setting, value)
    with pytest.raises(slimvlm.SlimVLMError, match=expected):
        slimvlm.apply(model, "none")


def test_bench_clis_run_on_a_llava_onevision_folder(tiny_ov_dir, tmp_path):
    """Synthetic images of the pinpoint with the most tokens that the model does not resize (3 x 3 tiles of 84 px,
    nothing cut): 36 + 18 x 19 = 378 tokens and 10 crops each, so that stage-1 methods run too."""
    import json

    from slimvlm.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_ov_dir), "--methods", "tome:r=4,divprune:budget=64", "--json", str(out),
                 "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--device", "cpu"]) == 0
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert results["none"]["visual_tokens_mean"] == 36 + 18 * 19
    assert results["tome:r=4"]["visual_tokens_mean"] == 36 + 18 * 19 - 10 * 3 * 4  # 10 crops, 3 layers, r = 4
    assert results["divprune:budget=64"]["visual_tokens_max"] == 64
    assert results["divprune:budget=64"]["flops_ratio"] < results["tome:r=4"]["flops_ratio"] < 1
    out = tmp_path / "generate.json"
    assert main(["bench-generate", "--model", str(tiny_ov_dir), "--methods", "divprune:budget=64", "--batch-sizes", "2",
                 "--paths", "eager,static", "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["path"], r["method"]) for r in rows] == [
        (p, m) for p in ("eager", "static") for m in ("untouched", "divprune:budget=64", "untouched, again")]
    assert [r["visual_tokens_mean"] for r in rows if r["method"] == "divprune:budget=64"] == [64, 64]


def test_llava_onevision_7b_shape():
    """The shape's config, and the benchmark's images on it (the model built on the meta device: no weights)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from slimvlm.bench.shapes import shape_config

    config = shape_config("llava-onevision-7b")
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.image_size, vision.patch_size) == (1152, 26, 16, 4304, 384, 14)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    assert len(config.image_grid_pinpoints) == 36 and config.image_grid_pinpoints[-1] == [2304, 2304]
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    adapter = adapter_for(model)
    assert adapter.vision_layers_run == 26 and adapter.tokens_per_image == 729
    assert adapter.synthetic_size() == (1920, 768) and adapter.layout_of(1920, 768).slots == 729 + 135 * 55
    assert adapter.layout_of(2304, 2304).resized == (81, 81)  # 6 x 6 tiles: 162 x 162 patches, resized by 2
    assert adapter.video_layout(32).slots == 32 * 14 * 14 + 1  # --video-frames 32: frames of 27 x 27 patches -> 14 x 14
    assert adapter.untiled(384, 384).slots == 729 + 1  # an image of a multi-image prompt


MULTI = dict(sizes=[OV_SIZES[1], OV_SIZES[0], OV_SIZES[0]], per_prompt=[2, 1])  # two untiled images, then a tiled one


@pytest.mark.parametrize("spec", ["none", "tome:r=4", "divprune:budget=20", "fastv:k=2,ratio=0.5"])
def test_multi_image_prompts_leave_their_images_untiled(fresh_ov, spec):
    """batch_num_images > 1: each image of that prompt is its base view and one newline (36 + 1 = 37 tokens);
    `none` is the untouched model, on the dynamic and the static cache; methods run on such images."""
    model, tokenizer = fresh_ov
    inputs = ov_batch(model, tokenizer, **MULTI)
    assert inputs["batch_num_images"].tolist() == [2, 1]
    with torch.no_grad():
        reference = model(**inputs).logits
        text = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with slimvlm.apply(model, spec) as handle:
            logits = model(**inputs).logits
            counts = handle.stats.visual_tokens
            kept = [layers[-1] for layers in handle.stats.kv_visual_entries]
            static = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
            dynamic = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(static, dynamic)
    if spec == "none":
        valid = inputs["attention_mask"].bool()
        assert (logits - reference)[valid].abs().max().item() < 1e-5 and torch.equal(dynamic, text)
        assert counts == [37, 37, 106]
    else:
        assert all(0 < count <= slots for count, slots in zip(counts, [37, 37, 106])) and sum(kept) < 37 + 37 + 106

