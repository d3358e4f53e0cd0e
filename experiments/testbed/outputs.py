"""What a run leaves in ``--out`` besides its log: the model (``save_pretrained``; float32 if it is
under 40 MB, else bfloat16), processor and generation config (loadable offline with
:func:`slimvlm.testbed.build.load`), the training-only aux heads (for ``--init``), ``eval.json``
and the model card ``README.md``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .card import model_card
from .losses import AUX_HEADS_FILE, AuxHeads

MAX_FLOAT32_BYTES = 40 * 1024 * 1024  # save in float32 when the weights fit, else bfloat16


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class SavedModel:
    dtype: torch.dtype
    params: int
    file_bytes: int  # the model's safetensors, aux heads not counted


def save_model(model: torch.nn.Module, processor, head: AuxHeads, out: Path) -> SavedModel:
    """Save the model (in eval mode, cast to its save dtype), the processor and the aux heads."""
    params = count_parameters(model)
    dtype = torch.float32 if params * 4 <= MAX_FLOAT32_BYTES else torch.bfloat16
    model.eval()
    model.to(dtype=dtype)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # Training-only state for a later --init (not part of the model; build.load ignores it).
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out / AUX_HEADS_FILE))
    file_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors") if p.name != AUX_HEADS_FILE)
    return SavedModel(dtype, params, file_bytes)


def write_results(out: Path, info: dict[str, Any], final: dict[str, Any], baseline: dict[str, Any]) -> None:
    """The model card and eval.json (the final held-out accuracy, the run's facts and its chain)."""
    (out / "README.md").write_text(model_card(info))
    record = {
        **final,
        "baseline_accuracy": baseline["accuracy"],
        "steps": info["steps"],
        "samples": info["samples"],
        "train_s": round(info["train_s"], 1),
        "total_s": round(info["total_s"], 1),
        "dtype": info["save_dtype"],
        "device": info["device_name"],
        "params": info["params"]["total"],
        "file_bytes": info["file_bytes"],
        "eval_set": f"make_samples({info['eval_samples']}, seed=0, split='test')",
        "batch_size": info["batch_size"],
        "curriculum_steps": info["curriculum_steps"],
        "complexity_cap_end": info["chain"]["runs"][-1]["complexity_cap_end"],
        "init": info["init"],
        "compile": info["compile"],
        "compile_error": info["compile_error"],
        "first_step_s": None if info["first_step_s"] is None else round(info["first_step_s"], 2),
        "chain": info["chain"],
    }
    (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
