"""What a training run is asked to do: :class:`TrainConfig` (every knob), its command-line flags
(one per field) and the command line that reproduces a run, as the model card records it."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from slimvlm.errors import SlimVLMError
from slimvlm.models.loading import resolve_device
from slimvlm.testbed import build

from .curriculum import CURRICULUM_START
from .dataset import DROPOUT_KEEPS, MAX_STREAMS

MODULE = "experiments.testbed.train"
PROGRAM = f"python -m {MODULE}"

#: The shipped testbed model: CLIP-style tower (336 px, patch 14 -> 576 patches + CLS).
TESTBED_VISION: dict[str, int] = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768)
#: Llama decoder of the testbed model.
TESTBED_TEXT: dict[str, int] = dict(
    hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768
)
SIZES: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "testbed": (TESTBED_VISION, TESTBED_TEXT),
    "tiny": (build.TINY_VISION, build.TINY_TEXT),
}

DEFAULT_WARMUP_STEPS = 300
INIT_WARMUP_STEPS = 100  # --init: the weights are trained already, only the new optimizer's moments warm up


def default_workers() -> int:
    return max(0, min(14, (os.cpu_count() or 1) - 1))


def training_device(name: str) -> torch.device:
    """slimvlm's :func:`resolve_device`, held to the two device types the training loop is written
    for (bf16 autocast, fused AdamW and pinned memory on CUDA; float32 on the CPU)."""
    device = resolve_device(name)
    if device.type not in ("cuda", "cpu"):
        raise SlimVLMError(f"--device must be cuda or cpu, got {name!r}")
    return device


@dataclass
class TrainConfig:
    """Every knob of :func:`~.train.train`; the CLI flags map one to one (``--batch-size`` -> batch_size)."""

    out: str | Path
    size: str = "testbed"
    minutes: float = 9.0
    device: str = "cuda"
    batch_size: int = 192
    lr: float = 1e-3
    weight_decay: float = 0.05
    eval_samples: int = 800
    eval_every: int = 1000
    eval_batch_size: int = 200
    workers: int | None = None  # None -> min(14, cpu_count - 1)
    seed: int = 0
    steps: int | None = None  # optional step cap; the time budget always applies too
    questions_per_scene: int = 3
    warmup_steps: int | None = None  # None -> 300, or 100 with --init
    log_every: int = 50
    curriculum_steps: int = 3000  # complexity cap ramps 0.15 -> 1 over these global steps; 0 = off
    init: str | Path | None = None  # a saved testbed folder to continue training from
    compile: bool = False  # torch.compile the training forward (never used by generate)
    token_dropout: float = 0.25  # fraction of batches whose image spans keep only 64 or 192 random patches
    progress: bool = True

    def resolved_warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return INIT_WARMUP_STEPS if self.init is not None else DEFAULT_WARMUP_STEPS

    def resolved_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers

    def validate(self) -> None:
        if self.size not in SIZES:
            raise SlimVLMError(f"unknown --size {self.size!r}; expected one of {sorted(SIZES)}")
        if not (isinstance(self.minutes, (int, float)) and math.isfinite(self.minutes) and self.minutes > 0):
            raise SlimVLMError(f"--minutes must be a positive number, got {self.minutes!r}")
        for name in ("batch_size", "eval_samples", "eval_every", "eval_batch_size", "questions_per_scene", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SlimVLMError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        if self.warmup_steps is not None and not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise SlimVLMError(f"--warmup-steps must be an int >= 0, got {self.warmup_steps!r}")
        n = self.curriculum_steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise SlimVLMError(f"--curriculum-steps must be an int >= 0 (0 disables), got {self.curriculum_steps!r}")
        if self.init is not None:
            if not (Path(self.init) / "config.json").is_file():
                raise SlimVLMError(f"--init {self.init}: not a saved model folder (no config.json there)")
            if Path(self.init).resolve() == Path(self.out).resolve():
                raise SlimVLMError("--out must differ from --init (each run of a chain keeps its own folder and log)")
        if self.steps is not None and self.steps < 1:
            raise SlimVLMError(f"--steps must be >= 1 when given, got {self.steps!r}")
        if self.workers is not None and not (0 <= self.workers < MAX_STREAMS):
            raise SlimVLMError(f"--workers must be in [0, {MAX_STREAMS}), got {self.workers!r}")
        if not (0.0 <= self.token_dropout <= 1.0):
            raise SlimVLMError(f"--token-dropout must be in [0, 1], got {self.token_dropout!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SlimVLMError(f"--lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise SlimVLMError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SlimVLMError(f"--seed must be a non-negative int, got {self.seed!r}")
        training_device(self.device)

    def command(self) -> str:
        """The exact CLI command that reproduces this configuration."""
        parts = [*PROGRAM.split(), "--out", str(self.out)]
        defaults = TrainConfig(out="")
        for f in dataclasses.fields(self):
            if f.name in ("out", "progress"):
                continue
            value = getattr(self, f.name)
            if f.name == "workers" and value is None:
                value = default_workers()
            if f.name not in _ALWAYS_IN_COMMAND and value == getattr(defaults, f.name):
                continue
            if value is None:
                continue
            if isinstance(value, bool):  # store_true flags
                if value:
                    parts.append(f"--{f.name.replace('_', '-')}")
                continue
            parts += [f"--{f.name.replace('_', '-')}", str(value)]
        return shlex.join(parts)


_ALWAYS_IN_COMMAND = ("size", "minutes", "device", "batch_size", "lr", "workers", "seed", "questions_per_scene")


def parser() -> argparse.ArgumentParser:
    d = TrainConfig(out="")
    p = argparse.ArgumentParser(prog=PROGRAM, description="Train slimvlm's testbed VLM from scratch.")
    p.add_argument("--out", required=True, help="output folder (model, processor, log, eval.json, README.md)")
    p.add_argument("--size", default=d.size, help=f"one of {sorted(SIZES)} (default {d.size})")
    p.add_argument("--minutes", type=float, default=d.minutes, help="wall-clock budget, final eval included")
    p.add_argument("--device", default=d.device)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--workers", type=int, default=None, help="data workers (default min(14, cpu_count - 1))")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=None, help="optional step cap (the time budget still applies)")
    p.add_argument("--questions-per-scene", type=int, default=d.questions_per_scene)
    p.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps,
        help=f"linear lr warmup (default {DEFAULT_WARMUP_STEPS}, or {INIT_WARMUP_STEPS} with --init)",
    )  # fmt: skip
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument(
        "--curriculum-steps", type=int, default=d.curriculum_steps,
        help=f"training-scene complexity is uniform in [0, cap], cap rising linearly from {CURRICULUM_START} to 1 "
        f"over this many global steps (counted over an --init chain); 0 disables (default {d.curriculum_steps})",
    )  # fmt: skip
    p.add_argument(
        "--init", default=None, metavar="DIR",
        help="continue training a saved testbed folder (same --size; new optimizer, cosine over this run); "
        "the card and eval.json record the whole chain",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="torch.compile the training forward/backward (evaluation's generate stays eager)",
    )  # fmt: skip
    p.add_argument(
        "--token-dropout", type=float, default=d.token_dropout,
        help=f"fraction of batches whose image spans keep only {' or '.join(map(str, DROPOUT_KEEPS))} random patches, "
        f"renumbered, so the LM tolerates shortened spans (default {d.token_dropout}; 0 disables)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def config_from_argv(argv: list[str] | None = None) -> TrainConfig:
    args = vars(parser().parse_args(argv))
    args["progress"] = not args.pop("no_progress")
    return TrainConfig(**args)
