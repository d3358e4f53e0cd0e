"""The fine-tuning recipe `slimvlm train` and the lab's experiments share."""

from slimvlm.testbed.build import load
from slimvlm.train.recipe import freeze_vision


def test_freeze_vision_leaves_projector_and_llm_trainable(tiny_dir):
    model, _ = load(tiny_dir)
    frozen = freeze_vision(model)
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert frozen == vision > 0
    assert all(not p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
