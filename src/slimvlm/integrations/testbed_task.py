"""The testbed's held-out scenes as an lmms-eval task that runs offline.

`slimvlm eval --model testbed` scores a method on these scenes with slimvlm's own loop; writing the same
scenes, prompts and scoring as an lmms-eval task lets lmms-eval's `--model slimvlm` be checked against it
and gives lmms-eval users a task that needs no download. The task folder holds one JSON Lines file (each
scene's image as base64 PNG, so the folder moves as a whole) and the task's YAML; the YAML's functions are
those below, imported from the installed slimvlm. Nothing here imports lmms-eval: the export works without it.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import PIL.Image

from ..bench.evaluate import is_correct
from ..testbed.build import format_prompt
from ..testbed.scenes import make_samples

TASK = "slimvlm_testbed"
DATA = "scenes.jsonl"
MAX_NEW_TOKENS = 3  # as bench.evaluate.evaluate: answers are one word

YAML = """\
# The testbed's held-out scenes ({samples} scenes, seed {seed}), as `slimvlm eval --model testbed --samples {samples}
# --seed {seed}` scores them: the same prompts, greedy answers of at most {new_tokens} tokens, and slimvlm's exact match
# (lower-cased, punctuation removed; the answer's first word or the whole answer). Written by
# `slimvlm export-testbed-task`; run: python -m lmms_eval --include_path THIS_FOLDER --tasks {task} ...
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function slimvlm.integrations.testbed_task.doc_to_visual
doc_to_text: !function slimvlm.integrations.testbed_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {new_tokens}
  do_sample: false
  num_beams: 1
  until: []
process_results: !function slimvlm.integrations.testbed_task.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  samples: {samples}
  seed: {seed}
"""


def _png_base64(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the model sees the pixels slimvlm eval gives it
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def export_task(out: str | Path, samples: int = 200, seed: int = 0) -> Path:
    """Write the task folder (the scenes' JSON Lines file and the task's YAML) to `out`; returns the YAML's path.
    The scenes are those of `slimvlm eval --samples SAMPLES --seed SEED`, in the same order."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / DATA).open("w", encoding="utf-8") as data:
        for sample in make_samples(samples, seed=seed, split="test"):
            record = {"id": sample.id, "question": sample.question, "answer": sample.answer,
                      "question_type": sample.question_type, "image": _png_base64(sample.image)}
            data.write(json.dumps(record) + "\n")
    path = out / f"{TASK}.yaml"
    path.write_text(YAML.format(task=TASK, data=DATA, samples=samples, seed=seed, new_tokens=MAX_NEW_TOKENS))
    return path


def doc_to_visual(doc: dict) -> list[PIL.Image.Image]:
    """The scene's image, decoded from the task file."""
    return [PIL.Image.open(io.BytesIO(base64.b64decode(doc["image"]))).convert("RGB")]


def doc_to_text(doc: dict) -> str:
    """The prompt `slimvlm eval` gives the testbed, its image placeholder included: a model that finds the
    placeholder in the text takes the prompt as it is."""
    return format_prompt(doc["question"])


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """slimvlm eval's scoring of the answer (bench.evaluate.is_correct)."""
    return {"exact_match": float(is_correct(results[0].strip(), doc["answer"]))}
