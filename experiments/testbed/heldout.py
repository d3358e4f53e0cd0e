"""Held-out accuracy during training: the same test-split questions asked at step 0, every
``--eval-every`` steps and at the end, on the model as it trains.

Why not :func:`slimvlm.bench.evaluate.evaluate`: that one answers items with a method installed
and records every answer for reports (the processor run on each call, a JPEG size per image, each
batch's Stats). Here the questions are asked several times inside the run's wall-clock budget, so
they are processed once and kept on the device, generation may run under the training's bf16
autocast, and the model goes back to training mode afterwards. The step-0 call also prices the
final one (the budget keeps twice its time in reserve), so every call goes through this one
function. The score is the card's: the first generated word against the answer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

from slimvlm.testbed import build, scenes


def held_out_batches(samples: Sequence[scenes.Sample], processor, batch_size: int, device: torch.device) -> list[dict[str, Any]]:
    """Processor outputs (left padding) for the held-out samples, cached on the device."""
    batches = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        enc = processor(
            text=[build.format_prompt(s.question) for s in chunk],
            images=[s.image for s in chunk],
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        batches.append(
            {
                "inputs": {k: v.to(device) for k, v in enc.items()},
                "answers": [s.answer.strip().lower() for s in chunk],
                "types": [s.question_type for s in chunk],
            }
        )
    return batches


@torch.no_grad()
def held_out_accuracy(model, tokenizer, eval_batches: Sequence[dict[str, Any]], autocast: bool = False) -> dict[str, Any]:
    """Greedy answers (max 3 new tokens, first word) vs. the truth: overall and per question type."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    use_amp = autocast and device.type == "cuda"
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    hits: dict[str, list[int]] = {t: [0, 0] for t in scenes.QUESTION_TYPES}
    with ctx:
        for b in eval_batches:
            inputs = b["inputs"]
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for text, answer, qt in zip(texts, b["answers"], b["types"]):
                words = text.strip().lower().split()
                hits[qt][0] += int(bool(words) and words[0] == answer)
                hits[qt][1] += 1
    if was_training:
        model.train()
    correct = sum(h[0] for h in hits.values())
    total = sum(h[1] for h in hits.values())
    return {
        "accuracy": correct / max(total, 1),
        "per_type": {t: h[0] / h[1] for t, h in hits.items() if h[1]},
        "n": total,
        "n_per_type": {t: h[1] for t, h in hits.items() if h[1]},
    }
