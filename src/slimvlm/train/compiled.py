"""Regional compilation of the LM's decoder layers for training steps that the host cannot keep up with.

A pruned training step (DualSpeed's fast mode, NaivePrune) hands the LM a few hundred tokens per image, yet
dispatches as many ops as an untouched step: about 72,000 on LLaVA-NeXT-7B's depths with LoRA
(results/dualspeed_bench_train/train_step_ops_next7b_b4.txt), each a kernel launch behind Python, autograd and
peft's modules, so the step stops shrinking with its tokens. Compiling each decoder layer (one graph that every
layer of the same class reuses, PyTorch's regional compilation) fuses its elementwise ops and LoRA's small
matmuls into fewer launches, forward and backward. What is compiled is each layer's parts (attention, MLP,
norms), not the layer: transformers checkpoints a layer's forward, and a compiled region around the checkpoint
breaks on transformers 5.25's kernel-hub wrappers (they set a global inside the checkpoint, which torch.compile
refuses there), leaving the layer eager; the parts run compiled inside the checkpoint, and the recomputation
runs them compiled again. One graph serves every layer's part of the same class (PyTorch's regional
compilation). The rest of the step (the vision tower, the pruner, the head, the residual adds) stays eager.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..models import adapter_for


def compile_llm_layers(model: nn.Module, **options: Any) -> int:
    """Compile the parts of each of the model's LM decoder layers in place (`nn.Module.compile`; options go to
    torch.compile, e.g. backend, mode; shapes are specialised, dynamic=False, unless given); returns how many parts.
    For training runs: they stay compiled until eager_llm_layers(model)."""
    parts = _layer_parts(model)
    for part in parts:
        part.compile(**{"dynamic": False, **options})
    return len(parts)


def eager_llm_layers(model: nn.Module) -> int:
    """Undo compile_llm_layers: the parts run eagerly again; returns how many. Evaluate a trained model so: generate()'s
    lengths, its KV cache and no-grad mode would each recompile the training graphs, and torch.compile stops
    compiling a function after a few versions (config.recompile_limit), for every model of that class."""
    parts = _layer_parts(model)
    for part in parts:
        part._compiled_call_impl = None  # what nn.Module.compile set; its __call__ then runs forward as before
    return len(parts)


def _layer_parts(model: nn.Module) -> list[nn.Module]:
    return [part for layer in adapter_for(model).llm_layers for part in layer.children()]
