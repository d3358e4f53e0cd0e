"""Trainer checkpoints without pickle, and an exact resume."""

import json

import pytest
import torch

from slimvlm.train.checkpoints import join_state, split_state
from slimvlm.train.trainer import module_trainer


def test_split_and_join_state_round_trip_an_optimizer_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.98))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    tensors, rest = split_state(state)
    assert set(tensors) == {f"state.{i}.{k}" for i in (0, 1) for k in ("step", "exp_avg", "exp_avg_sq")}
    back = join_state(tensors, json.loads(json.dumps(rest)))
    assert back["param_groups"][0]["params"] == [0, 1] and back["param_groups"][0]["lr"] == 0.1
    for index in (0, 1):
        for key, value in state["state"][index].items():
            assert torch.equal(back["state"][index][key], value)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(back)  # the optimizer accepts it


class Regression(torch.nn.Module):
    """A module whose forward is its loss, as module_trainer wants; one frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x, y):
        noise = 0.01 * torch.randn(x.shape[0], 1)  # the global RNG, restored on resume
        return ((self.layer(x) * self.frozen + noise - y) ** 2).mean()


def _trainer(folder, max_steps=6, **extra):
    from transformers import TrainingArguments

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=generator)
    data = [{"x": x[i], "y": x[i, :1] * 2} for i in range(48)]
    args = TrainingArguments(output_dir=str(folder), per_device_train_batch_size=8, max_steps=max_steps, learning_rate=0.05,
                             lr_scheduler_type="cosine", warmup_steps=2, use_cpu=True, report_to=[],
                             remove_unused_columns=False, seed=3, save_strategy="steps", save_steps=3, **extra)
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    return module_trainer(Regression(), args, data, data_collator=collate)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does_and_writes_no_pickle(tmp_path):
    straight = _trainer(tmp_path / "straight")
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    files = sorted(p.name for p in checkpoint.iterdir())
    assert files == ["optimizer.json", "optimizer.safetensors", "rng_state.json", "rng_state.safetensors", "scheduler.json",
                     "trainable.safetensors", "trainer_state.json", "training_args.json"]
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".bin", ".pt", ".pth")]

    resumed = _trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert resumed.state.global_step == 6
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_resume_refuses_a_checkpoint_that_trains_other_parameters(tmp_path):
    first = _trainer(tmp_path / "a", max_steps=3)
    first.train()
    other = _trainer(tmp_path / "b")
    other.model.frozen.requires_grad_(True)
    with pytest.raises(Exception, match="trains other parameters"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))


def test_resume_refuses_a_checkpoint_saved_by_another_number_of_processes(tmp_path):
    first = _trainer(tmp_path / "a", max_steps=3)
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    for suffix in (".safetensors", ".json"):  # as a 2-process run names them
        (checkpoint / f"rng_state{suffix}").rename(checkpoint / f"rng_state_0{suffix}")
    with pytest.raises(Exception, match="as many processes"):
        _trainer(tmp_path / "b").train(resume_from_checkpoint=str(checkpoint))
