"""The LLaVA-Mini modules the testbed ships (C = 1) with the model they were trained with."""

import pytest

from slimvlm.bench.evaluate import evaluate, from_sample
from slimvlm.models.loading import TESTBED
from slimvlm.registry import build
from slimvlm.testbed.build import load
from slimvlm.testbed.scenes import make_samples

SHIPPED = TESTBED / "llava_mini" / "c1"


@pytest.mark.skipif(not (SHIPPED / "model" / "config.json").exists(), reason="the LLaVA-Mini weights are not in this install")
def test_shipped_c1_answers_from_one_token_per_image():
    model, processor = load(SHIPPED / "model")
    method = build(f"llava-mini:weights={SHIPPED}")
    assert (method.budget, method.layers) == (1, 4)
    items = [from_sample(s) for s in make_samples(64, seed=0, split="test")]
    result = evaluate(model, processor, items, method, batch_size=32, progress=False)
    assert result.visual_tokens_mean == 1
    # the card: 51.0-51.5% on 400 scenes, words 100%; DivPrune's single token gets 33%
    assert result.accuracy_by_type()["word"] == 1.0
    assert result.accuracy >= 0.4
    one_patch = evaluate(model, processor, items, "divprune:budget=1", batch_size=32, progress=False)
    assert result.accuracy >= one_patch.accuracy + 0.2  # 60.9% against 18.8% on these 64 scenes


@pytest.mark.skipif(not (SHIPPED / "model" / "config.json").exists(), reason="the LLaVA-Mini weights are not in this install")
def test_shipped_modules_refuse_the_model_they_were_not_trained_with():
    from slimvlm import apply
    from slimvlm.errors import SlimVLMError
    from slimvlm.models.loading import load_model

    base, _ = load(TESTBED)
    with pytest.raises(SlimVLMError, match=r"trained with another model.*llava_mini/c1/model"):
        apply(base, f"llava-mini:weights={SHIPPED}")
    tuned, _ = load_model(str(SHIPPED / "model"), "cpu", "bfloat16")
    apply(tuned, f"llava-mini:weights={SHIPPED}").remove()  # its own model, in another dtype
