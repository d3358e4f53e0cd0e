"""Regional compilation of the LM's decoder layers' parts: a compiled training step computes what the eager one does."""

import pytest
import torch

from slimvlm.bench.train import make_trainable, training_batch
from slimvlm.train import DualSpeed, compile_llm_layers, eager_llm_layers


def _loss_and_grads(model, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
    dual = DualSpeed(model, pruner="divprune:ratio=0.25", isolator_length=2, lam=0.5)
    loss, _ = dual.loss(batch, step, details=False)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


# attention, MLP and norm as one graph each for all layers; the slow step runs two lengths (its own, all tokens,
# and its teacher's, the fast mode's), each a graph of its own (shapes are specialised)
# (LoRA through peft: its adapters inside the compiled attention and MLP, as bench-train --lora runs them)
@pytest.mark.parametrize(("mode", "graphs", "lora"), [("fast", 3, 0), ("slow", 6, 0), ("fast", 3, 4)])
def test_compiled_layers_give_the_eager_loss_and_gradients_under_checkpointing(tiny_dir, mode, graphs, lora):
    from slimvlm.testbed.build import load

    model, _ = load(tiny_dir)  # its own copy: compiling is for the model's lifetime
    model.gradient_checkpointing_enable()
    model.train()
    if lora:
        pytest.importorskip("peft")
    make_trainable(model, lora_rank=lora)
    batch = training_batch(model, batch_size=2, text_tokens=12, answer_tokens=4)
    step = next(s for s in range(1000) if DualSpeed(model).step_mode(s) == mode)
    eager_loss, eager_grads = _loss_and_grads(model, batch, step)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    layers = model.model.language_model.layers
    assert compile_llm_layers(model, backend="aot_eager") == sum(len(list(layer.children())) for layer in layers)
    compiled_loss, compiled_grads = _loss_and_grads(model, batch, step)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and any("layers" in name for name in eager_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # undone for evaluation: no graph more for a step of another length or mode
    assert eager_llm_layers(model) == sum(len(list(layer.children())) for layer in layers)
    other = next(s for s in range(1000) if DualSpeed(model).step_mode(s) != mode)
    _loss_and_grads(model, batch, other)
    assert counters["stats"]["unique_graphs"] == graphs


def test_bench_train_refuses_compiling_without_a_warm_up_round():
    from slimvlm.cli import main

    assert main(["bench-train", "--compile", "--warmup", "0", "--device", "cpu"]) == 2  # the compile would be timed
