"""`slimvlm eval` and `slimvlm demo` end to end on a tiny random model (accuracy is meaningless here)."""

import json

import pytest
import torch

from slimvlm.cli import main
from slimvlm.demo import BUDGETS, budget_specs, demo_dtype
from slimvlm.registry import methods

SHIPPED_BUDGETS = [1, 16]  # the LLaVA-Mini budgets the testbed folder ships (src/slimvlm/testbed/weights/llava_mini)


def test_eval_cli_writes_summary_and_records(tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_dir), "--methods", "divprune:budget=16,none", "--samples", "4",
                 "--batch-size", "2", "--device", "cpu", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    summary = {s["method"]: s for s in payload["summary"]}
    assert list(summary) == ["none", "divprune:budget=16"]  # the untouched model first, as the baseline
    assert summary["none"]["flops_ratio"] == 1.0 and summary["divprune:budget=16"]["flops_ratio"] < 0.5
    assert len(payload["records"]) == 8
    assert set(payload["records"][0]) == {"method", "id", "question_type", "complexity", "visual_tokens", "correct", "prediction", "answer"}
    assert "FLOPs %" in capsys.readouterr().out


def test_demo_covers_every_method_at_both_budgets(tiny, tmp_path):
    model, _ = tiny
    for budget in BUDGETS:
        specs = budget_specs(model, budget)
        assert set(specs) == set(methods()) - {"none"}
    assert main(["demo", "--model", str(tmp_path / "missing"), "--device", "cpu"]) == 2


def test_budget_rules_give_the_testbed_the_specs_the_demo_has_always_run():
    from slimvlm.methods.dymu import shipped_thresholds
    from slimvlm.models.loading import TESTBED
    from slimvlm.testbed.build import load

    model, _ = load(TESTBED)  # 576 tokens per image, 23 encoder layers run
    targets = sorted(shipped_thresholds(TESTBED))
    assert budget_specs(model, 64, targets) == {
        "random": "random:budget=64", "uniform": "uniform:budget=64", "pool": "pool:budget=64", "tome": "tome:r=103",
        "vtu": ["tome:r=103", "vtu"], "fastv": "fastv:k=2,ratio=0.8889", "visionzip": "visionzip:dominant=54,contextual=10",
        "divprune": "divprune:budget=64", "mustdrop": "mustdrop-llava7b-64", "dymu": "dymu:target=96", "llava-mini": None,
    }
    assert budget_specs(model, 192, targets) == {
        "random": "random:budget=192", "uniform": "uniform:budget=192", "pool": "pool:budget=196", "tome": "tome:r=77",
        "vtu": ["tome:r=77", "vtu"], "fastv": "fastv:k=2,ratio=0.6667", "visionzip": "visionzip:dominant=162,contextual=30",
        "divprune": "divprune:budget=192", "mustdrop": "mustdrop-llava7b-192", "dymu": "dymu:target=195", "llava-mini": None,
    }


def test_a_method_without_a_budget_rule_is_refused_not_skipped(tiny):
    import pytest

    from slimvlm.method import Method
    from slimvlm.models import adapter_for

    class Ruleless(Method):
        name = "ruleless"

    with pytest.raises(NotImplementedError, match="'ruleless' has no budget rule; override Ruleless.spec_for_budget"):
        Ruleless.spec_for_budget(adapter_for(tiny[0]), 64)


def test_demo_takes_the_shipped_dymu_target_nearest_each_budget(tiny, tmp_path):
    from slimvlm.methods.dymu import shipped_thresholds

    (tmp_path / "dymu").mkdir()
    for name in ("target_96.json", "target_195.json", "target_x.json", "notes.json"):
        (tmp_path / "dymu" / name).write_text("{}")
    targets = sorted(shipped_thresholds(tmp_path))
    assert targets == [96, 195]
    assert budget_specs(tiny[0], 64, targets)["dymu"] == "dymu:target=96"
    assert budget_specs(tiny[0], 192, targets)["dymu"] == "dymu:target=195"
    assert budget_specs(tiny[0], 64)["dymu"] is None


def test_testbed_ships_dymu_thresholds_calibrated_for_it():
    from slimvlm import apply
    from slimvlm.methods.dymu import shipped_thresholds
    from slimvlm.models.loading import TESTBED
    from slimvlm.testbed.build import load

    model, _ = load(TESTBED)
    assert sorted(shipped_thresholds(TESTBED)) == [96, 195, 394]
    for preset in ("dymu-mid", "dymu-high", "dymu:target=96"):
        apply(model, preset).remove()  # found in the model's folder; refused if made for other weights


def test_demo_writes_report(tiny, tiny_dir, tmp_path):
    out = tmp_path / "report"
    assert main(["demo", "--model", str(tiny_dir), "--samples", "2", "--batch-size", "2", "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())["summary"]
    skipped = {name for name, spec in budget_specs(tiny[0], BUDGETS[0]).items() if spec is None}
    assert skipped == {"dymu", "llava-mini"}  # they need a calibration file or trained weights the demo does not have
    assert len(summary) == 1 + len(BUDGETS) * (len(methods()) - 1 - len(skipped))
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 10_000
    assert (out / "merges.png").stat().st_size > 10_000
    assert "accuracy_vs_tokens.png" in (out / "README.md").read_text()


def test_demo_runs_the_llava_mini_weights_the_model_folder_ships(tiny, tiny_dir, tmp_path):
    import shutil

    from slimvlm.methods.llava_mini import LlavaMini, shipped_weights
    from slimvlm.models.loading import TESTBED

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    trained = LlavaMini(budget=4, layers=1)
    trained.build(tiny[0])
    trained.save(folder / "llava_mini" / "c4")  # trained with the folder's model as it is: no model.safetensors
    (folder / "llava_mini" / "c9").mkdir()  # no weights in it: not a shipped budget
    assert shipped_weights(folder) == {4: folder / "llava_mini" / "c4"}
    assert sorted(shipped_weights(TESTBED)) == SHIPPED_BUDGETS
    out = tmp_path / "report"
    assert main(["demo", "--model", str(folder), "--samples", "2", "--batch-size", "2", "--out", str(out), "--device", "cpu"]) == 0
    rows = {row["method"]: row for row in json.loads((out / "summary.json").read_text())["summary"]}
    assert rows["llava-mini:budget=4 (own model)"]["visual_tokens_mean"] == 4
    assert "llava-mini:budget=4 (own model)" in (out / "README.md").read_text()
    kept = tmp_path / "kept"
    assert main(["demo", "--model", str(folder), "--samples", "2", "--batch-size", "2", "--out", str(kept), "--device", "cpu",
                 "--keep-positions"]) == 0
    assert not any(row["method"].startswith("llava-mini") for row in json.loads((kept / "summary.json").read_text())["summary"])


def test_outline_marks_token_borders_and_dropped_patches():
    from PIL import Image

    from slimvlm.bench.report import outline_merges

    image = Image.new("RGB", (4, 4), (100, 100, 100))
    # 2x2 grid of 2x2-pixel patches: the top two patches form one token, bottom-left dropped
    pixels = outline_merges(image, [0, 0, -1, 1], (2, 2))
    assert pixels[0, 1].tolist() == [100, 100, 100]  # no border inside the merged token
    assert pixels[1, 0].tolist() == [255, 0, 255]  # border between the top token and what lies below
    assert pixels[2, 0].tolist() == [25, 25, 25]  # dropped: darkened


def test_plot_family_groups_presets_with_their_method():
    from slimvlm.bench.report import family

    assert family("tome:r=8") == "tome"
    assert family("mustdrop-llava7b-64") == family("mustdrop:layers=2") == "mustdrop"
    assert family("tome:r=77+vtu") == "tome+vtu"
    assert family("dymu-mid:vtu=false") == "dymu"


def test_eval_refuses_a_bad_spec_before_running_any(tiny_dir, capsys):
    assert main(["eval", "--model", str(tiny_dir), "--methods", "none,tome:r=8,dymu-mid", "--samples", "2", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "ships none at dymu/target_195.json" in captured.err
    assert "tome:r=8" not in captured.out  # no table: nothing ran


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_demo_runs_bfloat16_only_on_a_cpu_that_computes_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert demo_dtype(torch.device("cpu")) == expected
    assert demo_dtype(torch.device("cuda")) == "float32"
