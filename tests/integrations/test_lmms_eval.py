"""lmms-eval's --model slimvlm (pip install -e ".[eval]"): on the exported testbed task it scores as slimvlm eval
does, at any batch size and over two processes, writes what the methods did beside the scores, and refuses a
bad method or an unsupported checkpoint at load. Skipped where lmms-eval is not installed."""

import json
import os
import subprocess
import sys

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from slimvlm.cli import main  # noqa: E402
from slimvlm.errors import SlimVLMError  # noqa: E402
from slimvlm.integrations.lmms_eval import SlimVLM, method_specs  # noqa: E402
from slimvlm.integrations.testbed_task import TASK, export_task  # noqa: E402

SCENES = 16  # 2 of each question type; the answers are compared one by one
# one method of each of stages 1-3 beside the untouched model; lmms-eval's model_args spelling
METHODS = ["none", "tome:r=8", "divprune:budget=64", "fastv:k=2;ratio=0.5"]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    export_task(folder, samples=SCENES)
    return folder


@pytest.fixture(scope="module")
def slimvlm_eval(tmp_path_factory):
    """slimvlm eval's accuracy per method on the same scenes, from its JSON."""
    path = tmp_path_factory.mktemp("eval") / "eval.json"
    specs = ",".join(m.replace(";", ",") for m in METHODS)
    assert main(["eval", "--samples", str(SCENES), "--methods", specs, "--json", str(path)]) == 0
    written = json.loads(path.read_text())
    return {row["method"]: {**row, "predictions": [r["prediction"] for r in written["records"] if r["method"] == row["method"]]}
            for row in written["summary"]}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


def run(task_dir, methods: str, batch_size: int, limit: int | None = None) -> dict:
    return simple_evaluate(model="slimvlm", model_args=f"pretrained=testbed,methods={methods}", tasks=[TASK],
                           batch_size=batch_size, limit=limit, log_samples=True, verbosity="WARNING",
                           task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))


@pytest.mark.parametrize("methods", METHODS)
def test_scores_as_slimvlm_eval_at_batch_1_and_8(task_dir, slimvlm_eval, methods):
    expected = slimvlm_eval[methods.replace(";", ",")]
    for batch_size in (1, 8):
        results = run(task_dir, methods, batch_size)
        assert results["results"][TASK]["exact_match,none"] == pytest.approx(expected["accuracy"], abs=0.005)
        answers = sorted((s["doc_id"], s["filtered_resps"][0].strip()) for s in results["samples"][TASK])
        assert [answer for _, answer in answers] == expected["predictions"]
        stats = results["throughput"]  # lmms-eval names each number avg_NAME
        assert stats["avg_samples"] == SCENES
        for name in ("mean", "min", "max"):
            assert stats[f"avg_visual_tokens_{name}"] == expected[f"visual_tokens_{name}"]
        assert min(stats[f"avg_{part}_ms_per_sample"] for part in ("vision", "prefill", "decode")) > 0


def test_methods_compose_with_plus_and_take_options_after_semicolons():
    assert method_specs("tome:r=8+fastv:k=2;ratio=0.5") == ["tome:r=8", "fastv:k=2,ratio=0.5"]
    model = get_model("slimvlm").create_from_arg_string("pretrained=testbed,methods=tome:r=8+fastv:k=2;ratio=0.5",
                                                        {"batch_size": 1, "device": "cpu"})
    assert [(m.name, m.options().get("ratio")) for m in model.handle.methods] == [("tome", None), ("fastv", 0.5)]
    model.clean()


def test_a_task_text_becomes_the_models_prompt():
    model = SlimVLM(pretrained="testbed", device="cpu")
    assert model.prompt("<image>\nwhat colour? answer:", 1) == "<image>\nwhat colour? answer:"  # the task placed it
    assert model.prompt("what colour?", 2) == "<image><image>\nwhat colour?"  # the testbed has no chat template
    model.processor.chat_template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                                     "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
    assert model.prompt("what colour?", 1) == "USER: <image>what colour? ASSISTANT:"
    model.clean()


@pytest.mark.parametrize("model_args, message", [
    ("pretrained=testbed,methods=nosuch", "unknown method 'nosuch'"),
    ("pretrained=testbed,methods=tome:r=8+divprune+random:budget=8", "both act at stage 2"),
    ("pretrained=testbed,methods=dymu-low", "thresholds calibrated for the target of 89"),  # the testbed ships none
    ("pretrained=testbed,methods=fastv:k=2,ratio=0.5", "separate a method's options with ';'"),
])
def test_a_bad_methods_value_fails_at_load(model_args, message):
    with pytest.raises(SlimVLMError, match=message):
        get_model("slimvlm").create_from_arg_string(model_args, {"batch_size": 1, "device": "cpu"})


def test_an_unsupported_checkpoint_class_fails_at_load(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Idefics2ForConditionalGeneration"]}))
    with pytest.raises(SlimVLMError, match="names Idefics2ForConditionalGeneration, which slimvlm does not support"):
        SlimVLM(pretrained=str(tmp_path))


def test_two_processes_score_as_one(task_dir, tmp_path):
    """fastv on the first SCENES - 1 scenes: two processes get 8 and 7, and lmms-eval repeats one request on the
    second to even them out."""
    one = run(task_dir, "fastv:k=2;ratio=0.5", 8, limit=SCENES - 1)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
               "-m", "lmms_eval", "--model", "slimvlm", "--model_args", "pretrained=testbed,methods=fastv:k=2;ratio=0.5",
               "--include_path", str(task_dir), "--tasks", TASK, "--batch_size", "8", "--limit", str(SCENES - 1),
               "--output_path", str(tmp_path)]
    done = subprocess.run(command, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.rglob("*_results.json")
    two = json.loads(path.read_text())
    assert two["results"][TASK]["exact_match,none"] == one["results"][TASK]["exact_match,none"]
    assert one["throughput"]["avg_samples"] == two["throughput"]["avg_samples"] == SCENES - 1
    for stat in ("avg_visual_tokens_mean", "avg_visual_tokens_min", "avg_visual_tokens_max"):
        assert two["throughput"][stat] == one["throughput"][stat]
