"""DualSpeed: train a VLM on pruned visual tokens most of the time, on all of them some of the time.

Each training step runs in one of two modes:

* fast (probability 1 - r): the visual tokens are pruned (DivPrune keeping 10% by default) and a
  learnable *mode isolator*, a short soft prompt of `isolator_length` vectors, is prepended to
  each image's kept tokens so the model can tell the pruned regime from the full one.
  Loss: cross-entropy on the labels.
* slow (probability r): all visual tokens, no isolator. Loss: cross-entropy plus
  self-distillation from the fast mode, lam * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)),
  where z_t are the fast mode's logits (the teacher, computed without gradient) and z_s the slow
  mode's (the student), compared at the labelled (answer) positions, which both runs share.

The isolator is the only new parameter: add `DualSpeed.parameters()` to the optimizer, save it
with `save(dir)` (safetensors) and, at inference, install `inference_method()` with
`slimvlm.apply` (or `inference_method(isolator=False)` for the pruner alone).

The paper's two comparison runs are settings of the same class (`VARIANTS`, `variant()`):
baseline fine-tuning is r=1, lam=0, no pruner and no isolator (every step the plain CE on all
tokens); naive pruning is r=0 with no isolator (every step the CE on the pruned tokens alone).

The mode of a step is a pure function of (seed, step): every data-parallel rank that uses the
same seed and counts steps the same way picks the same mode, with no communication, so all ranks
run the same graph (fast or slow) in a step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import apply
from ..errors import SlimVLMError
from ..registry import build
from ..method import Method, PromptContext, Stage
from ..tokens import VisualTokens
from .distillation import answer_logits, answer_weights, distillation_kl
from .spans import batch_span, causal_lm_loss, lm_logits, row_tokens

ISOLATOR_FILE = "dualspeed_isolator.safetensors"
_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def step_uniform(seed: int, step: int) -> float:
    """A number in [0, 1) that depends only on (seed, step): the same on every rank, machine and
    Python/PyTorch version (a fixed integer hash, no global RNG state)."""
    mixed = _splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(step) & _MASK64))
    return (mixed >> 11) / float(1 << 53)


class ModeIsolator(Method):
    """Stage 2: run `pruner` (a stage-2-only method, or None for no pruning), then prepend the
    `length` learnable isolator vectors to each image's visual tokens.

    Not registered by name: build it through DualSpeed. The isolator tokens come first, have size 1
    and origins -length-1 .. -2 (before every patch, and never CLS_ORIGIN); the patches' token
    indices shift by `length`. With keep_positions=True they would sit at the rotary positions just
    before the image's first placeholder, so use the default renumbering.
    """

    name = "dualspeed-isolator"
    description = "DualSpeed's mode isolator: a learnable soft prompt prepended to the (pruned) visual tokens"
    stages = frozenset({Stage.PROJECT})

    def __init__(self, prompt: nn.Parameter, pruner: Method | None = None) -> None:
        if prompt.dim() != 2 or prompt.shape[0] < 1:
            raise SlimVLMError(f"the isolator must have shape (length >= 1, hidden), not {tuple(prompt.shape)}")
        if pruner is not None and set(pruner.stages) - {Stage.PROJECT}:
            stages = ", ".join(s.name.lower() for s in sorted(pruner.stages))
            raise SlimVLMError(f"the DualSpeed pruner must act at stage 2 (project) only; {pruner.name!r} acts at {stages}")
        self.prompt = prompt
        self.pruner = pruner
        self.tokens_per_image: int | None = None

    @property
    def length(self) -> int:
        return int(self.prompt.shape[0])

    def check_model(self, num_vision_layers: int, num_llm_layers: int, tokens_per_image: int) -> None:
        if self.length >= tokens_per_image:
            raise SlimVLMError(f"an isolator of {self.length} tokens leaves no room in the {tokens_per_image} tokens of an image")
        if self.pruner is not None:
            self.pruner.check_model(num_vision_layers, num_llm_layers, tokens_per_image)
        self.tokens_per_image = tokens_per_image

    def check_identity(self, model) -> None:
        if self.pruner is not None:
            self.pruner.check_identity(model)
        hidden = model.config.text_config.hidden_size
        if self.prompt.shape[1] != hidden:
            raise SlimVLMError(f"the isolator has width {self.prompt.shape[1]} but the language model's hidden size is {hidden}")

    def project(self, tokens: VisualTokens, context: PromptContext) -> VisualTokens:
        if self.pruner is not None:
            tokens = self.pruner.project(tokens, context)
        if tokens.has_cls:
            raise SlimVLMError("the DualSpeed isolator expects patch tokens only (no class token) at stage 2")
        batch, _, dim = tokens.x.shape
        length = self.length
        if dim != self.prompt.shape[1]:
            raise SlimVLMError(f"the isolator has width {self.prompt.shape[1]} but the visual tokens have {dim}")
        if self.tokens_per_image is not None and max(tokens.host_counts()) + length > self.tokens_per_image:
            raise SlimVLMError(
                f"{max(tokens.host_counts())} kept tokens + {length} isolator tokens exceed the {self.tokens_per_image} "
                "placeholder slots of an image; prune more or shorten the isolator"
            )
        device = tokens.x.device
        prompt = self.prompt.to(device=device, dtype=tokens.x.dtype)
        origin = torch.arange(length, device=device) - length - 1  # -length-1 .. -2
        shifted = torch.where(tokens.patch_to_token >= 0, tokens.patch_to_token + length, tokens.patch_to_token)
        return VisualTokens(
            x=torch.cat([prompt.expand(batch, -1, -1), tokens.x], dim=1),
            size=torch.cat([tokens.size.new_ones(batch, length), tokens.size], dim=1),
            origin=torch.cat([origin.expand(batch, -1), tokens.origin], dim=1),
            patch_to_token=shifted,
            grid=tokens.grid,
            has_cls=False,
            known=None if tokens.known is None else [count + length for count in tokens.known],
        )

    def __repr__(self) -> str:
        return f"{self.name}(length={self.length}, pruner={self.pruner!r})"


class DualSpeed:
    """DualSpeed training for a transformers LLaVA model (the model itself is never left modified).

    pruner: a slimvlm spec or Method acting at stage 2 only (DivPrune keeping 10% by default).
    r: probability of a slow step. isolator_length: soft-prompt tokens (0: none, the fast mode runs
    the pruner alone, as naive pruning does). lam, tau: weight and
    temperature of the slow mode's self-distillation. seed: picks the modes (see step_mode) and
    initialises the isolator.

        ds = DualSpeed(model)
        optimizer = torch.optim.AdamW([*model.parameters(), *ds.parameters()])
        for step, batch in enumerate(loader):  # batch: input_ids, attention_mask, pixel_values, labels
            loss, info = ds.loss(batch, step)
            loss.backward(); optimizer.step(); optimizer.zero_grad()
        ds.save(folder)
        slimvlm.apply(model, ds.inference_method())
    """

    def __init__(
        self,
        model: nn.Module,
        pruner: str | Method = "divprune:ratio=0.1",
        r: float = 0.1,
        isolator_length: int = 4,
        lam: float = 1.0,
        tau: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= float(r) <= 1.0:
            raise SlimVLMError(f"r={r} must lie in [0, 1] (the probability of a slow step)")
        if int(isolator_length) < 0:
            raise SlimVLMError(f"isolator_length={isolator_length} must be at least 0 (0: no mode isolator)")
        if float(tau) <= 0:
            raise SlimVLMError(f"tau={tau} must be positive")
        if float(lam) < 0:
            raise SlimVLMError(f"lam={lam} must be non-negative")
        self.model = model
        self.pruner = build(pruner)
        if not self.pruner.stages:  # "none": the isolator alone
            self.pruner = None
        elif set(self.pruner.stages) - {Stage.PROJECT}:
            stages = ", ".join(s.name.lower() for s in sorted(self.pruner.stages))
            raise SlimVLMError(f"the DualSpeed pruner must act at stage 2 (project) only; {self.pruner.name!r} acts at {stages}")
        self.r = float(r)
        self.lam = float(lam)
        self.tau = float(tau)
        self.seed = int(seed)
        config = model.config
        hidden = config.text_config.hidden_size
        weight = model.get_input_embeddings().weight
        self.isolator: nn.Parameter | None = None
        if int(isolator_length) > 0:
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            std = float(weight.detach().float().std())
            init = torch.randn(int(isolator_length), hidden, generator=generator) * std
            self.isolator = nn.Parameter(init.to(device=weight.device, dtype=torch.float32))
            self._method: Method = ModeIsolator(self.isolator, self.pruner)
        else:
            self._method = self.pruner if self.pruner is not None else build("none")

    # ---- modes ---------------------------------------------------------------------------------
    def step_mode(self, step: int) -> str:
        """'slow' with probability r, else 'fast'; a pure function of (seed, step), so every rank
        with the same seed picks the same mode for the same step without communicating."""
        return "slow" if step_uniform(self.seed, step) < self.r else "fast"

    # ---- parameters and files ------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The isolator: add it to the optimizer beside the model's parameters ([] without one)."""
        return [] if self.isolator is None else [self.isolator]

    def inference_method(self, isolator: bool = True) -> Method:
        """What to install with slimvlm.apply at inference: pruner + isolator, or the pruner alone."""
        if isolator and self.isolator is not None:
            return self._method
        if self.pruner is None:
            return build("none")
        return self.pruner

    def save(self, folder: str | Path) -> Path:
        """Write the isolator to folder/dualspeed_isolator.safetensors (no pickle)."""
        from safetensors.torch import save_file

        if self.isolator is None:
            raise SlimVLMError("this DualSpeed run has no mode isolator (isolator_length=0): there is nothing to save")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ISOLATOR_FILE
        metadata = {
            "format": "slimvlm-dualspeed-isolator",
            "pruner": repr(self.pruner) if self.pruner is not None else "none",
            "config": json.dumps({"r": self.r, "lam": self.lam, "tau": self.tau, "seed": self.seed}),
        }
        save_file({"isolator": self.isolator.detach().float().cpu().contiguous()}, str(path), metadata=metadata)
        return path

    def load(self, folder: str | Path) -> None:
        """Load the isolator saved by save() into this instance (in place: the optimizer keeps it)."""
        from safetensors.torch import load_file

        path = Path(folder)
        if path.is_dir():
            path = path / ISOLATOR_FILE
        if not path.is_file():
            raise SlimVLMError(f"no DualSpeed isolator at {path}")
        tensor = load_file(str(path))["isolator"]
        if self.isolator is None:
            raise SlimVLMError("this DualSpeed instance has no mode isolator (isolator_length=0) to load into")
        if tensor.shape != self.isolator.shape:
            raise SlimVLMError(f"the saved isolator has shape {tuple(tensor.shape)}, this one {tuple(self.isolator.shape)}")
        with torch.no_grad():
            self.isolator.copy_(tensor.to(self.isolator.device, self.isolator.dtype))

    # ---- losses --------------------------------------------------------------------------------
    def _inputs(self, batch: dict) -> tuple[dict, torch.Tensor]:
        if "labels" not in batch:
            raise SlimVLMError("the batch needs labels (-100 where no loss is taken)")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        inputs.setdefault("use_cache", False)
        return inputs, batch["labels"]

    def _loss_function(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.loss_function(logits=logits, labels=labels, vocab_size=self.model.config.text_config.vocab_size)

    def fast_forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fast mode: (CE loss, logits of the reduced sequence, its remapped labels)."""
        if "image_start" in batch:
            return self._direct(batch, self._method)
        inputs, labels = self._inputs(batch)
        handle = apply(self.model, self._method)
        try:
            output = self.model(**inputs, labels=labels)
            remapped = handle.labels
        finally:
            handle.remove()
        return output.loss, output.logits, remapped

    def slow_forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The slow mode's student run: the untouched model on all tokens: (CE, logits, labels)."""
        if "image_start" in batch:
            return self._direct(batch, None)
        inputs, labels = self._inputs(batch)
        output = self.model(**inputs)
        return self._loss_function(output.logits, labels), output.logits, labels

    def _direct(self, batch: dict, method: Method | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A mode on a batch whose rows hold one image at one place (train/spans.py): the span replaced by the
        method's tokens (all of them without one), with no host read: (CE, logits, labels)."""
        span = batch_span(batch, self.model.config.image_token_id)
        visual = row_tokens(self.model, batch, method).x
        rows = span.splice(self.model.get_input_embeddings()(batch["input_ids"]), visual)
        labels = span.splice_labels(batch["labels"], visual.shape[1])
        logits = lm_logits(self.model, rows)
        return causal_lm_loss(logits, labels), logits, labels

    def _kl(self, batch: dict, teacher: torch.Tensor, teacher_labels: torch.Tensor, student: torch.Tensor,
            labels: torch.Tensor) -> torch.Tensor:
        """The slow mode's distillation on the answer. On a direct batch the text after the visual tokens lines up
        in both runs (masked, no read); otherwise the answer's logits are indexed out of each."""
        if "image_start" not in batch:
            return distillation_kl(answer_logits(teacher, teacher_labels), answer_logits(student, labels), self.tau)
        span = batch_span(batch, self.model.config.image_token_id)
        kept = teacher.shape[1] - (student.shape[1] - span.length)  # the fast run's visual tokens
        taught = teacher[:, span.start + kept : -1]
        return distillation_kl(taught, student[:, span.start + span.length : -1], self.tau,
                               answer_weights(labels[:, span.start + span.length :]))

    def loss(self, batch: dict, step: int, details: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        """The step's loss and {'mode', 'ce', 'kl', 'loss'} (floats; kl is None in fast mode).
        details=False returns {'mode'} only: reading the floats waits for the device every step."""
        if getattr(self.model, "_slimvlm_handle", None) is not None:
            raise SlimVLMError("slimvlm is applied to the model; remove it before DualSpeed training (each mode installs its own)")
        mode = self.step_mode(step)
        if mode == "fast":
            ce, _, _ = self.fast_forward(batch)
            if not details:
                return ce, {"mode": mode}
            return ce, {"mode": mode, "ce": float(ce.detach()), "kl": None, "loss": float(ce.detach())}
        ce, student_logits, labels = self.slow_forward(batch)
        if self.lam == 0:
            kl = torch.zeros((), device=ce.device)
            total = ce
        else:
            with torch.no_grad():
                _, teacher_logits, teacher_labels = self.fast_forward(batch)
            kl = self._kl(batch, teacher_logits, teacher_labels, student_logits, labels)
            total = ce + self.lam * self.tau**2 * kl
        if not details:
            return total, {"mode": mode}
        info = {"mode": mode, "ce": float(ce.detach()), "kl": float(kl.detach()), "loss": float(total.detach())}
        return total, info


class DualSpeedModule(nn.Module):
    """The model and its isolator as one module, so data parallelism (DDP under `torchrun` or
    `accelerate launch`) averages the isolator's gradient with the model's: wrap it with
    `DistributedDataParallel(module, find_unused_parameters=True)` (a slow step does not use the
    isolator) and call `module(step, **batch)` for the step's loss. Every rank picks the same mode
    for a step (see `DualSpeed.step_mode`), so the ranks run the same graph."""

    def __init__(self, dual: DualSpeed) -> None:
        super().__init__()
        self.model = dual.model
        self.isolator = dual.isolator
        self._dual = dual

    def forward(self, step: int, **batch: torch.Tensor) -> torch.Tensor:
        loss, _ = self._dual.loss(batch, step, details=False)
        return loss


# The DualSpeed paper's three training runs as DualSpeed settings (one code path). baseline: every
# step is a slow step without distillation (plain CE on all tokens); naive pruning: every step is a
# fast step with the pruner alone (CE on pruned tokens, no isolator); dualspeed: the method.
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"pruner": "none", "r": 1.0, "lam": 0.0, "isolator_length": 0},
    "naive-pruning": {"r": 0.0, "lam": 0.0, "isolator_length": 0},
    "dualspeed": {},
}


def variant(name: str, **options: Any) -> dict[str, Any]:
    """DualSpeed keyword arguments for a run named in VARIANTS: `options` (pruner, r, lam, tau,
    isolator_length, seed) with the variant's fixed settings on top (baseline ignores the pruner,
    naive pruning ignores r, lam and the isolator)."""
    if name not in VARIANTS:
        raise SlimVLMError(f"unknown DualSpeed run {name!r}; choose one of {', '.join(VARIANTS)}")
    return {**options, **VARIANTS[name]}


def dualspeed_trainer(dual: DualSpeed, args, train_dataset, data_collator=None, **kwargs):
    """A `transformers.Trainer` that trains `dual` (model + isolator): each step's loss is
    `dual.loss(batch, global_step)`. Set `remove_unused_columns=False` in the TrainingArguments."""
    from .trainer import module_trainer

    return module_trainer(DualSpeedModule(dual), args, train_dataset, data_collator, pass_step=True, **kwargs)
