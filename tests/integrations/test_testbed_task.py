"""slimvlm export-testbed-task writes the scenes slimvlm eval scores, with its prompts and scoring (no lmms-eval
needed to write it)."""

import json

import numpy as np

from slimvlm.cli import main
from slimvlm.integrations.testbed_task import DATA, TASK, doc_to_text, doc_to_visual, process_results
from slimvlm.testbed.build import format_prompt
from slimvlm.testbed.scenes import make_samples


def test_the_task_holds_slimvlm_evals_scenes_prompts_and_scoring(tmp_path, capsys):
    assert main(["export-testbed-task", str(tmp_path), "--samples", "5", "--seed", "3"]) == 0
    assert f"--tasks {TASK}" in capsys.readouterr().out
    docs = [json.loads(line) for line in (tmp_path / DATA).read_text().splitlines()]
    samples = make_samples(5, seed=3, split="test")
    assert [(d["id"], d["question"], d["answer"]) for d in docs] == [(s.id, s.question, s.answer) for s in samples]
    for doc, sample in zip(docs, samples):
        (image,) = doc_to_visual(doc)
        assert np.array_equal(np.asarray(image), np.asarray(sample.image.convert("RGB")))
        assert doc_to_text(doc) == format_prompt(sample.question)
    assert process_results(docs[0], [f" {docs[0]['answer'].upper()}. and more"]) == {"exact_match": 1.0}
    assert process_results(docs[0], ["zzz"]) == {"exact_match": 0.0}
    yaml = (tmp_path / f"{TASK}.yaml").read_text()
    assert f"task: {TASK}" in yaml and f"test: {DATA}" in yaml and "samples: 5" in yaml and "seed: 3" in yaml


def test_a_task_needs_a_scene(tmp_path, capsys):
    assert main(["export-testbed-task", str(tmp_path), "--samples", "0"]) == 2
    assert "--samples 0" in capsys.readouterr().err
