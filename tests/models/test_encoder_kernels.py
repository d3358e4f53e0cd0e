"""Encoders whose lengths follow the image run attention off cuDNN (a graph build per new length)."""

import pytest
import torch

import slimvlm
from conftest import batch
from slimvlm.methods.dymu import DyMU
from slimvlm.methods.mustdrop import MustDrop


class Probe(slimvlm.Method):
    """Records, at each encoder layer, whether SDPA may use its cuDNN kernel."""

    name = "test-kernel-probe"
    stages = frozenset({slimvlm.Stage.ENCODE})

    def __init__(self, varying: bool) -> None:
        self.varying_lengths = varying
        self.cudnn_allowed: list[bool] = []

    def encode_layer(self, attention, tokens):
        self.cudnn_allowed.append(torch.backends.cuda.cudnn_sdp_enabled())
        return tokens


@pytest.mark.parametrize("varying", [True, False])
def test_cudnn_attention_is_off_only_for_varying_lengths(fresh, varying):
    model, processor = fresh
    probe = Probe(varying)
    with torch.no_grad(), slimvlm.apply(model, probe):
        model(**batch(processor, 1, seed=0))
    assert probe.cudnn_allowed and set(probe.cudnn_allowed) == {not varying}
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after the encoder


def test_which_methods_vary():
    assert DyMU.varying_lengths
    assert MustDrop().varying_lengths and not MustDrop(lsm=False).varying_lengths
    assert not slimvlm.Method.varying_lengths
