"""Continuing a chain of runs (``--init DIR``): reading a saved folder back, and the chain record
each run adds to its eval.json.

The weights of a folder saved by this trainer (same ``--size``, else SlimVLMError) are loaded,
together with its aux heads; the optimizer is new, with a short warmup (``--warmup-steps``, default
100 with ``--init``) and a fresh cosine over this run's budget. ``eval.json`` and the card record
the chain: every run's folder, steps, samples and minutes, and the totals. Several short calls (e.g.
two of 8.5 minutes) thus make one long training.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from slimvlm.errors import SlimVLMError
from slimvlm.testbed import build

from .config import SIZES, TrainConfig
from .loop import LoopResult
from .losses import AUX_HEADS_FILE, AuxHeads


@dataclass
class InitState:
    """What ``--init`` brings in: the folder's weights, its aux heads (if saved) and its training chain."""

    folder: Path
    state: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor] | None
    chain: dict[str, Any]

    @property
    def steps_done(self) -> int:
        return int(self.chain["steps"])

    @property
    def curriculum_step(self) -> int:
        """The steps earlier runs of the chain trained under a curriculum: where the ramp goes on."""
        return int(self.chain.get("curriculum_step", 0))

    def load_into(self, model: torch.nn.Module, head: AuxHeads, size: str) -> bool:
        """Load the weights (SlimVLMError if they do not fit) and, where they fit, the aux heads;
        True when the aux heads were resumed. The weights are dropped from memory afterwards."""
        try:
            model.load_state_dict(self.state, strict=True)
        except RuntimeError as error:
            raise SlimVLMError(f"--init {self.folder}: weights do not fit the --size {size} model: {error}") from None
        aux_resumed = False
        if self.aux is not None:
            try:
                head.load_state_dict(self.aux, strict=True)
                aux_resumed = True
            except RuntimeError:
                print(f"warning: --init {self.folder}: {AUX_HEADS_FILE} does not fit; new aux heads", file=sys.stderr)
        del self.state
        return aux_resumed


def size_of(config) -> str | None:
    """The --size whose shapes a model config has, or None."""
    for name, (vision, text) in SIZES.items():
        if all(getattr(config.vision_config, k, None) == v for k, v in vision.items()) and all(
            getattr(config.text_config, k, None) == v for k, v in text.items()
        ):
            return name
    return None


def load_init(folder: str | Path, tokenizer, size: str) -> InitState:
    """Load a saved testbed folder for ``--init``; SlimVLMError unless it has exactly ``size``'s shapes
    and the scene vocabulary."""
    folder = Path(folder)
    try:
        loaded, processor = build.load(folder, dtype=torch.float32, device="cpu")
    except Exception as error:  # noqa: BLE001 - any loading failure is a bad --init
        raise SlimVLMError(
            f"--init {folder}: cannot load a model and processor ({type(error).__name__}: {error})"
        ) from None
    vision, text = SIZES[size]
    parts = (("vision", vision, loaded.config.vision_config), ("text", text, loaded.config.text_config))
    problems = [
        f"{part} {key} is {getattr(cfg, key, None)}, --size {size} has {value}"
        for part, want, cfg in parts
        for key, value in want.items()
        if getattr(cfg, key, None) != value
    ]
    vocab = processor.tokenizer.get_vocab()
    if loaded.config.text_config.vocab_size != len(tokenizer) or vocab != tokenizer.get_vocab():
        problems.append("its tokenizer is not the testbed's scene vocabulary")
    if problems:
        other = size_of(loaded.config)
        hint = f" (it is a --size {other} model)" if other and other != size else ""
        raise SlimVLMError(f"--init {folder} does not fit --size {size}{hint}: " + "; ".join(problems))
    aux = None
    aux_path = folder / AUX_HEADS_FILE
    if aux_path.is_file():
        aux = load_file(str(aux_path))
    chain: dict[str, Any] = {"steps": 0, "samples": 0, "minutes": 0.0, "curriculum_step": 0, "runs": []}
    record_path = folder / "eval.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if isinstance(record.get("chain"), dict):
            chain = record["chain"]
        else:  # a folder from before chains were recorded: one run
            run = {"out": str(folder), "init": None, "steps": int(record.get("steps", 0)),
                   "samples": int(record.get("samples", 0)),
                   "minutes": round(float(record.get("total_s", 0.0)) / 60, 2),
                   "accuracy": record.get("accuracy")}  # fmt: skip
            # trained without a curriculum: the curriculum starts from its beginning
            chain = {"steps": run["steps"], "samples": run["samples"], "minutes": run["minutes"], "curriculum_step": 0,
                     "runs": [run]}  # fmt: skip
    else:
        print(f"warning: --init {folder} has no eval.json; its earlier training is not counted in the chain",
              file=sys.stderr)  # fmt: skip
    return InitState(folder, loaded.state_dict(), aux, chain)


def extend_chain(init: InitState | None, config: TrainConfig, result: LoopResult, accuracy: float, total_s: float) -> dict[str, Any]:
    """The chain after this run (its eval.json record, which the next --init reads): the run's own
    entry appended, the totals grown by its steps, samples and minutes, the curriculum position by
    its steps if it trained under a curriculum."""
    run = {
        "out": str(Path(config.out)),
        "init": None if init is None else str(init.folder),
        "steps": result.steps,
        "samples": result.steps * config.batch_size,
        "minutes": round(total_s / 60, 2),
        "batch_size": config.batch_size,
        "lr": config.lr,
        "warmup_steps": config.resolved_warmup(),
        "curriculum_steps": config.curriculum_steps,
        "complexity_cap_end": round(result.complexity_cap, 4),
        "token_dropout": config.token_dropout,
        "compiled": config.compile and result.compile_error is None,
        "accuracy": accuracy,
    }
    prior = init.chain if init is not None else {"steps": 0, "samples": 0, "minutes": 0.0, "runs": []}
    curriculum_offset = init.curriculum_step if init is not None else 0
    return {
        "steps": int(prior["steps"]) + run["steps"],
        "samples": int(prior["samples"]) + run["samples"],
        "minutes": round(float(prior["minutes"]) + total_s / 60, 2),
        "curriculum_step": curriculum_offset + (run["steps"] if config.curriculum_steps > 0 else 0),
        "runs": [*prior.get("runs", []), run],
    }
