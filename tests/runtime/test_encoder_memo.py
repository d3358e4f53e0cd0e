"""reusing_vision_tower(): a sweep of methods over the same batches runs the vision tower's untouched layers once
per batch, and gives what running them every time gives."""

from __future__ import annotations

import pytest
import torch

from slimvlm.bench import evaluate as E
from slimvlm.encoder_memo import reusing_vision_tower, untouched_layers
from slimvlm.models.llava import LlavaAdapter
from slimvlm.testbed import scenes

# stage 2 and later leave the whole encoder untouched; VisionZip acts at its last layer only
SWEEP = ["none", "divprune:budget=16", "pool:budget=16", "fastv:k=1,ratio=0.5", "visionzip:dominant=12,contextual=4",
         "visionzip:dominant=24,contextual=8"]


@pytest.fixture
def layer_runs(monkeypatch):
    """The (layer count) of every run of the LLaVA encoder's untouched layers."""
    runs = []
    original = LlavaAdapter._untouched_layers

    def counted(self, pixel_values, count):
        runs.append(count)
        return original(self, pixel_values, count)

    monkeypatch.setattr(LlavaAdapter, "_untouched_layers", counted)
    return runs


def test_a_sweep_runs_the_untouched_layers_once_per_batch_and_answers_the_same(tiny, layer_runs):
    model, processor = tiny
    items = [E.from_sample(sample) for sample in scenes.make_samples(6, split="test")]
    alone = [E.evaluate(model, processor, items, spec, batch_size=4, progress=False) for spec in SWEEP]
    runs_alone = list(layer_runs)
    layer_runs.clear()
    prepared: dict = {}
    with reusing_vision_tower():
        shared = [E.evaluate(model, processor, items, spec, batch_size=4, progress=False, prepared=prepared)
                  for spec in SWEEP]
    assert [r.records for r in shared] == [r.records for r in alone]
    assert [r.stats for r in shared] == [r.stats for r in alone]
    layers = model.config.vision_config.num_hidden_layers + model.config.vision_feature_layer + 1  # up to the feature layer
    assert sorted(set(runs_alone)) == [layers - 1, layers]
    assert runs_alone.count(layers) == 2 * 4 and runs_alone.count(layers - 1) == 2 * 2  # 2 batches per method
    assert sorted(layer_runs) == [layers - 1, layers - 1, layers, layers]  # 2 batches, each prefix once
    assert len(prepared) == 2


def test_pixels_changed_in_place_another_encoder_or_autograd_run_the_layers_again():
    pixels = torch.ones(2, 3)
    encoder, other = torch.nn.Identity(), torch.nn.Identity()
    calls = []

    def run():
        calls.append(1)
        return pixels * len(calls)

    first = untouched_layers(encoder, pixels, 3, run)
    assert len(calls) == 1  # outside the block: always run
    with reusing_vision_tower(), torch.no_grad():
        first = untouched_layers(encoder, pixels, 3, run)
        assert untouched_layers(encoder, pixels, 3, run) is first and len(calls) == 2
        untouched_layers(encoder, pixels, 2, run)  # another layer count
        untouched_layers(other, pixels, 3, run)  # another encoder
        assert len(calls) == 4
        pixels.add_(1)  # changed in place
        assert torch.equal(untouched_layers(encoder, pixels, 3, run), pixels * 5)
        with torch.enable_grad():
            untouched_layers(encoder, pixels, 3, run)
            untouched_layers(encoder, pixels, 3, run)
        assert len(calls) == 7
    untouched_layers(encoder, pixels, 3, run)
    assert len(calls) == 8
