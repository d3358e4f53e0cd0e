"""The LLaVA-Mini experiment runner (train at several budgets, evaluate, report) on a tiny model."""

import json
import math

import pytest
import torch

import slimvlm
from experiments import llava_mini as exp
from slimvlm.errors import SlimVLMError


def test_runner_trains_each_budget_saves_weights_and_reports(tiny_dir, tmp_path):
    out = tmp_path / "exp"
    code = exp.main(["--model", str(tiny_dir), "--out", str(out), "--budgets", "1,4", "--steps", "2", "--batch-size", "2",
                     "--eval-samples", "8", "--eval-batch-size", "4", "--workers", "0", "--device", "cpu",
                     "--layers", "1", "--baselines", "divprune"])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert list(rows) == ["none", "divprune:budget=1", "divprune:budget=4", "llava-mini:budget=1,layers=1",
                          "llava-mini:budget=4,layers=1"]
    model, _ = slimvlm.testbed.build.load(tiny_dir)
    config = model.config
    text = config.text_config
    per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2
    for budget in (1, 4):
        r = rows[f"llava-mini:budget={budget},layers=1"]
        assert r["trained"] and r["steps"] == 2 and r["train_s"] > 0 and r["samples"] == 8
        assert r["visual_tokens_mean"] == budget
        assert r["kv_bytes_per_image"] == budget * per_token
        assert r["kv_bytes_per_image_7b"] == budget * 32 * 2 * 32 * 128 * 2
        # pre-fusion over the full sequence costs more than dropping to the same budget
        assert r["flops_ratio"] > rows[f"divprune:budget={budget}"]["flops_ratio"]
        assert (out / f"c{budget}" / "llava_mini.safetensors").is_file()
        assert (out / f"c{budget}" / "model" / "config.json").is_file()  # the fine-tuned LLM beside the modules
        card = (out / f"c{budget}" / "README.md").read_text()  # the weights folder's model card
        assert f"# LLaVA-Mini modules, C = {budget}," in card and "llava-mini:weights=THIS_FOLDER" in card
        overall = f"| **overall** | {100 * rows['none']['accuracy']:.1f} | **{100 * r['accuracy']:.1f}** (retention"
        assert overall in card and "2 steps x batch 2" in card and "Command: `python -m experiments.llava_mini --model" in card
        loaded = slimvlm.registry.build(f"llava-mini:weights={out / f'c{budget}'}")
        assert (loaded.budget, loaded.layers) == (budget, 1)
    none = rows["none"]
    assert none["visual_tokens_mean"] == 576 and none["flops_ratio"] == 1.0 and none["kv_bytes_per_image"] == 576 * per_token
    table = (out / "results.md").read_text()
    assert "| llava-mini:budget=4,layers=1 | 4 |" in table and "Command: `python -m experiments.llava_mini" in table


def test_time_limit_stops_training(tiny_dir, tmp_path):
    out = tmp_path / "exp"
    assert exp.main(["--model", str(tiny_dir), "--out", str(out), "--budgets", "1", "--steps", "50", "--batch-size", "1",
                     "--eval-samples", "2", "--workers", "0", "--device", "cpu", "--layers", "1", "--baselines", "",
                     "--max-train-seconds", "0", "--freeze-llm", "--clip-samples", "2", "--clip-frames", "3",
                     "--save-dtype", "bfloat16"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "none (clips of 3 frames)", "llava-mini:budget=1,layers=1",
                                           "llava-mini:budget=1,layers=1 (clips of 3 frames)"]
    assert rows[1]["visual_tokens_mean"] == 3 * 576 and rows[3]["visual_tokens_mean"] == 3
    assert rows[3]["kv_bytes_per_image"] == rows[2]["kv_bytes_per_image"]  # per frame, as per image
    assert rows[3]["flops_ratio"] < 1 and rows[2]["steps"] == 1
    assert not (out / "c1" / "model").exists()  # frozen LLM: only the modules are saved
    from safetensors import safe_open

    with safe_open(str(out / "c1" / "llava_mini.safetensors"), "pt") as saved:
        assert {saved.get_tensor(name).dtype for name in saved.keys()} == {torch.bfloat16}
    assert "weights saved in bfloat16" in (out / "c1" / "README.md").read_text()


def test_wall_clock_cosine_ends_with_the_steps_or_the_clock_whichever_first():
    now = [0.0]
    schedule = exp.WallClockCosine(steps=100, seconds=None, warmup=10, clock=lambda: now[0])
    assert [schedule(s) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert schedule(55) == pytest.approx(0.5)  # half of the 90 steps after the warm-up
    assert schedule(100) == pytest.approx(0.0)
    timed = exp.WallClockCosine(steps=1000, seconds=60.0, warmup=2, clock=lambda: now[0])
    assert timed(1) == 0.5  # warm-up; the clock starts at the first step
    now[0] = 15.0
    assert timed(3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))  # a quarter of the time beats 3 of 1000 steps
    now[0] = 90.0
    assert timed(5) == pytest.approx(0.0)  # past the time: annealed, stays at zero
    now[0] = 16.0
    assert timed(750) == pytest.approx(0.5 * (1 + math.cos(math.pi * 748 / 998)))  # steps ahead of the clock


def test_prefusion_and_7b_shape_measures():
    ratio, kv = exp.shape_7b(576, 0)
    assert ratio == pytest.approx(1.0) and kv == 576 * 32 * 2 * 32 * 128 * 2  # 288 MiB per image in bf16
    ratio1, kv1 = exp.shape_7b(1, 4)
    assert kv1 == 2**19  # 0.5 MiB: one token in 32 layers
    assert 0.15 < ratio1 < 0.35  # the paper: 77% fewer FLOPs at C=1
    assert exp.shape_7b(1, 0)[0] < ratio1


def test_baseline_specs_and_budgets():
    assert exp.baseline_specs([4, 64], ["divprune", "visionzip"]) == [
        "divprune:budget=4", "divprune:budget=64", "visionzip:dominant=54,contextual=10"]
    assert exp.baseline_specs([16], ["visionzip"]) == ["visionzip:dominant=14,contextual=2"]
    assert exp.parse_budgets("1, 4,16") == [1, 4, 16]
    for bad in ("", "0", "a"):
        with pytest.raises(SlimVLMError):
            exp.parse_budgets(bad)
    with pytest.raises(SlimVLMError):
        exp.baseline_specs([4], ["tome"])


def test_init_continues_a_budget_from_the_weights_a_run_wrote(tiny_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--steps", "1", "--batch-size", "2", "--eval-samples", "2", "--workers", "0",
              "--device", "cpu", "--layers", "1", "--baselines", ""]
    assert exp.main([*common, "--out", str(tmp_path / "first"), "--budgets", "4"]) == 0
    first = tmp_path / "first" / "c4"
    out = tmp_path / "second"
    assert exp.main([*common, "--out", str(out), "--budgets", "4", "--init", str(first)]) == 0
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["init"] == str(first)
    assert f"Continued from `{first}`" in (out / "c4" / "README.md").read_text()
    assert f"Continued from `{first}`" in (out / "results.md").read_text()
    args = exp.parser().parse_args([*common, "--out", str(out), "--init", str(first)])
    assert exp.start_model(args) == first / "model"  # the model the modules were trained with, not --model
    # refused before anything runs: another budget, or several
    assert exp.main([*common, "--out", str(tmp_path / "x"), "--budgets", "16", "--init", str(first)]) == 2
    assert exp.main([*common, "--out", str(tmp_path / "y"), "--budgets", "4,16", "--init", str(first)]) == 2
    assert not (tmp_path / "x" / "results.json").exists() and not (tmp_path / "y" / "results.json").exists()
