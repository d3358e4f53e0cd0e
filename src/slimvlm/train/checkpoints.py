"""Trainer checkpoints in safetensors and JSON only.

`transformers.Trainer` writes its checkpoints' optimizer, scheduler, RNG states and training
arguments with `torch.save` (pickle). `SafetensorsCheckpoints`, mixed into a Trainer, writes the
same state as tensors in safetensors and the rest as JSON, and reads it back when training resumes
(`trainer.train(resume_from_checkpoint=DIR)`), so a resumed run continues exactly where the saved
one stopped. A checkpoint folder `checkpoint-<step>/` holds:

    trainable.safetensors        every parameter that trains (frozen ones are the starting model's)
    optimizer.safetensors/.json  the optimizer's per-parameter tensors / its other state and groups
    scheduler.json               the learning-rate scheduler's state
    rng_state[_<rank>].safetensors/.json   torch (CPU and CUDA), numpy and Python RNG states
    trainer_state.json           the Trainer's own (step, log history)
    training_args.json
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import SlimVLMError

WEIGHTS = "trainable.safetensors"


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1))


def split_state(state: dict, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """A nested state dict -> (its tensors by dotted key, the rest as a JSON-able nest)."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
        elif isinstance(value, dict):
            inner_tensors, inner_rest = split_state(value, f"{name}.")
            tensors.update(inner_tensors)
            rest[str(key)] = inner_rest
        else:
            rest[str(key)] = value
    return tensors, rest


def join_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of split_state; keys that are whole numbers come back as ints (optimizer state)."""
    state = _int_keys(rest)
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        node = state
        for key in path:
            node = node.setdefault(_key(key), {})
        node[_key(leaf)] = tensor
    return state


def _key(key: str) -> int | str:
    return int(key) if key.isdigit() else key


def _int_keys(nest: dict) -> dict:
    return {_key(k): _int_keys(v) if isinstance(v, dict) else v for k, v in nest.items()}


class SafetensorsCheckpoints:
    """A transformers.Trainer mixin (put it first in the bases) that checkpoints without pickle."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {name: p.detach().cpu().clone() for name, p in self.model.named_parameters() if p.requires_grad}
        save_file(weights, folder / WEIGHTS)  # clone: tied tensors are saved once per name
        (folder / "training_args.json").write_text(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        path = Path(resume_from_checkpoint) / WEIGHTS
        if not path.is_file():
            raise SlimVLMError(f"no {WEIGHTS} in {resume_from_checkpoint}: not a checkpoint slimvlm wrote")
        saved = load_file(path)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(saved) != trainable:
            raise SlimVLMError(
                f"the checkpoint in {resume_from_checkpoint} trains other parameters than this run "
                f"({len(set(saved) ^ trainable)} differ, e.g. {sorted(set(saved) ^ trainable)[:3]}): resume with the same settings"
            )
        model.load_state_dict(saved, strict=False)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir)
        tensors, rest = split_state(self.optimizer.state_dict())
        save_file(tensors, folder / "optimizer.safetensors")
        _write_json(folder / "optimizer.json", rest)
        _write_json(folder / "scheduler.json", self.lr_scheduler.state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        folder = Path(checkpoint)
        rest = json.loads((folder / "optimizer.json").read_text())
        self.optimizer.load_state_dict(join_state(load_file(folder / "optimizer.safetensors"), rest))
        self.lr_scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))

    def _rng_files(self, folder: Path) -> tuple[Path, Path]:
        name = f"rng_state_{self.args.process_index}" if self.args.world_size > 1 else "rng_state"
        return folder / f"{name}.safetensors", folder / f"{name}.json"

    def _save_rng_state(self, output_dir: str) -> None:
        tensors_path, json_path = self._rng_files(Path(output_dir))
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        kind, keys, position, has_gauss, cached = np.random.get_state()
        tensors = {"torch_cpu": torch.random.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
        if torch.cuda.is_available():
            tensors |= {f"torch_cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
        save_file(tensors, tensors_path)
        _write_json(json_path, {"python": random.getstate(), "numpy": [kind, position, has_gauss, cached]})

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        tensors_path, json_path = self._rng_files(Path(checkpoint))
        if not tensors_path.is_file():
            raise SlimVLMError(
                f"no {tensors_path.name} in {checkpoint}: resume with as many processes as the run that saved it"
            )
        tensors, rest = load_file(tensors_path), json.loads(json_path.read_text())
        version, internal, gauss = rest["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, position, has_gauss, cached = rest["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
        torch.random.set_rng_state(tensors["torch_cpu"])
        cuda = [tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
