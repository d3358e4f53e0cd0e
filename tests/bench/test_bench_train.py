"""slimvlm bench-train: the three recipes' training steps side by side, on the direct forward of every family it takes."""

import torch

from slimvlm.bench.train import bench_train, format_table, make_trainable, training_batch
from slimvlm.train import DualSpeed


def test_the_recipes_are_timed_side_by_side_on_the_tokens_each_trains_on(tiny_dir):
    from slimvlm.testbed.build import load

    model, _ = load(tiny_dir)  # its own copy: the steps change its weights
    model.train()
    make_trainable(model, lora_rank=0)
    batch = training_batch(model, batch_size=2, text_tokens=12, answer_tokens=4)
    assert batch["image_start"] == 5 and batch["image_tokens"] == 576
    results = bench_train(model, batch, p=0.9, r=0.5, steps=2, warmup=1, repeats=1)
    baseline, naive, dual = results
    assert [r.recipe for r in results] == ["baseline", "naive-pruning", "dualspeed"]
    assert baseline.visual_tokens == {"slow": 576} and naive.visual_tokens == {"fast": 58}
    assert dual.visual_tokens == {"fast": 58 + 4, "slow": 576}  # the pruned tokens and the mode isolator
    assert baseline.expected_speedup == 1.0
    mix = 0.5 * dual.step_ms["fast"] + 0.5 * dual.step_ms["slow"]
    assert abs(dual.expected_speedup - baseline.step_ms["slow"] / mix) < 0.01
    assert "expected speed-up" in format_table(results)


def test_lora_trains_adapters_and_the_projector_only(tiny_dir):
    from slimvlm.testbed.build import load

    model, _ = load(tiny_dir)
    make_trainable(model, lora_rank=4)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name or "multi_modal_projector" in name for name in trained)
    assert any("multi_modal_projector" in name for name in trained)


def test_the_direct_modes_equal_the_applied_ones_on_anyres_images(fresh_next):
    """LLaVA-NeXT: each image's base view, tiles and newlines fill its span (one size: one span length)."""
    model, _ = fresh_next
    batch = training_batch(model, batch_size=2, text_tokens=10, answer_tokens=3)
    general = {k: v for k, v in batch.items() if k not in ("image_start", "image_tokens")}
    ds = DualSpeed(model, pruner="divprune:ratio=0.25", isolator_length=2, lam=0.5)
    for mode in ("fast", "slow"):
        step = next(s for s in range(1000) if ds.step_mode(s) == mode)
        with torch.no_grad():
            direct, _ = ds.loss(batch, step, details=False)
            applied, _ = ds.loss(general, step, details=False)
        assert torch.allclose(direct, applied, atol=1e-5), mode


def test_step_medians_interleave_the_recipes_so_drift_falls_on_all_alike():
    from slimvlm.bench.timing import interleaved_medians_ms

    calls = []
    medians = interleaved_medians_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                     torch.device("cpu"), warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds, each calling both in turn
    assert set(medians) == {"a", "b"} and all(ms >= 0 for ms in medians.values())
