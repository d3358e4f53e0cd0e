"""Tests for slimvlm.bench.evaluate: scoring, JSONL loading, the evaluation loop and its outputs."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import pytest
from PIL import Image

from slimvlm.bench import evaluate as E
from slimvlm.testbed import build, scenes

RECORD_KEYS = {"method", "id", "question_type", "complexity", "visual_tokens", "correct", "prediction", "answer"}
SUMMARY_KEYS = {
    "method",
    "tokens_complexity_spearman",
    "tokens_jpeg_spearman",
    "llm_visual_tokens_mean",
    "prefill_flops",
    "flops_ratio",
    "accuracy",
    "accuracy_by_type",
    "retention",
    "visual_tokens_mean",
    "visual_tokens_min",
    "visual_tokens_max",
    "samples",
}


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Red", "red"),
        ("  Yes.  ", "yes"),
        ("Top-Left!", "topleft"),
        ("a  big\tred\ncircle", "a big red circle"),
        ("«Oui»", "oui"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert E.normalize_answer(text) == expected


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("red", "red", True),
        ("Red.", "red", True),
        ("red circle", "red", True),  # first word
        ("a red circle", "red", False),  # first word only, not anywhere
        ("top-left", "topleft", True),
        ("top left", "top left", True),  # whole prediction, multi-word answer
        ("top left corner", "top left", False),
        ("blue", "red", False),
        ("", "red", False),
        ("red", "", False),  # an empty answer never matches
        ("  YES!", "yes", True),
    ],
)
def test_is_correct(prediction, answer, expected):
    assert E.is_correct(prediction, answer) is expected


# ------------------------------------------------------------------------------ JSONL


def _write_set(folder: Path, lines: list[str]) -> Path:
    Image.new("RGB", (40, 30), "red").save(folder / "a.png")
    Image.new("L", (20, 20), 128).save(folder / "b.png")  # grey-scale: must come back as RGB
    path = folder / "set.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_relative_and_absolute_paths(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "images" / "a.png")
    Image.new("L", (20, 20), 128).save(tmp_path / "b.png")
    lines = [
        json.dumps({"image": "images/a.png", "question": "what color?", "answer": "red", "id": "q1", "question_type": "color"}),
        "",
        json.dumps({"image": str(tmp_path / "b.png"), "question": "how many?", "answer": 2}),
    ]
    (tmp_path / "set.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = E.load_jsonl(tmp_path / "set.jsonl")
    assert len(items) == 2
    first, second = items
    assert (first.id, first.question, first.answer, first.question_type) == ("q1", "what color?", "red", "color")
    assert first.image.size == (40, 30) and first.image.mode == "RGB"
    assert first.image.getpixel((0, 0)) == (255, 0, 0)
    assert second.image.mode == "RGB" and second.answer == "2"
    assert second.question_type == "all" and second.complexity is None
    assert second.id == "set-3"  # default id: file stem + line number


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (json.dumps({"image": "a.png", "question": "q?"}), "'answer'"),
        (json.dumps({"question": "q?", "answer": "x"}), "'image'"),
        (json.dumps({"image": "missing.png", "question": "q?", "answer": "x"}), "missing.png"),
        (json.dumps({"image": "set.jsonl", "question": "q?", "answer": "x"}), "cannot read image"),
        ('{"image": "a.png", "question": ', "invalid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"image": "a.png", "question": ["q"], "answer": "x"}), "'question'"),
    ],
)
def test_load_jsonl_errors_name_the_line(tmp_path, bad_line, message):
    good = json.dumps({"image": "a.png", "question": "q?", "answer": "red"})
    path = _write_set(tmp_path, [good, good, bad_line])
    with pytest.raises(ValueError, match="line 3") as error:
        E.load_jsonl(path)
    assert message in str(error.value)


def test_from_sample_keeps_every_field():
    sample = scenes.make_samples(1, split="test")[0]
    item = E.from_sample(sample)
    assert (item.id, item.question, item.answer, item.question_type) == (
        sample.id,
        sample.question,
        sample.answer,
        sample.question_type,
    )
    assert item.image is sample.image and item.complexity == pytest.approx(sample.complexity)


# ----------------------------------------------------------------------- result maths


def _result(method: str, correct: list[bool], tokens: list[int], types: list[str]) -> E.MethodResult:
    records = [
        E.Record(method, f"i{k}", kind, None, count, ok, "x", "y")
        for k, (ok, count, kind) in enumerate(zip(correct, tokens, types))
    ]
    return E.MethodResult(method=method, records=records, stats=[])


def test_summary_retention_and_table():
    base = _result("none", [True, True, False, True], [576] * 4, ["color", "count", "color", "count"])
    pruned = _result("divprune:budget=64", [True, False, False, True], [64, 64, 60, 64], ["color", "count", "color", "count"])
    assert base.accuracy == 0.75 and pruned.accuracy == 0.5
    assert pruned.accuracy_by_type() == {"color": 0.5, "count": 0.5}
    summary = pruned.summary(baseline=base)
    assert set(summary) == SUMMARY_KEYS
    assert summary["retention"] == pytest.approx(0.5 / 0.75)
    assert (summary["visual_tokens_mean"], summary["visual_tokens_min"], summary["visual_tokens_max"]) == (63.0, 60, 64)
    assert summary["samples"] == 4
    assert pruned.summary()["retention"] is None
    zero = _result("none", [False, False], [576, 576], ["color", "color"])
    assert pruned.summary(baseline=zero)["retention"] is None

    table = E.format_table([base, pruned])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines[:2]}) == 1
    assert "none" in table and "divprune:budget=64" in table
    assert "66.7" in lines[3]  # retention %
    assert "color" in lines[0] and "count" in lines[0]


def test_write_json_baseline_only_when_first_is_none(tmp_path):
    base = _result("none", [True, False], [576, 576], ["a", "a"])
    other = _result("tome:r=8", [True, True], [400, 400], ["a", "a"])
    E.write_json(tmp_path / "x.json", [other, base], {"model": "m"})
    data = json.loads((tmp_path / "x.json").read_text())
    assert [s["retention"] for s in data["summary"]] == [None, None]
    with pytest.raises(ValueError, match="reserved"):
        E.write_json(tmp_path / "y.json", [base], {"records": []})


# ---------------------------------------------------------------- the evaluation loop


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build.make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    return build.load(folder)


@pytest.fixture(scope="module")
def items():
    return [E.from_sample(sample) for sample in scenes.make_samples(6, split="test")]


@pytest.fixture(scope="module")
def results(tiny, items):
    model, processor = tiny
    return [
        E.evaluate(model, processor, items, "none", batch_size=4, progress=False),
        E.evaluate(model, processor, items, "divprune:budget=16", batch_size=4, progress=False),
    ]


def _assert_restored(model):
    assert "forward" not in model.__dict__
    assert getattr(model, "_slimvlm_handle", None) is None


def test_evaluate_records(results, items, tiny):
    _assert_restored(tiny[0])
    for result, expected_tokens in zip(results, (576, 16)):
        assert len(result.records) == len(items)
        for record, item in zip(result.records, items):
            assert {f.name for f in fields(record)} == RECORD_KEYS
            assert set(asdict(record)) == RECORD_KEYS
            assert record.method == result.method
            assert (record.id, record.answer, record.question_type) == (item.id, item.answer, item.question_type)
            assert record.complexity == item.complexity
            assert record.visual_tokens == expected_tokens
            assert isinstance(record.prediction, str)
            assert record.correct == E.is_correct(record.prediction, record.answer)
        assert 0.0 <= result.accuracy <= 1.0
        assert result.accuracy == pytest.approx(sum(r.correct for r in result.records) / len(result.records))
        assert result.visual_tokens_min == result.visual_tokens_max == expected_tokens
        # one Stats per batch (6 items, batch 4 -> 2 batches), each covering its batch's images
        assert [len(s.visual_tokens) for s in result.stats] == [4, 2]
        assert all(s.llm_tokens and s.vision_tokens for s in result.stats)
    assert results[0].stats[0].visual_tokens == [576] * 4
    assert results[1].stats[1].visual_tokens == [16] * 2


def test_evaluate_summary_table_json(results, tmp_path):
    none, pruned = results
    summary = pruned.summary(baseline=none)
    assert set(summary) == SUMMARY_KEYS
    expected = None if none.accuracy == 0 else pruned.accuracy / none.accuracy
    assert summary["retention"] == (pytest.approx(expected) if expected is not None else None)
    assert summary["visual_tokens_mean"] == 16 and summary["samples"] == 6

    table = E.format_table(results)
    assert "none" in table and "divprune:budget=16" in table

    path = tmp_path / "out" / "results.json"
    E.write_json(path, results, {"model": "tiny", "seed": 0})
    data = json.loads(path.read_text())
    assert data["model"] == "tiny" and data["seed"] == 0
    assert [s["method"] for s in data["summary"]] == ["none", "divprune:budget=16"]
    assert data["summary"][1] == json.loads(json.dumps(summary))
    assert len(data["records"]) == 12
    assert all(set(record) == RECORD_KEYS for record in data["records"])
    assert data["records"][0] == asdict(none.records[0])


def test_evaluate_is_deterministic_and_accepts_method_lists(tiny, items, results):
    model, processor = tiny
    again = E.evaluate(model, processor, items[:4], ["divprune:budget=16"], batch_size=4, progress=False)
    assert again.method == "divprune:budget=16"
    assert [r.prediction for r in again.records] == [r.prediction for r in results[1].records[:4]]
    _assert_restored(model)


def test_evaluate_removes_handle_on_error(tiny, items):
    model, processor = tiny

    def broken_prompt(question: str) -> str:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        E.evaluate(model, processor, items[:2], "none", prompt=broken_prompt, progress=False)
    _assert_restored(model)


def test_evaluate_rejects_bad_arguments(tiny, items):
    model, processor = tiny
    with pytest.raises(ValueError, match="batch_size"):
        E.evaluate(model, processor, items, "none", batch_size=0, progress=False)
    with pytest.raises(ValueError, match="no items"):
        E.evaluate(model, processor, [], "none", progress=False)
    _assert_restored(model)


def test_spearman_hand_values():
    from slimvlm.bench.evaluate import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([5, 5, 5], [1, 2, 3]) is None
    # ties share a rank: x ranks (1.5, 1.5, 3), y ranks (1, 2, 3) -> r = 0.75 / sqrt(0.5 * 2) = 0.866...
    assert abs(spearman([1, 1, 2], [1, 2, 3]) - 0.8660254) < 1e-6


@pytest.mark.parametrize("keep", [False, True])
def test_evaluate_hands_keep_positions_to_apply(tiny, items, monkeypatch, keep):
    model, processor = tiny
    seen = []
    real_apply = E.apply

    def recording_apply(model, method, **options):
        seen.append(options)
        return real_apply(model, method, **options)

    monkeypatch.setattr(E, "apply", recording_apply)
    E.evaluate(model, processor, items[:2], "uniform:budget=16", keep_positions=keep, progress=False)
    assert seen == [{"keep_positions": keep}]
    _assert_restored(model)
