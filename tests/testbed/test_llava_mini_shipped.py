"""The LLaVA-Mini modules the testbed ships, on the model they were trained with (shipped_model)."""

import pytest
import torch

from slimvlm.bench.evaluate import evaluate, from_sample
from slimvlm.errors import SlimVLMError
from slimvlm.methods.llava_mini import SHIPPED, SHIPPED_MODEL, shipped_model, shipped_weights
from slimvlm.models.loading import TESTBED
from slimvlm.registry import build
from slimvlm.testbed.build import load
from slimvlm.testbed.scenes import make_samples

C1 = TESTBED / SHIPPED / "c1"


@pytest.mark.skipif(not (C1 / "llava_mini.json").exists(), reason="the LLaVA-Mini weights are not in this install")
def test_shipped_c1_answers_from_one_token_per_image():
    model = shipped_model(TESTBED)
    _, processor = load(TESTBED)
    method = build(f"llava-mini:weights={C1}")
    assert (method.budget, method.layers) == (1, 4)
    items = [from_sample(s) for s in make_samples(64, seed=0, split="test")]
    result = evaluate(model, processor, items, method, batch_size=32, progress=False)
    assert result.visual_tokens_mean == 1
    # the card: 75.0% on 400 scenes, shape 100%; DivPrune's single token gets 33.0% there
    assert result.accuracy_by_type()["shape"] == 1.0
    assert result.accuracy >= 0.65
    base, _ = load(TESTBED)
    one_patch = evaluate(base, processor, items, "divprune:budget=1", batch_size=32, progress=False)
    assert result.accuracy >= one_patch.accuracy + 0.3


@pytest.mark.skipif(not (C1 / "llava_mini.json").exists(), reason="the LLaVA-Mini weights are not in this install")
def test_shipped_modules_refuse_the_model_they_were_not_trained_with():
    from slimvlm import apply

    base, _ = load(TESTBED)
    with pytest.raises(SlimVLMError, match=r"trained with another model.*shipped_model"):
        apply(base, f"llava-mini:weights={C1}")
    apply(shipped_model(TESTBED, dtype="bfloat16"), f"llava-mini:weights={C1}").remove()  # their own, in another dtype


def test_a_folder_ships_modules_and_the_model_they_were_trained_with(tiny, tiny_dir, tmp_path):
    """llava_mini/model.safetensors holds what training changed (all but the frozen vision tower), loaded over the
    folder's own model; modules trained on the folder's model as it is need none."""
    import shutil

    from safetensors.torch import save_file

    from slimvlm.methods.llava_mini import LlavaMini

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    trained, _ = load(tiny_dir)
    with torch.no_grad():
        trained.model.multi_modal_projector.linear_1.weight.mul_(1.5)  # "fine-tuned"
    method = LlavaMini(budget=2, layers=1)
    method.build(trained)
    method.save(folder / SHIPPED / "c2")
    assert shipped_weights(folder) == {2: folder / SHIPPED / "c2"}
    with pytest.raises(SlimVLMError, match="trained with another model"):
        build(f"llava-mini:weights={folder / SHIPPED / 'c2'}").build(shipped_model(folder))  # no model file yet
    parts = {name: p.detach().contiguous() for name, p in trained.state_dict().items() if "vision_tower" not in name}
    save_file(parts, str(folder / SHIPPED / SHIPPED_MODEL))
    own = shipped_model(folder)
    assert all(torch.equal(own.state_dict()[name], p) for name, p in trained.state_dict().items())
    build(f"llava-mini:weights={folder / SHIPPED / 'c2'}").build(own)  # accepted on its own model
    save_file({"not.a.weight": torch.zeros(1)}, str(folder / SHIPPED / SHIPPED_MODEL))
    with pytest.raises(SlimVLMError, match="does not hold the trained parts"):
        shipped_model(folder)
