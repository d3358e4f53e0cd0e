"""Accuracy of a LLaVA model on one-word VQA with a token-reduction method installed.

Why this exists: a method is only worth its saved tokens if the answers stay right, so every
benchmark needs the same loop: apply the method, answer each question greedily, score the answer,
and note how many visual tokens reached the LLM. Results are plain records (JSON, never pickle)
so that tables, plots and FLOPs estimates can be made later without re-running the model.
"""

from __future__ import annotations

import copy
import io
import json
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from tqdm.auto import tqdm

from ..api import apply
from . import flops
from ..runtime import Stats
from ..method import Method
from ..testbed.build import format_prompt

__all__ = [
    "VQAItem",
    "Record",
    "MethodResult",
    "from_sample",
    "load_jsonl",
    "normalize_answer",
    "is_correct",
    "evaluate",
    "write_json",
    "format_table",
]


# ----------------------------------------------------------------------------- items


@dataclass
class VQAItem:
    """One question about one image, or about a clip: `image` may be a list of frames (in order),
    each of which gets its own image placeholder in the prompt; the harness's only input type,
    whatever the data source."""

    id: str
    image: PIL.Image.Image | list[PIL.Image.Image]
    question: str
    answer: str
    question_type: str = "all"
    complexity: float | None = None


def from_sample(sample: Any) -> VQAItem:
    """A testbed.scenes.Sample (or clips.ClipSample, whose image is its frames) as a VQAItem."""
    return VQAItem(
        id=str(sample.id),
        image=list(sample.image) if isinstance(sample.image, (list, tuple)) else sample.image,
        question=sample.question,
        answer=sample.answer,
        question_type=sample.question_type,
        complexity=None if sample.complexity is None else float(sample.complexity),
    )


def _text_field(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def load_jsonl(path: str | Path) -> list[VQAItem]:
    """A user's own VQA set: one JSON object per line with "image", "question", "answer".

    Optional keys: "id" (default: file stem + line number), "question_type" (default "all"),
    "complexity" (a number or null). Relative image paths are resolved against the JSONL file's
    folder, so a data set folder can be moved as a whole. Images are loaded eagerly (RGB) so a
    broken file fails here, with its line number, rather than midway through an evaluation.
    Blank lines are skipped.
    """
    path = Path(path)
    folder = path.parent
    items: list[VQAItem] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg})") from error
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            missing = [key for key in ("image", "question", "answer") if key not in obj]
            if missing:
                raise ValueError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
            if not isinstance(obj["image"], str) or not obj["image"]:
                raise ValueError(f"{where}: 'image' must be a non-empty path string")
            image_path = Path(obj["image"])
            if not image_path.is_absolute():
                image_path = folder / image_path
            try:
                with PIL.Image.open(image_path) as opened:
                    image = opened.convert("RGB")  # convert() loads the pixels, so the file can close
            except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
                raise ValueError(f"{where}: cannot read image {str(image_path)!r} ({error})") from error
            complexity = obj.get("complexity")
            if complexity is not None and (isinstance(complexity, bool) or not isinstance(complexity, (int, float))):
                raise ValueError(f"{where}: 'complexity' must be a number or null")
            items.append(
                VQAItem(
                    id=_text_field(obj, "id", where) if "id" in obj else f"{path.stem}-{number}",
                    image=image,
                    question=_text_field(obj, "question", where),
                    answer=_text_field(obj, "answer", where),
                    question_type=_text_field(obj, "question_type", where) if "question_type" in obj else "all",
                    complexity=None if complexity is None else float(complexity),
                )
            )
    return items


# ---------------------------------------------------------------------------- scoring


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed: "Top-Left." -> "topleft".

    Punctuation is deleted (not turned into spaces) so hyphenated and joined spellings agree.
    """
    kept = "".join(char for char in text.lower() if not _is_punctuation(char))
    return " ".join(kept.split())


def is_correct(prediction: str, answer: str) -> bool:
    """True when the prediction's first word is the answer, or the whole prediction is.

    First word: one-word answers followed by chatter ("red circle") still count. Whole
    prediction: multi-word answers. An empty answer never matches.
    """
    target = normalize_answer(answer)
    if not target:
        return False
    predicted = normalize_answer(prediction)
    words = predicted.split()
    return (bool(words) and words[0] == target) or predicted == target


# ---------------------------------------------------------------------------- results


@dataclass
class Record:
    """One answered item; flat so a list of them is a table (JSON, pandas, csv). visual_tokens:
    the item's visual tokens that reached the LLM (summed over the frames of a clip)."""

    method: str
    id: str
    question_type: str
    complexity: float | None
    visual_tokens: int
    correct: bool
    prediction: str
    answer: str


@dataclass
class MethodResult:
    """Every record of one method, plus each batch's Stats (for FLOPs estimates later)."""

    method: str
    records: list[Record]
    stats: list = field(default_factory=list)  # list[Stats], one per batch, in order
    config: Any = None  # the model's config, for the FLOPs count
    jpeg_bytes: list[int] = field(default_factory=list)  # per record: the image's JPEG size, a complexity proxy

    def _require_records(self) -> None:
        if not self.records:
            raise ValueError(f"{self.method}: no records")

    @property
    def accuracy(self) -> float:
        """Fraction of items answered correctly."""
        self._require_records()
        return sum(r.correct for r in self.records) / len(self.records)

    def accuracy_by_type(self) -> dict[str, float]:
        """Accuracy per question type, in order of first appearance."""
        self._require_records()
        totals: dict[str, list[int]] = {}
        for record in self.records:
            entry = totals.setdefault(record.question_type, [0, 0])
            entry[0] += int(record.correct)
            entry[1] += 1
        return {kind: right / count for kind, (right, count) in totals.items()}

    @property
    def visual_tokens_mean(self) -> float:
        self._require_records()
        return sum(r.visual_tokens for r in self.records) / len(self.records)

    @property
    def visual_tokens_min(self) -> int:
        self._require_records()
        return min(r.visual_tokens for r in self.records)

    @property
    def visual_tokens_max(self) -> int:
        self._require_records()
        return max(r.visual_tokens for r in self.records)

    @property
    def prefill_flops(self) -> int | None:
        """Analytic prefill FLOPs (encoder + projector + LLM) summed over every batch run."""
        if self.config is None or not self.stats:
            return None
        return sum(flops.count(self.config, stats).prefill for stats in self.stats)

    @property
    def llm_visual_tokens_mean(self) -> float:
        """Visual tokens per LLM layer, averaged over layers and samples: what a layer pays for
        (equal to visual_tokens_mean unless a stage-3/4 method drops tokens inside the LLM)."""
        per_sample = [sum(layers) / len(layers) for stats in self.stats for layers in stats.kv_visual_entries]
        return sum(per_sample) / len(per_sample) if per_sample else self.visual_tokens_mean

    def flops_ratio(self, baseline: MethodResult | None) -> float | None:
        if baseline is None or not baseline.prefill_flops or self.prefill_flops is None:
            return None
        return self.prefill_flops / baseline.prefill_flops

    def retention(self, baseline: MethodResult | None) -> float | None:
        """Accuracy relative to the baseline's; None without one or when the baseline scored 0."""
        if baseline is None or baseline.accuracy == 0:
            return None
        return self.accuracy / baseline.accuracy

    def summary(self, baseline: MethodResult | None = None) -> dict:
        """The per-method numbers a report needs, JSON-ready."""
        return {
            "method": self.method,
            "accuracy": self.accuracy,
            "accuracy_by_type": self.accuracy_by_type(),
            "retention": self.retention(baseline),
            "visual_tokens_mean": self.visual_tokens_mean,
            "visual_tokens_min": self.visual_tokens_min,
            "visual_tokens_max": self.visual_tokens_max,
            "llm_visual_tokens_mean": self.llm_visual_tokens_mean,
            "prefill_flops": self.prefill_flops,
            "flops_ratio": self.flops_ratio(baseline),
            "tokens_complexity_spearman": self.token_correlation([r.complexity for r in self.records]),
            "tokens_jpeg_spearman": self.token_correlation(self.jpeg_bytes),
            "samples": len(self.records),
        }

    def token_correlation(self, values: Sequence[float | None]) -> float | None:
        """Spearman correlation of per-image token counts with `values` (complexity, JPEG bytes):
        does the count follow the image? None when counts are constant or values are missing."""
        if len(values) != len(self.records) or any(v is None for v in values):
            return None
        return spearman([r.visual_tokens for r in self.records], list(values))


# -------------------------------------------------------------------------- evaluation


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on tie-averaged ranks); None if either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5


def jpeg_bytes(image: PIL.Image.Image, quality: int = 75) -> int:
    """Size of the image as a JPEG: DyMU's proxy for how much an image holds."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def _label(method: str | Method | Sequence[str | Method]) -> str:
    if isinstance(method, str):
        return method
    if isinstance(method, Method):
        return repr(method)
    return "+".join(_label(m) for m in method)


def _frames(item: VQAItem) -> list[PIL.Image.Image]:
    frames = list(item.image) if isinstance(item.image, (list, tuple)) else [item.image]
    if not frames:
        raise ValueError(f"item {item.id!r} has an empty list of frames")
    return frames


def _with_frames(text: str, frames: int, image_token: str) -> str:
    """The prompt with its one image placeholder repeated once per frame (a clip's frames in order)."""
    if frames == 1:
        return text
    if text.count(image_token) != 1:
        raise ValueError(f"a prompt for {frames} frames must hold exactly one {image_token!r} to repeat, got: {text!r}")
    return text.replace(image_token, image_token * frames)


def _batches(items: Sequence[VQAItem], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate(
    model: torch.nn.Module,
    processor: Any,
    items: Sequence[VQAItem],
    method: str | list[str],
    batch_size: int = 16,
    max_new_tokens: int = 3,
    prompt: Callable[[str], str] = format_prompt,
    progress: bool = True,
    keep_positions: bool | None = None,
    prepared: dict | None = None,
) -> MethodResult:
    """Answer every item greedily with `method` installed; the model is restored afterwards.

    method: a spec ("divprune:budget=64"), a Method instance, or a list of these, one per stage;
    the result's method label is the spec (a Method's repr), or the labels joined with "+". prompt: question -> full prompt text
    with the model's image placeholder (LLaVA-1.5 checkpoints want their chat template here).
    Only the newly generated tokens are decoded and scored. keep_positions: passed to
    :func:`slimvlm.apply` (visual tokens keep their patches' rotary positions; None: the family's default).
    prepared: the processor's output per batch (by its items' ids), filled on first use: pass one dict to the
    evaluate() calls of a sweep over the same items and prompt, and each batch is processed once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    items = list(items)
    if not items:
        raise ValueError("no items to evaluate")
    label = _label(method)
    parameter = next(model.parameters())
    generate_options: dict[str, Any] = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generate_options["pad_token_id"] = processor.tokenizer.pad_token_id  # silences a warning per batch

    result = MethodResult(method=label, records=[], stats=[], config=model.config)
    image_token = getattr(processor, "image_token", None) or "<image>"
    handle = apply(model, method, keep_positions=keep_positions)
    bar = tqdm(total=len(items), desc=label, unit="item", disable=not progress)
    try:
        for batch in _batches(items, batch_size):
            frames = [_frames(item) for item in batch]
            key = (tuple(item.id for item in batch), parameter.device, parameter.dtype)
            inputs = None if prepared is None else prepared.get(key)
            if inputs is None:
                inputs = processor(
                    images=[frame for item_frames in frames for frame in item_frames],
                    text=[_with_frames(prompt(item.question), len(f), image_token) for item, f in zip(batch, frames)],
                    return_tensors="pt",
                    padding=True,
                    padding_side="left",  # decoder-only: the new tokens must follow every prompt directly
                )
                inputs = inputs.to(parameter.device, dtype=parameter.dtype)  # casts only float tensors
                if prepared is not None:
                    prepared[key] = inputs
            with torch.inference_mode():
                output = model.generate(**inputs, **generate_options)
            stats: Stats = copy.deepcopy(handle.stats)
            images = sum(len(f) for f in frames)
            if len(stats.visual_tokens) != images:
                raise RuntimeError(f"{label}: expected visual-token counts for {images} images, got {len(stats.visual_tokens)}")
            ends = [sum(len(f) for f in frames[: i + 1]) for i in range(len(frames))]
            per_sample = [sum(stats.visual_tokens[end - len(f) : end]) for f, end in zip(frames, ends)]
            result.stats.append(stats)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            predictions = processor.batch_decode(new_tokens, skip_special_tokens=True)
            for item, item_frames, prediction, tokens in zip(batch, frames, predictions, per_sample):
                result.jpeg_bytes.append(sum(jpeg_bytes(frame) for frame in item_frames))
                prediction = prediction.strip()
                result.records.append(
                    Record(
                        method=label,
                        id=item.id,
                        question_type=item.question_type,
                        complexity=item.complexity,
                        visual_tokens=int(tokens),
                        correct=is_correct(prediction, item.answer),
                        prediction=prediction,
                        answer=item.answer,
                    )
                )
            bar.update(len(batch))
    finally:
        bar.close()
        handle.remove()
    return result


# ----------------------------------------------------------------------------- output


def _baseline(results: Sequence[MethodResult]) -> MethodResult | None:
    """The first result is the baseline when it is the untouched model ("none")."""
    return results[0] if results and results[0].method == "none" else None


def write_json(path: str | Path, results: Sequence[MethodResult], extra: dict | None = None) -> None:
    """Summaries and every record as one JSON file; `extra` (run settings, model name) is merged in."""
    extra = dict(extra or {})
    clash = {"summary", "records"} & set(extra)
    if clash:
        raise ValueError(f"extra must not contain the reserved key(s) {sorted(clash)}")
    baseline = _baseline(results)
    payload = {
        "summary": [result.summary(baseline=baseline) for result in results],
        "records": [asdict(record) for result in results for record in result.records],
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


def format_table(results: Sequence[MethodResult]) -> str:
    """Aligned plain-text table: method, accuracy, retention, visual tokens, accuracy per type."""
    baseline = _baseline(results)
    types: list[str] = []
    for result in results:
        for kind in result.accuracy_by_type():
            if kind not in types:
                types.append(kind)
    header = ["method", "acc %", "retain %", "tok mean", "tok min", "tok max", "LLM tok", "FLOPs %", *types]
    rows = [header]
    for result in results:
        retention = result.retention(baseline)
        by_type = result.accuracy_by_type()
        rows.append(
            [
                result.method,
                f"{100 * result.accuracy:.1f}",
                "-" if retention is None else f"{100 * retention:.1f}",
                f"{result.visual_tokens_mean:.1f}",
                str(result.visual_tokens_min),
                str(result.visual_tokens_max),
                f"{result.llm_visual_tokens_mean:.1f}",
                "-" if result.flops_ratio(baseline) is None else f"{100 * result.flops_ratio(baseline):.1f}",
                *(f"{100 * by_type[kind]:.1f}" if kind in by_type else "-" for kind in types),
            ]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])
