"""Vision-only timing (ToMe, DyMU calibrated in place) and the one-layer VTU micro-bench, on the tiny model."""

import json

import pytest

from slimvlm import SlimVLMError
from slimvlm.bench.layer import bench_layer
from slimvlm.bench.vision import bench_vision, calibrate_specs, scene_pixels
from slimvlm.cli import main


def test_vision_only_timing_counts_tokens_and_calibrates_dymu(tiny, tmp_path):
    model, processor = tiny
    runs, made = calibrate_specs(model, [["none"], ["tome:r=16"], ["dymu-mid:vtu=false"]], 8, tmp_path, processor, batch_size=4)
    assert len(made) == 1 and made[0]["target"] == 195 and made[0]["calibrated_in_this_run"]
    assert runs[2] == [f"dymu-mid:vtu=false,thresholds={made[0]['file']}"]
    pixels = scene_pixels(model, 4, processor)
    results = bench_vision(model, runs, pixels, [1, 4], warmup=0, repeats=1)
    by = {(r.batch_size, r.method.split(",")[0]): r for r in results}
    assert len(by) == 6
    for batch in (1, 4):
        assert by[batch, "none"].tokens_min == by[batch, "none"].tokens_max == 576
        # the tiny tower runs 2 layers to its feature layer: 576 - 2 * 16
        assert by[batch, "tome:r=16"].tokens_mean == 544
        assert by[batch, "none"].flops_ratio == 1.0
        assert by[batch, "dymu-mid:vtu=false"].flops_ratio < by[batch, "tome:r=16"].flops_ratio < 1.0
        assert all(by[batch, m].latency_ms > 0 for m in ("none", "tome:r=16", "dymu-mid:vtu=false"))
    dymu = by[4, "dymu-mid:vtu=false"]
    assert 100 < dymu.tokens_mean < 300  # calibrated for 195 on other scenes of the same kind
    assert dymu.tokens_min <= dymu.tokens_mean <= dymu.tokens_max


def test_vision_only_timing_refuses_later_stages(tiny):
    model, processor = tiny
    pixels = scene_pixels(model, 1, processor)
    with pytest.raises(SlimVLMError, match="stage-1 methods only"):
        bench_vision(model, [["tome:r=8", "fastv"]], pixels, [1], warmup=0, repeats=1)


def test_layer_bench_full_merged_and_vtu(tiny):
    model, _ = tiny
    results = bench_layer(model, "tome:r=16", batch_size=2, text_tokens=64, layer=1, warmup=0, repeats=1)
    by = {r.case: r for r in results}
    assert list(by) == ["full", "merged", "merged+vtu"]
    assert (by["full"].tokens, by["full"].attended) == (640, 640)
    assert (by["merged"].tokens, by["merged"].attended) == (544 + 64, 544 + 64)
    # VTU: projections and MLP over the merged tokens, attention over every patch's copy
    assert (by["merged+vtu"].tokens, by["merged+vtu"].attended) == (544 + 64, 640)
    assert by["merged"].flops < by["merged+vtu"].flops < by["full"].flops
    assert all(r.latency_ms > 0 and r.batch_size == 2 for r in results)
    assert by["merged+vtu"].visual_tokens == [544, 544]
    assert "_slimvlm_handle" not in model.__dict__  # every case removed its methods


def test_bench_stage_clis(tiny_dir, tmp_path):
    vision, layer = tmp_path / "vision.json", tmp_path / "layer.json"
    assert main(["bench-vision", "--model", str(tiny_dir), "--device", "cpu", "--methods", "none,dymu-high:vtu=false",
                 "--batch-sizes", "2", "--calibration-images", "4", "--warmup", "0", "--repeats", "1", "--json", str(vision)]) == 0
    payload = json.loads(vision.read_text())
    assert payload["device"] == "cpu" and payload["command"].startswith("slimvlm ")
    assert payload["calibration"][0]["target"] == 394 and (tmp_path / "thresholds").is_dir()
    assert [r["batch_size"] for r in payload["results"]] == [2, 2]
    assert main(["bench-layer", "--model", str(tiny_dir), "--device", "cpu", "--batch-sizes", "1", "--layer", "0",
                 "--warmup", "0", "--repeats", "1", "--json", str(layer)]) == 0
    payload = json.loads(layer.read_text())
    assert [r["case"] for r in payload["results"]] == ["full", "merged", "merged+vtu"]
    assert payload["results"][2]["attended"] == 640


def test_scene_pixels_without_a_processor_match_the_llava_processor(tiny):
    """A random model of a published shape has no processor: CLIP preprocessing at the tower's size
    stands in for it, and matches what the LLaVA-1.5 processor gives."""
    import torch

    model, processor = tiny
    torch.testing.assert_close(scene_pixels(model, 2, None), scene_pixels(model, 2, processor))
