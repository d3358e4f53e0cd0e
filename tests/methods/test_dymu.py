"""DyMU's dynamic token merging (DToMe): threshold matching, varying counts per image, calibration,
threshold files and their refusals, the calibrate command."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

import slimvlm
from slimvlm import SlimVLMError
from slimvlm.cli import main
from slimvlm.methods.dymu import (DyMU, Thresholds, best_partners, calibrate_dymu, calibration_scenes, identity_of,
                                  schedule_for, threshold_merge, token_counts)
from slimvlm.registry import PRESETS, build
from slimvlm.method import EncoderAttention
from slimvlm.testbed.build import format_prompt, load
from slimvlm.tokens import VisualTokens
from conftest import QUESTIONS, images

TARGET = 300  # of 576 patches; the tiny model runs 2 encoder layers, which reach down to 192


@pytest.fixture(scope="module")
def calibrated(tiny):
    """Thresholds for the tiny model from 32 random images, and those images."""
    model, processor = tiny
    pictures = images(32, seed=3)
    return calibrate_dymu(model, pictures, TARGET, batch_size=8, processor=processor, progress=False), pictures


@pytest.fixture(scope="module")
def threshold_file(calibrated, tmp_path_factory):
    return calibrated[0].save(tmp_path_factory.mktemp("dymu") / "thresholds.json")


def varied_inputs(processor, count=3):
    """Images of very different redundancy (two testbed scenes, random noise between them), with
    left-padded prompts of different lengths."""
    scenes = calibration_scenes(12)
    pictures = [scenes[0], images(1, seed=11)[0], scenes[10]][:count]
    prompts = [format_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(count)]
    return processor(images=pictures, text=prompts, return_tensors="pt", padding=True)


def alone(inputs, index):
    keep = inputs["attention_mask"][index].bool()
    return {
        "input_ids": inputs["input_ids"][index : index + 1, keep],
        "attention_mask": inputs["attention_mask"][index : index + 1, keep],
        "pixel_values": inputs["pixel_values"][index : index + 1],
    }


# ---- the matching ------------------------------------------------------------------------------
def test_threshold_matching_hand_example():
    # tokens: CLS, B1, A2, B3, A4, B5 (A = even indices, B = odd)
    metric = torch.tensor([[[1.0, 0], [0, 1], [0.6, 0.8], [1, 0], [0.9, 0.1], [-1, 0]]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    protect = torch.tensor([[True, False, False, False, False, False]])
    best, partner = best_partners(metric, valid, protect)
    # cos(A2, B1) = 0.8, cos(A4, B3) = 0.994; CLS is protected (-inf) although it matches B3 exactly
    torch.testing.assert_close(best[0, 1:], torch.tensor([0.8, 0.9 / (0.82**0.5)]))
    assert best[0, 0] == float("-inf") and partner[0, 1:].tolist() == [0, 1]
    # a threshold between the two similarities merges exactly the better edge
    assert threshold_merge(metric, valid, protect, 0.9).tolist() == [[0, 1, 2, 3, 3, 5]]
    # below both: both merge; above both: none
    assert threshold_merge(metric, valid, protect, 0.5).tolist() == [[0, 1, 1, 3, 3, 5]]
    assert threshold_merge(metric, valid, protect, 0.999).tolist() == [[0, 1, 2, 3, 4, 5]]
    # strictly greater: the best edge exactly at the threshold stays, one float below it merges
    at = float(best[0, 2])
    assert threshold_merge(metric, valid, protect, at).tolist() == [[0, 1, 2, 3, 4, 5]]
    below = float(np.nextafter(np.float32(at), np.float32(0)))
    assert threshold_merge(metric, valid, protect, below).tolist() == [[0, 1, 2, 3, 3, 5]]


def test_padding_neither_merges_nor_is_merged_into():
    metric = torch.tensor([[[1.0, 0], [0, 1], [0.6, 0.8], [1, 0], [1, 0], [1, 0]]]).repeat(2, 1, 1)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 3:] = False  # image 1 has 3 real tokens: B3 is padding, so A2 only sees B1
    protect = torch.zeros(2, 6, dtype=torch.bool)
    protect[:, 0] = True
    best, partner = best_partners(metric, valid, protect)
    assert best[1, 2] == float("-inf")  # A4 of image 1 is padding
    assert partner[1, 1] == 0  # its A2 matches B1, not the (better) padded B3
    assert threshold_merge(metric, valid, protect, 0.5).tolist() == [[0, 1, 1, 3, 3, 5], [0, 1, 1, 3, 4, 5]]


def hand_thresholds(layers, taus, heads, width, grid, target=10):
    identity = {"num_attention_heads": heads, "hidden_size": width, "image_size": grid * 14, "patch_size": 14,
                "vision_layers_run": layers, "tokens_per_image": grid * grid}
    return Thresholds(thresholds=taus, identity=identity, target=target, schedule=[1] * layers, images=0)


def test_counts_differ_per_image_and_sizes_add_up():
    torch.manual_seed(0)
    x = torch.randn(2, 17, 8)
    tokens = VisualTokens.from_patches(x, (4, 4), True)
    keys = torch.randn(2, 2, 17, 4)
    keys[0] = keys[0, :, :1]  # image 0: every token alike -> every A token merges
    method = DyMU(thresholds=hand_thresholds(1, [0.5], 2, 8, 4), vtu=False)
    merged = method.encode_layer(EncoderAttention(layer=0, num_layers=1, keys=keys, rows=None), tokens)
    counts = merged.counts.tolist()
    assert counts[0] == 1 + 8  # CLS + the 8 B tokens; the 8 unprotected A tokens merged
    assert counts[1] > counts[0]
    a_best = best_partners(keys[1:].mean(1), tokens.valid[1:], tokens.is_cls[1:])[0]
    assert counts[1] == 17 - int((a_best > 0.5).sum())
    assert merged.size.sum(dim=1).tolist() == [17, 17]
    assert merged.is_cls[:, 0].all() and not merged.valid[1:, counts[1]:].any()
    torch.testing.assert_close((merged.x * merged.size[..., None]).sum(1), x.sum(1), atol=1e-5, rtol=1e-5)


# ---- on the tiny model -----------------------------------------------------------------------
@pytest.mark.parametrize("vtu", [False, True], ids=["merged", "vtu"])
def test_batched_generate_equals_one_by_one_with_varying_counts(fresh, threshold_file, vtu):
    model, processor = fresh
    inputs = varied_inputs(processor)
    spec = f"dymu:thresholds={threshold_file},vtu={str(vtu).lower()}"
    with torch.no_grad(), slimvlm.apply(model, spec) as handle:
        batched = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
        counts = handle.stats.visual_tokens
        assert len(set(counts)) == 3, counts  # each image its own count
        for index in range(3):
            one = alone(inputs, index)
            single = model.generate(**one, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
            assert handle.stats.visual_tokens == [counts[index]]
            new_batched = batched.sequences[index, inputs["input_ids"].shape[1]:]
            assert torch.equal(new_batched, single.sequences[0, one["input_ids"].shape[1]:])
            for step_batched, step_alone in zip(batched.scores, single.scores):
                assert torch.allclose(step_batched[index], step_alone[0], atol=1e-4)


def test_calibration_meets_its_target_on_the_same_images(tiny, calibrated):
    model, processor = tiny
    thresholds, pictures = calibrated
    assert thresholds.target == TARGET and thresholds.images == 32
    assert thresholds.schedule == [138, 138] and sum(thresholds.schedule) == 576 - TARGET
    assert len(thresholds.thresholds) == 2 and all(0 <= t <= 1 for t in thresholds.thresholds)
    counts = token_counts(model, thresholds, pictures, batch_size=5, processor=processor)
    assert len(counts) == 32
    assert abs(sum(counts) / len(counts) - TARGET) < 0.15 * TARGET
    assert len(set(counts)) > 1


def test_constant_schedule_and_its_cap():
    # the authors' LLaVA-1.5 presets: 23 layers run of CLIP ViT-L/14-336
    assert schedule_for(576, 89, 23) == [22] * 4 + [21] * 19
    assert schedule_for(576, 394, 23) == [8] * 21 + [7] * 2
    with pytest.raises(SlimVLMError, match="out of reach in 2 encoder layers.*at most 181.*lowest target is 192"):
        schedule_for(576, 150, 2)
    assert schedule_for(576, 192, 2) == [192, 192]
    with pytest.raises(SlimVLMError, match="between 1 and 575"):
        schedule_for(576, 576, 2)


def test_thresholds_round_trip_and_refuse_another_model(tiny, calibrated, threshold_file):
    model, processor = tiny
    thresholds, _ = calibrated
    data = json.loads(threshold_file.read_text())  # plain JSON
    assert data["target"] == TARGET and data["identity"]["model_class"] == "LlavaForConditionalGeneration"
    loaded = Thresholds.load(threshold_file)
    assert loaded == thresholds and loaded.source == str(threshold_file)
    loaded.check(model)
    # the same model loaded in another dtype is the same model
    assert identity_of(model.to(torch.bfloat16)) == identity_of(model.to(torch.float32))

    config = copy.deepcopy(model.config)
    config.vision_config.num_attention_heads = 4
    with torch.random.fork_rng():
        other = LlavaForConditionalGeneration(config).eval()
    with pytest.raises(SlimVLMError, match="calibrated for another model.*num_attention_heads 2 vs 4"):
        loaded.check(other)
    method = DyMU(thresholds=str(threshold_file), vtu=False)
    with pytest.raises(SlimVLMError, match="another model"):
        method.check_identity(other)
    # through apply: refused before anything runs
    with pytest.raises(SlimVLMError, match="another model"):
        slimvlm.apply(other, f"dymu:thresholds={threshold_file},vtu=false")
    assert "forward" not in other.__dict__

    deeper = copy.deepcopy(model.config)
    deeper.vision_config.num_hidden_layers = 4
    with torch.random.fork_rng():
        other = LlavaForConditionalGeneration(deeper).eval()
    with pytest.raises(SlimVLMError, match="hold 2 per-layer thresholds but this model runs 3 encoder layers"):
        slimvlm.apply(other, f"dymu:thresholds={threshold_file},vtu=false")


def test_a_target_without_a_file_takes_the_model_folders_own(tiny_dir, tmp_path, threshold_file, tiny):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    (folder / "dymu").mkdir()
    shutil.copy(threshold_file, folder / "dymu" / f"target_{TARGET}.json")
    model, processor = load(folder)
    inputs = processor(images=images(2), text=[format_prompt("what color is the circle ?")] * 2, return_tensors="pt")
    counts = {}
    for spec in (f"dymu:target={TARGET},vtu=false", f"dymu:thresholds={threshold_file},vtu=false"):
        with slimvlm.apply(model, spec) as handle, torch.no_grad():
            model(**inputs)
            counts[spec] = handle.stats.visual_tokens
    assert len(set(map(tuple, counts.values()))) == 1  # the same thresholds, the same merges
    with pytest.raises(SlimVLMError, match="ships none at dymu/target_7.json"):
        slimvlm.apply(model, "dymu:target=7")


def test_bad_input(tmp_path, threshold_file, tiny):
    with pytest.raises(SlimVLMError, match=r"run `slimvlm calibrate --model PATH --method dymu --target N.*thresholds=FILE"):
        build("dymu")
    assert PRESETS["dymu-low"] == "dymu:target=89"
    # a preset without thresholds= takes the model folder's own; the tiny model's folder has none
    with pytest.raises(SlimVLMError, match=r"target of 89 tokens \(.* ships none at dymu/target_89.json\).*--target 89"):
        slimvlm.apply(tiny[0], "dymu-low")
    with pytest.raises(SlimVLMError, match=r"--target 394"):
        slimvlm.apply(tiny[0], "dymu-high:vtu=false")
    assert "forward" not in tiny[0].__dict__
    with pytest.raises(SlimVLMError, match=rf"calibrated for target={TARGET} tokens, but target=195"):
        build(f"dymu-mid:thresholds={threshold_file}")
    assert build(f"dymu:thresholds={threshold_file},target={TARGET}").target == TARGET
    with pytest.raises(SlimVLMError, match="no threshold file at"):
        build(f"dymu:thresholds={tmp_path / 'missing.json'}")
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(SlimVLMError, match="not JSON"):
        build(f"dymu:thresholds={tmp_path / 'bad.json'}")
    data = json.loads(threshold_file.read_text())
    data["thresholds"] = data["thresholds"][:1]
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(SlimVLMError, match="1 thresholds for a model that runs 2 encoder layers"):
        build(f"dymu:thresholds={tmp_path / 'short.json'}")
    with pytest.raises(SlimVLMError, match="target=0"):
        build(f"dymu:thresholds={threshold_file},target=0")
    with pytest.raises(SlimVLMError, match="vtu=maybe must be true or false"):
        build(f"dymu:thresholds={threshold_file},vtu=maybe")


def test_vtu_option_sets_the_stages(threshold_file):
    with_vtu = build(f"dymu:thresholds={threshold_file}")
    assert with_vtu.virtual_unmerge and {s.name for s in with_vtu.stages} == {"ENCODE", "PREFILL"}
    plain = build(f"dymu:thresholds={threshold_file},vtu=false")
    assert not plain.virtual_unmerge and {s.name for s in plain.stages} == {"ENCODE"}
    assert DyMU.virtual_unmerge is False and DyMU.proportional_attention
    assert slimvlm.methods()["dymu"]["options"] == {"thresholds": None, "target": None, "vtu": True}


def test_calibration_keeps_its_old_import_path():
    from slimvlm import calibrate
    from slimvlm.methods.dymu import calibration, images, schedule, thresholds

    homes = {**vars(calibration), **vars(images), **vars(schedule), **vars(thresholds)}
    for name in ("FORMAT", "RUNTIME_KEYS", "FACTS", "SHIPPED", "shipped_thresholds", "identity_of", "constant_schedule",
                 "schedule_for", "Thresholds", "BatchLevelMerge", "ImageFolder", "calibration_scenes", "calibrate_dymu",
                 "token_counts", "summary"):
        assert getattr(calibrate, name) is homes[name]


# ---- the command ---------------------------------------------------------------------------------
def test_calibrate_command(tiny_dir, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["calibrate", "--model", str(tiny_dir), "--method", "dymu", "--target", "250", "--images", "testbed",
                 "--num-images", "8", "--batch-size", "4", "--out", str(out), "--device", "cpu", "--check"]) == 0
    data = json.loads(out.read_text())
    assert data["target"] == 250 and data["images"] == 8 and len(data["thresholds"]) == 2
    printed = capsys.readouterr().out
    assert "patch tokens per image" in printed and f"dymu:thresholds={out}" in printed

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, picture in enumerate(images(5, seed=7)):
        picture.save(folder / f"{i}.png")
    Image.fromarray(np.zeros((100, 60, 3), dtype=np.uint8)).save(folder / "small.jpg")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "folder.json"
    assert main(["calibrate", "--model", str(tiny_dir), "--target", "400", "--images", str(folder),
                 "--batch-size", "3", "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["images"] == 6
    assert "skipped 1 files" in capsys.readouterr().out

    assert main(["calibrate", "--model", str(tiny_dir), "--method", "tome", "--target", "250", "--out", str(out), "--device", "cpu"]) == 2
    assert "--method dymu only" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tiny_dir), "--target", "100", "--num-images", "2", "--out", str(out), "--device", "cpu"]) == 2
    assert "lowest target is 192" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tiny_dir), "--target", "250", "--images", str(tmp_path / "none"), "--out", str(out), "--device", "cpu"]) == 2
